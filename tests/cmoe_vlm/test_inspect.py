"""Compression inspection: every output exists and is valid, and the per-modality ratios in the
JSON equal the ones recomputed here from the model's boundary masks (an independent forward)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmoe_base import Batch
from cmoe_vlm.checkpoints.export import save_pretrained
from cmoe_vlm.inspection import analysis, image_content, plots, render
from cmoe_vlm.cli.inspect import main as inspection_main
from cmoe_vlm.inspection.samples import load_samples
from cmoe_vlm.inference.runner import ModelRunner
from cmoe_vlm.training.config import load_experiment
from cmoe_vlm.model.vlm import ConceptMoEVLM
from data_pipelines.builtin import draw_scene
from data_pipelines.builtin_sizes import Canvas

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # random weights: p ≈ 0.5 everywhere, so boundaries are a mix (a trained model is not needed to
    # check the bookkeeping)
    exp = load_experiment(ROOT / "configs/tiny.yaml", ["model.dim=32", "model.moe.expert_hidden=32",
                                                        "model.encoder_layers=1", "model.concept_layers=1",
                                                        "model.decoder_layers=1", "vision.depth=1"])
    torch.manual_seed(0)
    return save_pretrained(ConceptMoEVLM(exp.vlm), tmp_path_factory.mktemp("m") / "final")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import random

    d = tmp_path_factory.mktemp("data")
    img = draw_scene(random.Random(1), Canvas(64, 64, 16)).image
    img.save(d / "scene.png")
    (d / "note.txt").write_text("Table of 3:\n3 times 1 is 3.\n3 times 2 is 6.")
    (d / "docs.jsonl").write_text(json.dumps({"pieces": [{"text": "Look:"}, {"image": "scene.png"},
                                                         {"text": " shapes."}, {"image": "scene.png"}]}) + "\n")
    return [str(d / "docs.jsonl"), str(d / "scene.png"), str(d / "note.txt")]


def test_outputs_and_ratios_match_the_boundary_masks(model_dir, files, tmp_path, capsys):
    out = tmp_path / "inspect"
    rc = inspection_main(["--model", str(model_dir), "--data", *files, "builtin", "--num-samples", "12", "--show", "3",
                          "--images", "4", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "compression.json").read_text())
    assert summary["num_samples"] == 12
    for name in ("compression.png", "chunk_lengths.png", "boundary_probs.png"):
        with Image.open(out / name) as im:
            im.verify()
    files_ = summary["files"]
    in_samples = [p for i in range(3) for p in files_[f"sample_{i}_images"]]
    assert len(in_samples) == 3  # docs.jsonl has 2 images, scene.png 1 (the text file none)
    records = summary["modalities"]["image"]["per_image"]
    shown = files_["images_shown"]
    assert len(shown) == min(4, len(records))
    top = max(records, key=lambda r: (r["ratio"], r["p_std"]))  # the most compressed image is shown, first
    assert Path(shown[0]).name == f"sample_{top['sample']}_image_{top['image']}.png"
    for p in {*in_samples, *shown}:
        with Image.open(p) as im:
            assert im.size[0] >= 900 and im.size[1] >= 900  # readable: four panels of one image
    html = (out / "samples.html").read_text()
    assert "boundary probability" in html and "How" in html
    assert html.count('class="map"') == 3 + len(shown)
    img = summary["modalities"]["image"]
    assert "Boundary rate on <b>changing</b>" in html and "Degenerate images" in html and "spread of p" in html
    assert img["degenerate_fraction"] == pytest.approx(
        sum(r["degenerate"] is not None for r in records) / len(records))
    c = img["content"]
    assert c["changing"]["tokens"] + c["repeating"]["tokens"] + c["first_tokens_excluded"] == img["tokens"]
    assert "\033[48;5;" in (out / "sample_0.ansi.txt").read_text()
    # stdout is not a terminal here: the views went to samples.txt (plain), not to stdout
    printed = capsys.readouterr().out
    assert "ratio" in printed and "--- sample" not in printed and "\033[" not in printed
    views = (out / "samples.txt").read_text()
    assert views.count("--- sample") == 3 and "\033[" not in views and "|" in views

    # independent recomputation: same samples, our own forward, counts from the masks
    runner = ModelRunner.load(model_dir)
    docs = load_samples([*files, "builtin"], 12)
    tokens = {"all": 0, "text": 0, "image": 0}
    bounds = dict.fromkeys(tokens, 0)
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for pieces, line in zip(docs, lines):
        seq = runner.sequence(pieces, add_eos=True)
        ids = torch.tensor([seq.input_ids])
        mod = torch.tensor([seq.modality])
        imgs = torch.stack(seq.images) if seq.images else None
        with torch.no_grad():
            o = runner.model(Batch.of(ids, modality=mod, images=imgs))
        b = o.boundaries[0]
        assert line["boundary"] == b.int().tolist() and line["modality"] == mod[0].tolist()
        for name, sel in (("all", torch.ones_like(b)), ("text", mod[0] == 0), ("image", mod[0] == 1)):
            tokens[name] += int(sel.sum())
            bounds[name] += int((b & sel.bool()).sum())
    for name in tokens:
        m = summary["modalities"][name]
        assert (m["tokens"], m["boundaries"]) == (tokens[name], bounds[name]), name
        assert m["ratio"] == pytest.approx(tokens[name] / bounds[name])
        assert summary["model_reported"][name]["ratio"] == pytest.approx(m["ratio"])
    assert 0 < bounds["image"] < tokens["image"]  # random weights: neither all nor no boundaries
    # chunk-length histograms count every closed chunk's tokens of that modality
    hist = summary["modalities"]["text"]["chunk_length"]["histogram"]
    assert sum(int(k) * v for k, v in hist.items()) <= tokens["text"]
    assert sum(summary["modalities"]["image"]["boundary_prob"]["counts"]) == tokens["image"]


def test_sample_views_print_on_a_terminal(model_dir, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert inspection_main(["--model", str(model_dir), "--data", files[2], "--num-samples", "1", "--show", "1",
                            "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "--- sample 0" in printed and "\033[48;5;" in printed  # coloured on a terminal


def test_changing_cells_follow_the_pixels_the_model_saw(model_dir):
    """One bright square in token cell (1, 2) of a flat image, through the model's own transform:
    in raster order exactly that cell and its successor change (the square appears, then ends);
    scored against the cell above too (2d), the cell below it changes as well."""
    runner = ModelRunner.load(model_dir)
    rows, cols = runner.model.cfg.image_grid
    h, w = (n // g for n, g in zip(runner.model.vision.img_size, (rows, cols)))
    pixels = np.full((h * rows, w * cols, 3), 40, np.uint8)
    pixels[h:2 * h, 2 * w:3 * w] = (220, 200, 30)
    [s] = analysis.analyse(runner, [["Look:", Image.fromarray(pixels)]])
    diff = s.image_diffs[0]
    assert np.isnan(diff[0])  # the first token has no predecessor: neither changing nor repeating
    k = cols + 2
    assert np.flatnonzero(diff > image_content.REPEAT_TOLERANCE).tolist() == [k, k + 1]
    px = image_content.model_pixels(s.images[0], ((0.0,) * 3, (1.0,) * 3))
    assert px.shape[:2] == (h * rows, w * cols)
    noisy = pixels.astype(float) / 255 + np.random.default_rng(0).normal(0, 6 / 255, pixels.shape)
    above = image_content.cell_difference(noisy, (rows, cols), above=True)
    assert np.flatnonzero(above > image_content.REPEAT_TOLERANCE).tolist() == [k, k + 1, k + cols]


def test_change_repeat_rates_and_degenerate_images():
    """Rates pooled over images with the first token left out, recomputed by hand; degenerate = one
    chunk (only the forced first boundary) or every token a boundary."""
    grid = (2, 2)
    mod = np.array([0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0])
    b = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1], dtype=bool)  # image 0: 3 boundaries, image 1: 2
    diffs = [np.array([np.nan, 0.5, 0.0, 0.5]), np.array([np.nan, 0.0, 0.3, 0.01])]
    with_pixels = analysis.SampleChunks(input_ids=list(range(11)), modality=mod, boundary=b, p=np.full(11, 0.4),
                                        images=[], image_diffs=diffs)
    degenerate = analysis.SampleChunks(  # image 0: one chunk, image 1: all boundaries; no pixels
        input_ids=list(range(11)), modality=mod, p=np.full(11, 0.4), images=[],
        boundary=np.array([1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=bool))
    for s in (with_pixels, degenerate):
        s.reported = s.counts()
    img = analysis.summarise([with_pixels, degenerate], grid)["modalities"]["image"]
    c = img["content"]
    # changing: image 0 tokens 1, 3 (both boundaries), image 1 token 2 (none)
    assert c["changing"] == {"tokens": 3, "boundaries": 2, "rate": pytest.approx(2 / 3)}
    # repeating: image 0 token 2 (none), image 1 tokens 1 (none) and 3 (a boundary)
    assert c["repeating"] == {"tokens": 3, "boundaries": 1, "rate": pytest.approx(1 / 3)}
    assert c["rate_changing_over_repeating"] == pytest.approx(2.0) and c["first_tokens_excluded"] == 2
    assert (img["images_one_chunk"], img["images_all_boundaries"], img["degenerate_fraction"]) == (1, 1, 0.5)
    assert img["per_image_ratio"] == {"1.00": 1, "1.33": 1, "2.00": 1, "4.00": 1}
    assert [r["degenerate"] for r in img["per_image"]] == [None, None, "one chunk", "all boundaries"]


def test_images_shown_include_the_most_compressed_and_every_ratio():
    """Most images are all boundaries (ratio 1): the shown ones still start with the most merged
    image and cover each distinct ratio before repeating one."""
    ratios = [1.0] * 20 + [16.0, 16.0, 4.0, 2.0]
    records = [{"sample": i, "image": 0, "ratio": r, "p_std": 0.01 * i} for i, r in enumerate(ratios)]
    assert [r["ratio"] for r in analysis.images_to_show(records, 3)] == [16.0, 2.0, 1.0]
    five = analysis.images_to_show(records, 5)
    assert sorted({r["ratio"] for r in five}) == [1.0, 2.0, 4.0, 16.0] and five[0]["ratio"] == 16.0
    assert five[0]["sample"] == 21  # of equal ratios, the most varied p first
    assert len(analysis.images_to_show(records, 50)) == len(records)


def test_discrete_ratios_are_bars_and_chunk_lengths_have_integer_ticks():
    plt = plots._plt()
    fig, (a, b) = plt.subplots(1, 2)
    assert plots.value_counts_panel(a, [1.0] * 28 + [16.0] * 9, "k") == "bars"
    assert sorted(p.get_height() for p in a.patches) == [9, 28] and list(a.get_xticks()) == [1.0, 16.0]
    assert plots.value_counts_panel(b, list(np.linspace(1, 3, 40)), "k") == "histogram"
    plt.close(fig)
    fig, c = plt.subplots(figsize=(5.5, 4.2))  # a panel's size in chunk_lengths.png
    plots.chunk_length_panel(c, "image", {"chunk_length": {"histogram": {"1": 457, "2": 9}, "mean": 1.02}}, "k")
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in c.get_xticks()) and len(c.get_xticks()) >= 2
    plt.close(fig)


def test_sample_chunks_bookkeeping():
    s = analysis.SampleChunks(input_ids=list(range(7)), modality=np.array([0, 0, 1, 1, 1, 0, 0]),
                         boundary=np.array([1, 0, 1, 0, 1, 1, 0], dtype=bool), p=np.zeros(7), images=[])
    assert s.chunks() == [(0, 1, True), (1, 3, True), (3, 5, True), (5, 6, True), (6, 7, False)]
    assert s.chunk_id.tolist() == [0, 1, 1, 2, 2, 3, 4]
    assert s.counts() == {"all": (7, 4), "text": (4, 2), "image": (3, 2)}
    assert "|" in render.ansi_view(s, list("abcdefg"), color=False)


def test_knife_edge_diagnostics():
    """Within-image p spread and the share of p near the threshold, recomputed with numpy."""
    grid, P = (2, 2), 4
    flat = np.array([0.2, 1.0, 0.49, 0.49, 0.49, 0.3])      # text, then an all-alike image, then text
    varied = np.array([0.6, 1.0, 0.1, 0.9, 0.52, 0.45])
    samples = [analysis.SampleChunks(input_ids=list(range(6)), modality=np.array([0, 1, 1, 1, 1, 0]), p=p,
                                boundary=p >= 0.5, images=[]) for p in (flat, varied)]
    for s in samples:
        s.boundary[0] = True
        s.reported = s.counts()  # what the model would report for these masks
    mod = analysis.summarise(samples, grid)["modalities"]
    stds = [float(p[2:1 + P].std()) for p in (flat, varied)]  # the forced first patch excluded
    assert mod["image"]["within_image_p_std"]["min"] == pytest.approx(0.0)
    assert mod["image"]["within_image_p_std"]["max"] == pytest.approx(max(stds))
    img_p = np.concatenate([flat[1:5], varied[1:5]])
    assert mod["image"]["boundary_prob"]["fraction_within_0.05_of_0.5"] == pytest.approx(
        float((np.abs(img_p - 0.5) < 0.05).mean()))

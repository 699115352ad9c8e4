"""Compression inspection: every output exists and is valid, and the per-modality ratios in the
JSON equal the ones recomputed here from the model's boundary masks (an independent forward)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmoe_base import Batch
from cmoe_vlm.export import save_pretrained
from cmoe_vlm.inspection import analysis, render
from cmoe_vlm.inspection.__main__ import main as inspection_main
from cmoe_vlm.inspection.samples import load_samples
from cmoe_vlm.runner import ModelRunner
from cmoe_vlm.training.config import load_experiment
from cmoe_vlm.vlm import ConceptMoEVLM
from data_pipelines.builtin import draw_scene

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
    img = draw_scene(random.Random(1), 64).image
    img.save(d / "scene.png")
    (d / "note.txt").write_text("Table of 3:\n3 times 1 is 3.\n3 times 2 is 6.")
    (d / "docs.jsonl").write_text(json.dumps({"pieces": [{"text": "Look:"}, {"image": "scene.png"},
                                                         {"text": " shapes."}, {"image": "scene.png"}]}) + "\n")
    return [str(d / "docs.jsonl"), str(d / "scene.png"), str(d / "note.txt")]


def test_outputs_and_ratios_match_the_boundary_masks(model_dir, files, tmp_path, capsys):
    out = tmp_path / "inspect"
    rc = inspection_main(["--model", str(model_dir), "--data", *files, "builtin", "--num-samples", "12", "--show", "3",
                   "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "compression.json").read_text())
    assert summary["num_samples"] == 12
    for name in ("compression.png", "chunk_lengths.png", "boundary_probs.png"):
        with Image.open(out / name) as im:
            im.verify()
    maps = sorted(out.glob("sample_*_image_*.png"))
    assert len(maps) == 3  # docs.jsonl has 2 images, scene.png 1 (the text file none)
    for p in maps:
        with Image.open(p) as im:
            assert im.size[0] >= 400
    html = (out / "samples.html").read_text()
    assert "boundary probability" in html and "How" in html and html.count('class="map"') == 3
    assert "\033[48;5;" in (out / "sample_0.ansi.txt").read_text()

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
    assert "ratio" in capsys.readouterr().out


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

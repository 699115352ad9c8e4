"""Built-in images of several sizes and aspect ratios (`sizes`): the default data unchanged, the requested
canvases, grid cells named right on non-square canvases, receipts that add up, the suite and the config."""
import hashlib
import io
import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines.builtin import (builtin_documents, cell_name, describe_layout, describe_receipt, draw_receipt,
                                    draw_scene, main, receipt_question, where_question)
from data_pipelines.builtin_sizes import Canvas, parse_sizes
from data_pipelines.shards import load_manifest

# Recorded before `sizes` existed (commit c8d66c9): the default data must stay byte for byte what it was
# (`make demo`, the golden loss curve). Pixels, not PNG bytes, so a zlib change does not count; a Pillow
# or numpy that draws differently does, and then the golden curve moves too.
DEFAULT_DIGESTS = {
    (40, 64, 0, 600, True): "33fed74185d1d939ad653369e41267bcb184a0f28909e2a18a90e3ed6c1bf70e",
    (20, 48, 7, 300, False): "c08e1729b4b35947e79bb431f7cfac2937d37e5dfecc503359c0047d4b4e1666",
}
DEFAULT_SUITE_DIGEST = "4122ed98c9d6b3e7da7d7d6c3683cb5eff083e2fc0635b5488ebeed95260bdd5"  # its .jsonl, 60 samples


def documents_digest(docs) -> str:
    h = hashlib.sha256()
    for sample, drawings in docs:
        for k in sorted(sample):
            value = sample[k]
            if k.endswith("png"):
                pixels = np.asarray(Image.open(io.BytesIO(value)))
                value = repr(pixels.shape).encode() + pixels.tobytes()
            h.update(k.encode() + value)
        for d in drawings:
            h.update(d.labels.tobytes() + repr([tuple(o) for o in d.objects]).encode())
    return h.hexdigest()


def images_of(sample: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(sample[k])) for k in sorted(sample) if k.endswith("png")]


def test_default_data_and_suite_are_unchanged(tmp_path):
    from cmoe_vlm.eval.builtin_suite import write_builtin_suite

    for (num, size, seed, chars, grounded), want in DEFAULT_DIGESTS.items():
        assert documents_digest(builtin_documents(num, size, seed, chars, grounded)) == want
    suite = write_builtin_suite(tmp_path, num_samples=60)
    h = hashlib.sha256()
    for f in sorted(suite.parent.glob("*.jsonl")):
        h.update(f.name.encode() + f.read_bytes())
    assert h.hexdigest() == DEFAULT_SUITE_DIGEST


def test_parse_sizes_presets_lists_and_errors():
    assert parse_sizes("mixed", 64) == ((64, 64), (128, 128), (128, 64), (64, 128), (256, 64), (64, 256))
    assert parse_sizes("mixed", 32)[4] == (128, 32)  # presets are in units of image_size
    assert parse_sizes(" 96x48, 48x160", 64) == ((96, 48), (48, 160))
    for bad in ("", "big", "128x", "128*64", "128x64,"):
        with pytest.raises(ValueError, match="sizes"):
            parse_sizes(bad, 64)
    with pytest.raises(ValueError, match=r"32x32 px holds 4 scene cells of 16 px"):
        parse_sizes("32x32", 64)


def test_cli_writes_mixed_sizes_and_names_a_bad_flag(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-train", "12", "--num-heldout", "2", "--sizes", "mixed"])
    assert load_manifest(tmp_path / "train")["samples"] == 12
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--sizes", "64x"])
    assert "--sizes '64x'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_mixed_sizes_give_every_preset_size_flat_backgrounds_banners_and_receipts():
    want = set(parse_sizes("mixed", 64))
    sizes, flat, receipts, banners = set(), 0, 0, 0
    for sample, drawings in builtin_documents(150, sizes="mixed", seed=3):
        for image, d in zip(images_of(sample), drawings):
            sizes.add(image.size)
            assert d.labels.shape == (image.height, image.width)
            assert d.grid == (image.height // 16, image.width // 16)
            background = np.asarray(image)[d.labels == 0]
            flat += bool((background == background[0]).all())
        text = sample.get("txt", b"").decode() + sample.get("json", b"").decode()
        receipts += "receipt" in text or "total" in text or "How much is" in text
        banners += bool(drawings) and drawings[0].objects[0].shape == "text" and images_of(sample)[0].width >= 256
    assert sizes == want and {w / h for w, h in want} == {1, 2, 0.5, 4, 0.25}
    assert flat > 30 and receipts > 3 and banners > 1


def test_cells_are_named_right_on_non_square_canvases():
    canvas = Canvas(256, 64, 16, rows=4, cols=16)
    for seed in range(20):
        d = draw_scene(random.Random(seed), canvas)
        assert d.image.size == (256, 64) and d.grid == (4, 16)
        for i, o in enumerate(d.objects):  # each mask inside its cell: row o.cell // 16, column o.cell % 16
            rows, cols = np.nonzero(d.labels == i + 1)
            assert len(rows) > 40 and (rows // 16 == o.cell // 16).all() and (cols // 16 == o.cell % 16).all()
        names = re.findall(r"at row (\d+), column (\d+)\.", describe_layout(d.objects, 16))
        assert sorted((int(r) - 1) * 16 + int(c) - 1 for r, c in names) == sorted(o.cell for o in d.objects)
    assert cell_name(29, 16) == "row 2, column 14" and cell_name(29) == "row 8, column 2"
    tall = Canvas(64, 256, 16, rows=16, cols=4)
    d = draw_scene(random.Random(0), tall)
    questions = {where_question(random.Random(k), d.objects, d.grid) for k in range(60)}
    for q, a in questions:
        if q.startswith("Where is the "):
            colour, shape = q[len("Where is the "):-1].split()
            cell = next(o.cell for o in d.objects if (o.colour, o.shape) == (colour, shape))
            assert a == cell_name(cell, 4)
    assert any(int(re.search(r"row (\d+)", q + a)[1]) > 4 for q, a in questions if "row" in q + a)


def test_grounded_text_of_mixed_documents_matches_the_drawings():
    checked = 0
    for sample, drawings in builtin_documents(200, sizes="mixed", seed=4):
        if len(drawings) != 1 or drawings[0].objects[0].shape == "text":
            continue
        d = drawings[0]
        rows, cols = d.grid
        cell = {cell_name(c, cols): c for c in range(rows * cols)}
        text = sample.get("txt", b"").decode()
        listed = re.findall(r"An? (\w+) (circle|square|triangle) at (row \d+, column \d+)\.", text)
        if listed:
            assert [(c, s, cell[n]) for c, s, n in listed] == sorted(((o.colour, o.shape, o.cell) for o in d.objects),
                                                                    key=lambda o: o[2])
            checked += rows != cols
        meta = json.loads(sample.get("json", b"{}"))
        if meta.get("question", "").startswith("Where is the "):
            colour, shape = meta["question"][len("Where is the "):-1].split()
            assert cell[meta["answer"]] == next(o.cell for o in d.objects if (o.colour, o.shape) == (colour, shape))
            checked += rows != cols
    assert checked > 5


def test_receipts_add_up_and_fit_their_canvas():
    for seed in range(30):
        canvas = Canvas(64, 256, 16, rows=16, cols=4) if seed % 2 else Canvas(64, 128, 16, rows=8, cols=4, flat=True)
        d, items = draw_receipt(random.Random(seed), canvas)
        assert 2 <= len(items) <= 5 and len({w for w, _ in items}) == len(items)
        total = sum(p for _, p in items)
        assert describe_receipt(items).endswith(f"total {total}.")
        q, a = receipt_question(random.Random(seed), items)
        assert a == (str(total) if q == "What is the total?" else str(dict(items)[q[len("How much is the "):-1]]))
        rows, cols = np.nonzero(d.labels)  # the ink stays inside, clear of the right and bottom edges
        assert cols.max() < canvas.width - 1 and rows.max() < canvas.height - 1 and len(rows) > 50


def test_suite_with_sizes_offers_each_images_own_cells(tmp_path):
    from cmoe_vlm.eval.builtin_suite import write_builtin_suite

    suite = write_builtin_suite(tmp_path, num_samples=80, sizes="mixed")
    records = [json.loads(line) for line in (suite.parent / "mc_position.jsonl").read_text().splitlines()]
    grids = set()
    for r in records:
        width, height = Image.open(tmp_path / r["image"]).size
        rows, cols = height // 16, width // 16
        assert r["choices"] == [cell_name(c, cols) for c in range(rows * cols)] and 0 <= r["answer"] < rows * cols
        grids.add((rows, cols))
    assert len(grids) >= 4 and "sizes mixed" in suite.read_text()


def test_tiny_sizes_config_streams_the_mixed_data_at_its_own_size(tmp_path):
    import torch

    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from cmoe_vlm.training.config import load_experiment
    from data_pipelines.builtin import write_builtin_dataset
    from data_pipelines.loader import StreamingLoader

    paths = write_builtin_dataset(tmp_path, num_train=24, num_heldout=2, maxcount=50, sizes="mixed")
    exp = load_experiment("configs/tiny_sizes.yaml", [f"data.shards={paths['train']}", "data.num_workers=0",
                                                      "data.shuffle_buffer=0", "data.batch_size=2"])
    torch.manual_seed(0)
    model = ConceptMoEVLM(exp.vlm).eval()
    batches = list(StreamingLoader(exp.data, image_transform=model.image_transform(train=False)))
    sizes = [s for b in batches for s in b.sizes_of_images()]
    assert set(sizes) <= {(h, w) for w, h in parse_sizes("mixed", 64)} and len(set(sizes)) >= 4  # none resized
    with torch.no_grad():
        model(batches[0])
    assert batches[0].image_tokens == sum(r * c for r, c in model.image_grids(batches[0]))


def test_cmoe_train_builtin_writes_the_sizes_the_config_names(tmp_path, monkeypatch, capsys):
    """`cmoe-train configs/tiny_sizes.yaml --builtin` writes mixed-size data (data.builtin_sizes), tiny.yaml
    the default squares; a bad data.builtin_sizes is one line naming the field."""
    import data_pipelines.builtin
    import cmoe_vlm.training.engine
    import cmoe_vlm.training.loop
    from cmoe_vlm.cli.train import main as train_main

    written = []
    monkeypatch.setattr(data_pipelines.builtin, "write_builtin_dataset",
                        lambda root, image_size, sizes: written.append((root, image_size, sizes)))
    monkeypatch.setattr(cmoe_vlm.training.loop, "train", lambda exp: {})
    # no training, so no teardown: destroying this pytest process's process group would leave DeepSpeed's
    # cached groups stale for every later in-process training test
    monkeypatch.setattr(cmoe_vlm.training.engine, "shutdown_distributed", lambda: None)
    for config, sizes in (("configs/tiny_sizes.yaml", "mixed"), ("configs/tiny.yaml", None)):
        assert train_main([config, "--builtin", f"data.shards={tmp_path / config}/train"]) == 0
        assert written.pop() == (tmp_path / config, 64, sizes)
    assert train_main(["configs/tiny_sizes.yaml", "--builtin", "data.builtin_sizes=7x", f"data.shards={tmp_path}/x"]) == 2
    assert "data.builtin_sizes = '7x'" in capsys.readouterr().err and not written

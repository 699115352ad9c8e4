import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from data_pipelines.loader import read_tar
from data_pipelines.shards import (decode_sample, img2dataset_folder, jsonl_interleaved, jsonl_pairs, jsonl_text,
                                   load_manifest, main, write_shards)


def read_all(out: Path) -> list[dict]:
    return [s for tar in sorted(out.glob("*.tar")) for s in read_tar(str(tar))]


def save_image(path: Path, colour=(0, 128, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_img2dataset_folder(tmp_path):
    src = tmp_path / "src" / "00000"
    for i in range(5):
        save_image(src / f"00000{i}.jpg")
        (src / f"00000{i}.txt").write_text(f"caption {i}")
        (src / f"00000{i}.json").write_text(json.dumps({"key": f"00000{i}", "status": "success"}))
    save_image(src / "000009.jpg")  # no caption
    (src / "000008.jpg").write_bytes(b"not a jpeg")
    (src / "000008.txt").write_text("corrupt image")
    manifest = write_shards(img2dataset_folder(tmp_path / "src"), tmp_path / "out", maxcount=2)
    assert manifest["samples"] == 5 and len(manifest["shards"]) == 3
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.tar"))
    assert manifest["skipped_counts"] == {"bad_image": 1, "missing_caption": 1}
    assert load_manifest(tmp_path / "out") == manifest
    samples = read_all(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    image, caption = decode_sample(samples[3])
    assert caption == "caption 3" and image.size == (12, 10)
    assert json.loads(samples[3]["json"])["key"] == "000003"


def test_jsonl_pairs(tmp_path):
    save_image(tmp_path / "imgs" / "a.png")
    lines = [{"image": "imgs/a.png", "text": "a blue box"}, "{broken", {"image": "imgs/missing.png", "text": "x"},
             {"image": "imgs/a.png", "text": ""}]
    manifest = write_shards(jsonl_pairs(write_jsonl(tmp_path / "pairs.jsonl", lines)), tmp_path / "out")
    assert manifest["samples"] == 1
    assert manifest["skipped_counts"] == {"bad_json": 1, "missing_caption": 1, "missing_image": 1}
    assert manifest["skipped"][0]["input"].endswith("pairs.jsonl:2")
    image, text = decode_sample(read_all(tmp_path / "out")[0])
    assert text == "a blue box" and image.mode == "RGB"


def test_jsonl_interleaved_both_layouts(tmp_path):
    save_image(tmp_path / "a.png", (255, 0, 0))
    save_image(tmp_path / "b.jpg", (0, 255, 0))
    lines = [
        {"pieces": [{"text": "first"}, {"image": "a.png"}, {"text": "then"}, {"image": "b.jpg"}]},
        {"texts": ["obelics", None, "end"], "images": [None, "a.png", None]},
        {"pieces": [{"text": "x"}, {"video": "v.mp4"}]},
    ]
    manifest = write_shards(jsonl_interleaved(write_jsonl(tmp_path / "docs.jsonl", lines)), tmp_path / "out")
    assert manifest["samples"] == 2 and manifest["skipped_counts"] == {"bad_json": 1}
    first, second = read_all(tmp_path / "out")
    assert {"0.png", "1.jpg", "json"} <= set(first)
    pieces = decode_sample(first)
    assert pieces[0] == "first" and pieces[2] == "then"
    assert pieces[1].getpixel((0, 0)) == (255, 0, 0) and isinstance(pieces[3], Image.Image)
    assert [type(p) for p in decode_sample(second)][::2] == [str, str]


def test_jsonl_text(tmp_path):
    lines = [{"text": "a long document. " * 50}, {"text": "  "}, {"title": "no text"}]
    manifest = write_shards(jsonl_text(write_jsonl(tmp_path / "t.jsonl", lines)), tmp_path / "out")
    assert manifest["samples"] == 1 and manifest["skipped_counts"] == {"empty_sample": 2}
    assert decode_sample(read_all(tmp_path / "out")[0]) == ["a long document. " * 50]


def test_cli(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "doc one"}, {"text": "doc two"}])
    run = [sys.executable, "-m", "data_pipelines.shards"]
    assert "img2dataset" in subprocess.run(run + ["--help"], capture_output=True, text=True, check=True).stdout
    main(["text", str(path), "--out", str(tmp_path / "out"), "--maxcount", "1"])
    assert load_manifest(tmp_path / "out")["samples"] == 2 and len(list((tmp_path / "out").glob("*.tar"))) == 2


def test_an_interrupted_rewrite_keeps_the_old_shard_set_and_the_loader_reads_only_the_manifests(tmp_path):
    """A rewrite killed half-way used to leave new and stale shards that the old manifest still matched,
    and the loader read both: the set is now built aside and renamed into place whole, and a folder's
    shards are those its manifest lists."""
    import warnings

    import pytest

    from data_pipelines.loader import list_shards

    out = tmp_path / "out"
    write_shards(jsonl_text(write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(6)])), out, maxcount=2)

    def killed_half_way():
        yield from jsonl_text(write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(6)]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(killed_half_way(), out, maxcount=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]  # no staging left
    assert sorted(d["txt"] for d in read_all(out)) == [f"a{i}".encode() for i in range(6)]
    (out / "shard-000009.tar").write_bytes((out / "shard-000000.tar").read_bytes())  # another writer's file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shards = list_shards(str(out))
    assert [Path(s).name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert any("not in its manifest" in str(w.message) for w in caught)

"""Each kind of bad input is skipped, counted by reason, warned about once, and the run goes on."""
import io
import logging
import struct
import tarfile
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipelines.errors import BadSample
from data_pipelines.loader import DataConfig, StreamingLoader
from data_pipelines.shards import decode_image
from data_pipelines.tokenizer import ByteTokenizer

from .conftest import TOKENS_PER_IMAGE, png_bytes, text_docs, write_tar

TOK = ByteTokenizer()
GOOD = 6  # good samples per shard; each adds exactly one bos


def run(shards: str, workers: int = 0) -> tuple[StreamingLoader, int]:
    cfg = DataConfig(shards=shards, seq_len=64, batch_size=2, num_workers=workers, shuffle_buffer=4,
                     tokens_per_image=TOKENS_PER_IMAGE, image_size=16)
    loader = StreamingLoader(cfg)
    docs = sum(int((b.input_ids == TOK.bos_id).sum()) for b in loader)
    return loader, docs


def shard_with(tmp_path, bad: dict, name: str = "bad.tar") -> str:
    good = text_docs(GOOD // 2) + [{"__key__": f"img{i}", "png": png_bytes(), "txt": b"a red square"}
                                  for i in range(GOOD // 2)]
    return str(write_tar(tmp_path / name, good[:3] + [{"__key__": "bad", **bad}] + good[3:]))


PNG = png_bytes()
CASES = {
    "corrupt image": ({"png": b"\x89PNG garbage", "txt": b"caption"}, "bad_image"),
    "truncated image": ({"png": PNG[: len(PNG) // 2], "txt": b"caption"}, "bad_image"),
    "missing caption": ({"png": PNG}, "missing_caption"),
    "empty caption": ({"png": PNG, "txt": b"   "}, "missing_caption"),
    "undecodable caption": ({"png": PNG, "txt": b"\xff\xfe\xfa bad utf-8"}, "bad_caption"),
    "bad json": ({"json": b"{not json"}, "bad_json"),
    "json without a layout": ({"json": b'{"hello": 1}'}, "bad_json"),
    "interleaved image missing": ({"json": b'{"pieces": [{"text": "a"}, {"image": "0.png"}]}'}, "missing_image"),
    "empty sample": ({"txt": b""}, "empty_sample"),
    "qa with non-string fields": ({"png": PNG, "json": b'{"question": {"a": 1}, "answer": null}'}, "bad_json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_is_counted_and_skipped(tmp_path, caplog, case):
    fields, reason = CASES[case]
    shard = shard_with(tmp_path, fields)
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        loader, docs = run(shard)
    assert docs == GOOD and loader.skipped == {reason: 1}
    warnings = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(warnings) == 1 and "bad" in warnings[0]  # names the sample key


def test_warned_once_per_reason_but_all_counted(tmp_path, caplog):
    bad = [{"__key__": f"bad{i}", "png": b"junk", "txt": b"x"} for i in range(5)]
    shard = str(write_tar(tmp_path / "s.tar", text_docs(GOOD) + bad))
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        loader, docs = run(shard)
    assert docs == GOOD and loader.skipped == {"bad_image": 5}
    assert len([r for r in caplog.records if "bad_image" in r.getMessage()]) == 1


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    full = write_tar(tmp_path / "full.tar", text_docs(40))
    data = full.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    good = write_tar(tmp_path / "good.tar", text_docs(GOOD, start=100))
    loader, docs = run(f"{tmp_path}/cut.tar::{good}")
    assert loader.skipped == {"truncated_shard": 1}
    assert GOOD + 15 <= docs < GOOD + 40


def test_zero_byte_and_missing_shards(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    good = write_tar(tmp_path / "good.tar", text_docs(GOOD))
    loader, docs = run(f"{tmp_path}/empty.tar::{tmp_path}/missing.tar::{good}")
    assert docs == GOOD and loader.skipped == {"missing_shard": 1, "unreadable_shard": 1}


def test_counts_come_back_from_workers(tmp_path):
    for i in range(2):  # one bad sample per shard, one shard per worker
        shard_with(tmp_path, {"png": b"junk", "txt": b"x"}, name=f"s{i}.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    loader, docs = run(str(tmp_path), workers=2)
    assert docs == 2 * GOOD and loader.skipped == {"bad_image": 2, "unreadable_shard": 1}
    assert loader.state_dict()["past_skipped"] == loader.skipped  # kept across epochs and in checkpoints


def test_duplicate_key_skips_that_sample_and_reads_on(tmp_path):
    docs_in = text_docs(100)
    dup = {"__key__": docs_in[49]["__key__"], "txt": b"id=999999; the same key again"}
    shard = str(write_tar(tmp_path / "dup.tar", docs_in[:50] + [dup] + docs_in[50:]))
    loader, docs = run(shard)
    assert docs == 99 and loader.skipped == {"duplicate_key": 1}  # only the ambiguous sample 49 is gone
    first = str(write_tar(tmp_path / "dup0.tar", [docs_in[0], {**docs_in[0]}] + docs_in[1:10]))
    loader, docs = run(first)  # at the start of a shard
    assert docs == 9 and loader.skipped == {"duplicate_key": 1}


def caption_first_tar(path, n: int):
    """n caption samples, each written caption first, then image (as other writers may order them)."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("txt", f"id={i:06d}; caption".encode()), ("png", png_bytes())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("where", ["inside a header", "at a member boundary"])
def test_shard_cut_at_a_header_is_counted_and_its_last_sample_dropped(tmp_path, where):
    full = caption_first_tar(tmp_path / "full.tar", 10)
    with tarfile.open(full) as tar:
        last = tar.getmembers()[-1]  # the image of the last sample, after its caption
    assert last.name.endswith(".png")
    cut = last.offset + (100 if where == "inside a header" else 0)
    (tmp_path / "cut.tar").write_bytes(full.read_bytes()[:cut])
    loader, docs = run(str(tmp_path / "cut.tar"))
    assert loader.skipped == {"truncated_shard": 1}
    assert docs == 9  # the last sample lost its image: its caption is not trained as a text-only document
    loader, docs = run(str(full))
    assert docs == 10 and loader.skipped == {}


def test_sixteen_bit_png_keeps_its_grey_levels():
    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    rgb = np.asarray(decode_image(buf.getvalue()))
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 127.5) < 1  # convert("RGB") gave 254 (clipped)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is a 1x1 image's): Pillow reads the size only."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def test_image_over_the_pixel_limit_is_skipped_before_decoding(tmp_path):
    big = png_claiming(12000, 12000)  # 144 MP in a few bytes: below Pillow's own 179 MP refusal
    t0 = time.perf_counter()
    with pytest.raises(BadSample) as e:
        decode_image(big)
    assert e.value.reason == "image_too_large" and "144.0 MP" in str(e.value) and time.perf_counter() - t0 < 0.5
    shard = shard_with(tmp_path, {"png": big, "txt": b"a huge image"})
    loader, docs = run(shard)
    assert docs == GOOD and loader.skipped == {"image_too_large": 1}
    cfg = DataConfig(shards=shard, seq_len=64, batch_size=2, num_workers=0, tokens_per_image=TOKENS_PER_IMAGE,
                     image_size=16, max_image_pixels=100)  # the 16x16 images of the good samples too
    loader = StreamingLoader(cfg)
    list(loader)
    assert loader.skipped == {"image_too_large": GOOD // 2 + 1}

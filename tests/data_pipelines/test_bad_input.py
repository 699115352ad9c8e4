"""Each kind of bad input is skipped, counted by reason, warned about once, and the run goes on."""
import logging

import pytest

from data_pipelines.loader import DataConfig, StreamingLoader
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

"""Weighted mixtures of shard sets (data.mixture): proportions, per-source ids and skip counts, exact resume."""
import copy
import itertools

import pytest
import torch

from cmoe_vlm.config import ConfigError, from_dict
from data_pipelines.loader import DataConfig, MixtureSource, StreamingLoader

from .conftest import TOKENS_PER_IMAGE, text_docs, write_tar


def sources(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for k in range(4):
        write_tar(a / f"{k}.tar", text_docs(25, 1000 * k))
        write_tar(b / f"{k}.tar", text_docs(25, 500000 + 1000 * k))
    write_tar(b / "bad.tar", [{"__key__": "000000000", "png": b"not an image", "txt": b"caption"}])
    return a, b


def config(tmp_path, workers=0, **kw):
    a, b = sources(tmp_path)
    return DataConfig(mixture=[MixtureSource(str(a), 3.0, "a"), MixtureSource(str(b), 1.0, "b")], seq_len=64,
                      batch_size=4, num_workers=workers, shuffle_buffer=10, tokens_per_image=TOKENS_PER_IMAGE,
                      image_size=32, **kw)


def take(loader, n):
    it = iter(loader)
    out = list(itertools.islice(it, n))
    del it  # stops the workers
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_documents_follow_the_weights_and_resume_exactly(tmp_path, workers):
    cfg = config(tmp_path, workers)
    full = take(StreamingLoader(cfg), 30)
    starts = torch.stack([b.layout.starts & (b.source_ids >= 0) for b in full])
    ids = torch.stack([b.source_ids for b in full])
    a, b = int((starts & (ids == 0)).sum()), int((starts & (ids == 1)).sum())
    assert 0.6 < a / (a + b) < 0.9  # weights 3 : 1
    assert all(((b_.source_ids == -1) == (b_.doc_ids == -1)).all() for b_ in full)
    first = StreamingLoader(cfg)
    head = take(first, 11)  # rows split documents across batches: a pending document is re-read on resume
    state = copy.deepcopy(first.state_dict())
    resumed = StreamingLoader(cfg)
    assert resumed.load_state_dict(state)
    tail = take(resumed, 19)
    for x, y in zip(head + tail, full):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.source_ids, y.source_ids)
    assert {k.split(":")[0] for k in resumed.skipped} == {"b"}  # the bad sample counted under its source


def test_mixture_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="weight"):
        MixtureSource("x", 0.0)
    with pytest.raises(ConfigError, match="exclusive"):
        DataConfig(shards="x", mixture=[MixtureSource("y")])
    with pytest.raises(ConfigError, match="distinct"):
        DataConfig(mixture=[MixtureSource("x", name="s"), MixtureSource("y", name="s")])
    cfg = from_dict(DataConfig, {"mixture": [{"shards": "x", "weight": 2}, {"shards": "y"}]})
    assert [s.name for s in cfg.mixture] == ["source0", "source1"] and cfg.infinite
    with pytest.raises(ConfigError, match=r"data.mixture\[1\].shards"):
        StreamingLoader(DataConfig(mixture=[MixtureSource(str(sources(tmp_path)[0])), MixtureSource(str(tmp_path / "none"))],
                                   tokens_per_image=4, image_size=8))

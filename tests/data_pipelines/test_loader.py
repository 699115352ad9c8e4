import copy
import dataclasses
import itertools
import re

import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm.config import ConfigError, from_dict
from data_pipelines.loader import DataConfig, StreamingLoader, default_image_transform
from data_pipelines.tokenizer import ByteTokenizer

from .conftest import TOKENS_PER_IMAGE, check_batch, text_docs, write_tar

TOK = ByteTokenizer()


def config(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), seq_len=256, batch_size=3, num_workers=0, shuffle_buffer=20,
                tokens_per_image=TOKENS_PER_IMAGE, image_size=32)
    return DataConfig(**{**base, **kw})


def same(a: list[Batch], b: list[Batch]) -> bool:
    def equal(x, y) -> bool:
        if dataclasses.is_dataclass(x):
            return type(x) is type(y) and all(equal(getattr(x, f.name), getattr(y, f.name))
                                              for f in dataclasses.fields(x))
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))


def stream_ids(batches: list[Batch]) -> list[int]:
    """Document ids ('id=NNNNNN;') in a single-worker stream: rows concatenated in order."""
    text = TOK.decode([t for b in batches for row, doc in zip(b.input_ids, b.doc_ids)
                       for t in row[doc >= 0].tolist()])
    return [int(m) for m in re.findall(r"id=(\d{6});", text)]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_obey_the_contract(builtin_dirs, workers):
    # loss on every text token: the contract's label rule (answers-only masks: tests/data_pipelines/test_answers.py)
    cfg = config(builtin_dirs["train"], num_workers=workers, loss_on="all")
    batches = list(StreamingLoader(cfg))
    for b in batches:
        check_batch(b, TOK, TOKENS_PER_IMAGE, cfg.seq_len)
        assert b.images.shape[2:] == (32, 32)
        assert not len(b.images) or -1.0 <= b.images.min() <= b.images.max() <= 1.0
    assert sum(b.num_images.sum().item() for b in batches) > 100
    bos = sum((b.input_ids == TOK.bos_id).sum().item() for b in batches)
    assert bos == 300  # each of the 300 samples exactly once per epoch


def test_epoch_covers_every_sample_once_and_reshuffles(tmp_path):
    for s in range(4):
        write_tar(tmp_path / f"shard-{s}.tar", text_docs(25, start=25 * s))
    loader = StreamingLoader(config(tmp_path))
    first, second = stream_ids(list(loader)), stream_ids(list(loader))
    assert sorted(first) == sorted(second) == list(range(100))
    assert first != second and loader.epoch == 2


def test_brace_pattern_and_pipe_urls(tmp_path):
    for s in range(2):
        write_tar(tmp_path / f"shard-{s}.tar", text_docs(10, start=10 * s))
    brace = stream_ids(list(StreamingLoader(config(f"{tmp_path}/shard-{{0..1}}.tar", shuffle_buffer=0, seed=3))))
    pipe = stream_ids(list(StreamingLoader(config(f"pipe:cat {tmp_path}/shard-{{0..1}}.tar", shuffle_buffer=0, seed=3))))
    assert sorted(brace) == list(range(20)) and pipe == brace


def test_ranks_see_disjoint_samples_and_run_the_same_steps(tmp_path):
    for s in range(5):  # 5 shards over 2 ranks: 3 and 2 shards per pass
        write_tar(tmp_path / f"shard-{s}.tar", text_docs(20, start=20 * s))
    cfg = config(tmp_path, steps_per_epoch=2, batch_size=2)  # ~20 docs per rank: within one pass
    per_rank = [list(StreamingLoader(cfg, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]
    seen = [set(stream_ids(b)) for b in per_rank]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    long = [list(itertools.islice(StreamingLoader(cfg, rank=r, world_size=2), 2)) for r in range(2)]
    assert same(long[0], per_rank[0])
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        StreamingLoader(config(tmp_path), rank=0, world_size=2)


def take(loader: StreamingLoader, n: int) -> list[dict]:
    """The next n batches, crossing epochs."""
    out: list[dict] = []
    for _ in range(n + 1):
        out += itertools.islice(iter(loader), n - len(out))
        if len(out) == n:
            return out
    raise AssertionError(f"only {len(out)} of {n} batches")


def resume_check(cfg, epochs: int, stop: int, transform=None) -> None:
    """Uninterrupted run vs. a run stopped after `stop` batches and resumed in a new loader."""
    full = StreamingLoader(cfg, image_transform=transform)
    expected = [b for _ in range(epochs) for b in full]
    first = StreamingLoader(cfg, image_transform=transform)
    head = take(first, stop)
    state = copy.deepcopy(first.state_dict())
    resumed = StreamingLoader(cfg, image_transform=transform)
    resumed.load_state_dict(state)
    tail = take(resumed, len(expected) - stop)
    assert same(head + tail, expected)
    assert (resumed.epoch, resumed.step) == (full.epoch, full.step)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_finite_epochs(builtin_dirs, workers):
    cfg = config(builtin_dirs["heldout"], num_workers=workers, seq_len=128)  # shards of 50 and 10: uneven workers
    epoch_len = len(list(StreamingLoader(cfg)))
    resume_check(cfg, epochs=2, stop=7)
    resume_check(cfg, epochs=2, stop=epoch_len)  # saved right at the end of an epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_step_mode_across_passes(builtin_dirs, workers):
    cfg = config(builtin_dirs["heldout"], num_workers=workers, steps_per_epoch=9, seq_len=128)
    resume_check(cfg, epochs=3, stop=13)  # 60 samples, 2 shards: workers wrap into new passes


def noisy_transform(img) -> torch.Tensor:
    """A random augmentation: exact resume must still hold."""
    return default_image_transform(32)(img) + 0.1 * torch.randn(3, 32, 32)


def test_exact_resume_with_random_augmentation(builtin_dirs):
    cfg = config(builtin_dirs["heldout"], num_workers=2, steps_per_epoch=5, seq_len=128)
    rng_before = torch.random.get_rng_state()
    resume_check(cfg, epochs=2, stop=3, transform=noisy_transform)
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_resampled_mode_is_infinite_and_resumable(tmp_path):
    for s in range(3):
        write_tar(tmp_path / f"shard-{s}.tar", text_docs(10, start=10 * s))
    cfg = config(tmp_path, resampled=True, steps_per_epoch=5, batch_size=2)
    loader = StreamingLoader(cfg)
    batches = [b for _ in range(4) for b in loader]
    assert len(batches) == 20 and len(stream_ids(batches)) > 30  # more than the 30 samples: resampling
    resume_check(cfg, epochs=4, stop=6)


def test_resume_rejects_a_different_setup(builtin_dirs):
    state = StreamingLoader(config(builtin_dirs["train"])).state_dict()
    other = StreamingLoader(config(builtin_dirs["train"], num_workers=2))
    with pytest.raises(ConfigError, match="num_workers"):
        other.load_state_dict(state)


def test_config_from_yaml_data_names_the_field(tmp_path):
    cfg = from_dict(DataConfig, {"shards": str(tmp_path), "seq_len": 64, "steps_per_epoch": None})
    assert cfg.steps_per_epoch is None
    with pytest.raises(ConfigError, match="seq_len"):
        from_dict(DataConfig, {"shards": "x", "seq_len": 10, "tokens_per_image": 16})
    with pytest.raises(ConfigError, match="shuffle_bufer"):
        from_dict(DataConfig, {"shards": "x", "shuffle_bufer": 10})
    with pytest.raises(ConfigError, match="shards"):
        StreamingLoader(config(tmp_path))  # an empty folder
    write_tar(tmp_path / "only.tar", text_docs(3))
    with pytest.raises(ConfigError, match="num_workers"):
        StreamingLoader(config(tmp_path, num_workers=2, steps_per_epoch=5))


def test_folders_and_globs_expand_inside_a_list(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "empty").mkdir()
    for s in range(2):
        write_tar(tmp_path / "a" / f"shard-{s}.tar", text_docs(10, start=10 * s))
    write_tar(tmp_path / "b" / "shard-0.tar", text_docs(10, start=20))
    mixed = StreamingLoader(config(f"{tmp_path / 'a'}::{tmp_path / 'b'}/*.tar"))
    assert sorted(stream_ids(list(mixed))) == list(range(30)) and mixed.skipped == {}
    for spec, part in ((f"{tmp_path / 'a'}::{tmp_path / 'empty'}", tmp_path / "empty"),
                       (f"{tmp_path / 'a'}::{tmp_path}/b/*.tgz", f"{tmp_path}/b/*.tgz"),
                       (str(tmp_path / "nothing-{0..3}.tar"), tmp_path / "nothing-{0..3}.tar")):
        with pytest.raises(ConfigError, match=f"data.shards: .*{re.escape(str(part))}.* matches no shard"):
            StreamingLoader(config(spec))

"""Shared fixtures: small built-in shards, hand-made tar shards, and the batch-contract checker."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from cmoe_base import IGNORE_INDEX, Batch
from data_pipelines.builtin import write_builtin_dataset

TOKENS_PER_IMAGE = 16


@pytest.fixture(scope="session")
def builtin_dirs(tmp_path_factory) -> dict[str, Path]:
    """300 train / 60 held-out built-in samples in shards of 50."""
    return write_builtin_dataset(tmp_path_factory.mktemp("builtin"), num_train=300, num_heldout=60,
                                 maxcount=50, text_chars=600)


def png_bytes(colour=(200, 30, 30), size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A tar shard of the given samples ({'__key__': ..., ext: bytes})."""
    with wds.TarWriter(str(path), mtime=0.0) as w:
        for s in samples:
            w.write(s)
    return path


def text_docs(n: int, start: int = 0) -> list[dict]:
    """Text-only samples whose text begins with a unique id 'id=NNNNNN;'."""
    return [{"__key__": f"{i:09d}", "txt": f"id={i:06d}; some filler text for document {i}.".encode()}
            for i in range(start, start + n)]


def check_batch(batch: Batch, tok, tokens_per_image: int, seq_len: int) -> None:
    """Assert every rule of the packed-batch contract (packing.py and cmoe_base/batch.py docstrings)."""
    assert isinstance(batch, Batch)
    ids, mod, doc, lab = batch.input_ids, batch.modality, batch.doc_ids, batch.labels
    B, T = ids.shape
    assert batch.image_tokens == int((mod == 1).sum())
    layout = batch.layout
    assert len(layout.lengths) == B and all(n > 0 for row in layout.lengths for n in row)
    for b in range(B):  # the host lengths say what the device ids say; positions restart per document
        want = [d for d, n in enumerate(layout.lengths[b]) for _ in range(n)]
        assert doc[b].tolist() == want + [-1] * (T - len(want))
        pos = [p for n in layout.lengths[b] for p in range(n)] + list(range(T - len(want)))
        assert layout.positions[b].tolist() == pos
        assert layout.starts[b].tolist() == [p == 0 for p in pos]
    assert T == seq_len and mod.shape == doc.shape == lab.shape == (B, T)
    assert all(t.dtype == torch.long for t in (ids, mod, doc, lab, batch.num_images))
    assert batch.images.shape[0] * tokens_per_image == int((mod == 1).sum())
    assert batch.images.shape[1] == 3 and batch.images.dtype == torch.float32
    assert batch.num_images.shape == (B,) and int(batch.num_images.sum()) == batch.images.shape[0]
    for b in range(B):
        i, m, d, lb = ids[b].tolist(), mod[b].tolist(), doc[b].tolist(), lab[b].tolist()
        assert int(batch.num_images[b]) * tokens_per_image == sum(m)
        n = d.index(-1) if -1 in d else T
        assert all(x == -1 for x in d[n:]), "padding only at the row end"
        assert all(i[t] == tok.pad_id and m[t] == 0 for t in range(n, T))
        assert d[0] == 0 and all(d[t + 1] - d[t] in (0, 1) for t in range(n - 1)), "doc ids 0, 1, 2, ..."
        for t in range(T):
            same = t + 1 < T and d[t] >= 0 and d[t + 1] == d[t]
            assert lb[t] == (i[t + 1] if same and m[t + 1] == 0 else IGNORE_INDEX), (b, t)
        t = 0
        while t < n:  # every image block is whole: <img_start> <image>*k <img_end> in one document
            if i[t] == tok.img_start_id:
                end = t + tokens_per_image + 1
                assert i[end] == tok.img_end_id and m[end] == 0 and m[t] == 0
                assert all(x == 1 for x in m[t + 1:end]) and all(x == tok.image_id for x in i[t + 1:end])
                assert len(set(d[t:end + 1])) == 1
                t = end + 1
            else:
                assert m[t] == 0 and i[t] != tok.image_id
                t += 1

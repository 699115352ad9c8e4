"""Safetensors files read and written one tensor at a time, so a conversion holds one layer, not a model.

    source = TensorSource.open(folder)            # model.safetensors, or the shards of its index
    shapes = {name: source.meta(name) for name in source.names}   # meta tensors: shape and dtype only
    with SafetensorsWriter(out / "model.safetensors", layout) as w:
        w.write(name, tensor)                     # in layout order

`stream_convert` runs a list of `Rule`s (an output tensor = a function of some input tensors) over a
source into a writer: first on meta tensors, which checks every shape and lays out the file, then on
the data, one output at a time. Reads go through plain file reads into fresh tensors (no mmap): the
process's resident memory is the tensors it holds, whatever the checkpoint's size. The format is
safetensors' own (8-byte little-endian header length, a JSON header of dtype, shape and data
offsets, then the raw bytes), read with the checks its reference loader makes; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class TensorFileError(ValueError):
    """A safetensors file or index that cannot be read as one."""


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors of one safetensors file (name -> Entry) and its `__metadata__`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise TensorFileError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise TensorFileError(f"{path}: not a safetensors file (header length {n} of a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise TensorFileError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: the safetensors header is a {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    checked = {name: _header_entry(path, name, info) for name, info in header.items()}
    entries, end = {}, 0
    for name, (dtype, shape, lo, hi) in sorted(checked.items(), key=lambda kv: kv[1][2]):
        numel = 1
        for s in shape:
            numel *= s
        if lo != end or hi - lo != numel * dtype.itemsize or 8 + n + hi > size:
            raise TensorFileError(f"{path}: tensor {name}'s data offsets {lo}..{hi} do not fit its shape {shape} "
                                  f"and {dtype}, or the file (truncated?)")
        entries[name] = Entry(path, dtype, shape, 8 + n + lo, hi - lo)
        end = hi
    return entries, meta


def _is_ints(value: object, length: int | None = None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and \
        all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def _header_entry(path: Path, name: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, each field checked."""
    if not isinstance(info, dict):
        raise TensorFileError(f"{path}: header entry {name!r} is a {type(info).__name__}, not an object")
    dtype = DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise TensorFileError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}; supported: {', '.join(DTYPES)}")
    if not _is_ints(info.get("shape")) or not _is_ints(info.get("data_offsets"), 2):
        raise TensorFileError(f"{path}: tensor {name}: shape and data_offsets must be lists of non-negative "
                              f"integers, got {info.get('shape')!r} and {info.get('data_offsets')!r}")
    lo, hi = info["data_offsets"]
    return dtype, tuple(info["shape"]), lo, hi


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a TensorFileError naming the file otherwise."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorFileError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise TensorFileError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def link_root(folder: Path) -> Path:
    """Where files of `folder` may point through symlinks: the folder itself, or for a Hugging Face
    hub-cache snapshot (`models--X/snapshots/REV/`, files linked to `../../blobs/`) the repo's cache."""
    real = folder.resolve()
    return real.parent.parent if real.parent.name == "snapshots" else real


def confined(folder: Path, name: str, what: str = "file") -> Path:
    """`folder / name` for a relative `name` that stays in the folder (links may lead into `link_root`)."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise TensorFileError(f"{folder}: {what} {name!r} is not a file inside the folder")
    path = folder / rel
    real, root = path.resolve(), link_root(folder)
    if root not in real.parents:
        raise TensorFileError(f"{path}: a link out of the folder ({real}): refused")
    if not real.is_file():
        raise TensorFileError(f"{path}: {what} is missing or not a regular file")
    return path


class TensorSource:
    """The tensors of a checkpoint folder (one file, or the shards an index names), loaded on demand."""

    def __init__(self, entries: dict[str, Entry]):
        self.entries = entries
        self._file: tuple[Path, object] | None = None  # the last file read, kept open
        self._last: tuple[str, torch.Tensor] | None = None  # the last tensor read (rules splitting one tensor)

    @classmethod
    def open(cls, folder: str | Path) -> TensorSource:
        """model.safetensors if the folder has one (what transformers loads first), else the shards of its index."""
        folder = Path(folder)
        index, weight_map = folder / INDEX, None
        if (folder / "model.safetensors").exists():
            files = ["model.safetensors"]
        elif index.is_file():
            weight_map = read_json(index).get("weight_map") or {}
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TensorFileError(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            if not files:
                raise TensorFileError(f"{index}: its weight_map is empty")
        else:
            raise TensorFileError(f"{folder}: no model.safetensors or {INDEX}")
        entries: dict[str, Entry] = {}
        for name in files:
            found, _ = read_header(confined(folder, name, "shard" if weight_map is not None else "weights file"))
            entries.update(found)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(entries))
            if missing:
                raise TensorFileError(f"{index}: tensors listed but not in their shards: {missing[:5]}")
        return cls(entries)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def meta(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return torch.empty(e.shape, dtype=e.dtype, device="meta")

    def load(self, name: str) -> torch.Tensor:
        """The tensor `name`, read from its file (or kept from the previous call: several rules in a row
        may each take a slice of one stacked tensor)."""
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        e = self.entries[name]
        if self._file is None or self._file[0] != e.path:
            self.close()
            self._file = (e.path, open(e.path, "rb"))
        f = self._file[1]
        out = torch.empty(e.shape, dtype=e.dtype)
        f.seek(e.start)
        if e.nbytes and f.readinto(out.view(-1).view(torch.uint8).numpy()) != e.nbytes:
            raise TensorFileError(f"{e.path}: tensor {name} is cut short")
        self._last = (name, out)
        return out

    def close(self) -> None:
        self._last = None
        if self._file is not None:
            self._file[1].close()
            self._file = None


class SafetensorsWriter:
    """Writes a safetensors file whose tensors' names, dtypes and shapes are known in advance
    (`layout`, in file order), one tensor at a time; the file appears at `path` when all are written."""

    def __init__(self, path: str | Path, layout: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.layout = layout
        header, offset = {}, 0
        for name, t in layout.items():
            nbytes = t.numel() * t.dtype.itemsize
            header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.pending = list(layout)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self.pending or name != self.pending[0]:
            raise ValueError(f"{self.path}: wrote {name}, expected {self.pending[0] if self.pending else 'nothing'}")
        want = self.layout[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ValueError(f"{self.path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, laid out as "
                             f"{tuple(want.shape)} {want.dtype}")
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            self.f.write(data.view(-1).view(torch.uint8).numpy().data)
        self.pending.pop(0)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.f.close()
        if exc_type is not None or self.pending:
            self.tmp.unlink(missing_ok=True)
            if exc_type is None:
                raise ValueError(f"{self.path}: {len(self.pending)} tensors never written ({self.pending[:3]})")
            return
        umask = os.umask(0)  # the mode an ordinary file gets, as config.json
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        self.tmp.replace(self.path)


@dataclass(frozen=True)
class Rule:
    """One output tensor: `fn` of the input tensors `inputs` (in that order)."""
    output: str
    inputs: tuple[str, ...]
    fn: Callable[[Sequence[torch.Tensor]], torch.Tensor]


def stream_convert(source: TensorSource, rules: Iterable[Rule], path: str | Path,
                   expected: dict[str, torch.Size] | None = None, dtype: torch.dtype | None = None,
                   extra: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None,
                   source_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """Write every rule's output (cast to `dtype` if given) and the `extra` tensors into the safetensors
    file `path`, one at a time. `source_shapes` (input name -> shape) and `expected` (output name ->
    shape) are checked on meta tensors before any data is read; a tensor holding NaN or inf is refused
    as it is read. Returns the bytes of tensor data written."""
    rules = list(rules)
    wrong = [(n, source.entries[n].shape, tuple(shape)) for n, shape in (source_shapes or {}).items()
             if n in source and source.entries[n].shape != tuple(shape)]
    if wrong:
        raise TensorFileError("tensor shapes do not match the checkpoint's config: " + ", ".join(
            f"{n} is {have}, its config says {want}" for n, have, want in wrong[:3]))
    layout: dict[str, torch.Tensor] = {}
    for rule in rules:
        missing = [n for n in rule.inputs if n not in source]
        if missing:
            raise TensorFileError(f"the checkpoint has no tensor {missing[0]} (needed for {rule.output})")
        out = rule.fn([source.meta(n) for n in rule.inputs])
        if expected is not None and out.shape != expected[rule.output]:
            raise TensorFileError(f"{rule.output}: the checkpoint gives shape {tuple(out.shape)} "
                                  f"(from {', '.join(rule.inputs[:2])}{', ...' if len(rule.inputs) > 2 else ''}), "
                                  f"its config {tuple(expected[rule.output])}")
        layout[rule.output] = out.to(dtype) if dtype is not None else out
    for name, t in (extra or {}).items():
        layout[name] = t
    with SafetensorsWriter(path, layout, metadata) as writer:
        for rule in rules:
            out = rule.fn([source.load(n) for n in rule.inputs])
            if out.is_floating_point() and not bool(torch.isfinite(out).all()):
                raise TensorFileError(f"{rule.output}: NaN or inf in the checkpoint's {', '.join(rule.inputs[:2])}"
                                      f"{', ...' if len(rule.inputs) > 2 else ''}")
            writer.write(rule.output, out.to(dtype) if dtype is not None else out)
            del out
        for name, t in (extra or {}).items():
            writer.write(name, t)
    source.close()
    return sum(t.numel() * t.dtype.itemsize for t in layout.values())

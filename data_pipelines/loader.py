"""Streaming loader: webdataset shards → documents → packed rows → batches, with exact resume.

Pipeline order (as open_clip): list shards → shuffle them with a seed from (seed, pass) → split
by rank → split by worker → read tar → shuffle buffer → decode (PIL) → tokenise and build the
sequence (`sequence.build_sequence`) → pack rows (`packing.RowPacker`) → batch. Bad samples and
shards are skipped and counted (`errors.SkipCounter`); `StreamingLoader.skipped` sums them.

A "pass" is one sweep of a worker over its share of a shuffled shard list.
- Finite mode (default): one loader epoch = pass `epoch`; iteration ends when every worker has
  finished; the next `iter()` starts the next epoch with a new shard order.
- Step mode (`steps_per_epoch` set): every rank yields exactly `steps_per_epoch` batches per
  epoch; workers stream on across passes (each pass reshuffled), so ranks with different shard
  counts never wait on one another. Required when world_size > 1 (or use `resampled`).
- Resampled mode: each worker draws shards with replacement (seeded by seed, rank, worker, pass):
  an infinite stream; combine with `steps_per_epoch` to end epochs.

Exact resume. The shuffle buffer is filled from one shard at a time and its random generator is
seeded by (seed, pass, rank, worker, shard index), so replaying a shard from its start reproduces
its sample order; mixing across shards comes from the shard shuffle. A worker's position is
therefore the cursor (pass, shard index, sample index within the shuffled shard) of the next
document, plus a token offset when the packer had split that document. Each worker yields
(batch, state) pairs; the main process keeps the latest state per worker and which worker comes
next (torch's DataLoader takes workers round-robin; a resumed loader rotates worker slots so that
order continues). Replaying skips the samples before the cursor without decoding them, so skip
counts are not counted twice. Resume needs the same seed, world size, rank and num_workers; a position
saved for other shards (or shuffle buffer, or sampling) starts its epoch over on the new stream.

Tars are read by `read_tar` (not webdataset's grouping, which gives up on a shard at a duplicate key):
it also notices an archive cut inside a tar header, which Python's tarfile takes for a normal end.
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from cmoe_base import Batch, ConfigError, check
from data_pipelines.errors import BadSample, SkipCounter, merge_counts
from data_pipelines.packing import RowPacker, collate_rows
from data_pipelines.chat import Chat
from data_pipelines.builtin_sizes import parse_sizes
from data_pipelines.document import LOSS_ON
from data_pipelines.sequence import TokenSequence, build_sequence, image_tokens_of
from data_pipelines.shards import MANIFEST, MAX_IMAGE_PIXELS, decode_sample
from data_pipelines.tokenizer import Tokenizer, load_tokenizer

ImageTransform = Callable[[Any], torch.Tensor]  # PIL image → (3, H, W)
Cursor = tuple[int, int, int]  # (pass, shard index in the worker's plan, sample index in the shard)
MAX_EMPTY_PASSES = 100  # an endless stream gives up after this many passes in a row without a document
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the main process checkpoints on these; workers ignore them


@dataclass
class MixtureSource:
    """One shard set of a weighted mixture (`data.mixture`)."""
    shards: str = ""      # as data.shards
    weight: float = 1.0   # sampling weight: documents are drawn from the sources in these proportions
    name: str = ""        # in logs and skip counts (default: source<i>)

    def __post_init__(self) -> None:
        check(bool(self.shards), "shards", self.shards, "must name shards (as data.shards)")
        check(math.isfinite(self.weight) and self.weight > 0, "weight", self.weight, "must be a finite number > 0")


@dataclass
class DataConfig:
    shards: str = ""  # brace pattern, glob, a folder of *.tar, or pipe: URLs; join several with '::'
    mixture: list[MixtureSource] = field(default_factory=list)  # instead of shards: weighted shard sets
    seq_len: int = 1024
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples; 0 keeps the order within each shard
    seed: int = 0
    resampled: bool = False
    steps_per_epoch: int | None = None
    tokenizer: str = "byte"  # "byte" or a local Hugging Face tokenizer folder
    loss_on: str = "answers"  # answers: LM loss only on answers / assistant turns in documents that have them
                              # (qa, chat), on all text elsewhere; all: every text token (sequence.py). With
                              # "all" the trained VLMs learned no image content (docs/design.md §7b)
    drop_images: bool = False  # ablation: remove every image from the documents (a text-only control)
    # The canvases `cmoe-train --builtin` draws the built-in data on when it writes it (`python -m
    # data_pipelines.builtin --sizes`): "mixed" or "WxH,..." px; null: image_size squares (the default data).
    builtin_sizes: str | None = None
    # Derived from the model (vision input size; image tokens of vision + projector): an experiment
    # fills them in, and a value given here must agree. A loader used on its own sets them.
    image_size: int | None = None
    tokens_per_image: int | None = None  # images at their own size: the most one image may take
    image_token_unit: tuple[int, int] | None = None  # images at their own size (vision.max_pixels): pixels per token
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images: skipped as image_too_large (see shards.py)

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        check(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        check(self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch",
              self.steps_per_epoch, "must be >= 1 or null")
        check(self.image_size is None or self.image_size >= 1, "image_size", self.image_size, "must be >= 1")
        check(self.tokens_per_image is None or self.tokens_per_image >= 1, "tokens_per_image", self.tokens_per_image,
              "must be >= 1")
        check(self.loss_on in LOSS_ON, "loss_on", self.loss_on, f"must be one of {', '.join(LOSS_ON)}")
        check(self.max_image_pixels >= 1, "max_image_pixels", self.max_image_pixels, "must be >= 1")
        if self.builtin_sizes is not None:
            try:
                parse_sizes(self.builtin_sizes, self.image_size or 64)
            except ValueError as e:
                check(False, "builtin_sizes", self.builtin_sizes, f"is not a canvas list: {e}")
        if self.tokens_per_image is not None:
            check(self.seq_len >= self.tokens_per_image + 2, "seq_len", self.seq_len,
                  f"must be >= tokens_per_image + 2 = {self.tokens_per_image + 2} (a whole image block per row)")
        check(not (self.mixture and self.shards), "shards", self.shards,
              "and data.mixture are exclusive: list every shard set in the mixture (with its weight)")
        for i, src in enumerate(self.mixture):
            if not src.name:
                src.name = f"source{i}"
        names = [src.name for src in self.mixture]
        check(len(set(names)) == len(names), "mixture", names, "names must be distinct")

    @property
    def infinite(self) -> bool:
        """Endless streams: resampled shards, fixed epochs, or a mixture (every source loops over its shards)."""
        return self.resampled or self.steps_per_epoch is not None or bool(self.mixture)

    @property
    def sources(self) -> list[MixtureSource]:
        """The shard sets, one without a mixture."""
        return self.mixture or [MixtureSource(self.shards, 1.0, "data")]


def default_image_transform(image_size: int) -> ImageTransform:
    """For a loader used without a model (tests, benchmarks): resize to a square and convert,
    PIL → (3, S, S) in [0, 1], no normalisation. Training passes the vision encoder's own transform
    (`vision.build_image_transform`), whose size and normalisation come from the encoder."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(lambda img: img.convert("RGB")),
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
    ])


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", spec) is not None


def list_shards(spec: str, name: str = "data.shards") -> list[str]:
    """Shard URLs of a spec: '::'-joined parts, each a folder (its *.tar, sorted), a glob (`dir/*.tar`), a
    brace pattern (`shard-{000..009}.tar`) or a pipe:/remote URL. A part that matches no existing shard is
    a ConfigError naming it (`name` is the config field); one missing file in a list of several is
    counted at read time (missing_shard)."""
    check(bool(spec), name, spec, "must name shards: a brace pattern, a folder of *.tar, a glob or pipe: URLs")
    urls: list[str] = []
    for part in spec.split("::"):
        found: list[str] = []
        for url in wds.shardlists.expand_urls(part):
            if _is_url(url):
                found.append(url)
            elif os.path.isdir(url):
                found.extend(folder_shards(url, name))
            elif glob.has_magic(url):
                found.extend(sorted(p for p in glob.glob(url) if os.path.isfile(p)))
            else:
                found.append(url)
        pattern = found != [part]  # a folder, glob or brace pattern rather than one file name
        if (pattern or "::" not in spec) and not any(_is_url(u) or os.path.exists(u) for u in found):
            what = f"part {part!r} of {spec!r}" if "::" in spec else repr(spec)
            raise ConfigError(f"{name}: {what} matches no shard (a folder needs *.tar files; globs and brace "
                              f"patterns must match existing files)")
        urls.extend(found)
    check(any(_is_url(u) or os.path.exists(u) for u in urls), name, spec, "matches no existing shard")
    return urls


def folder_shards(folder: str, name: str = "data.shards") -> list[str]:
    """The shards of a folder: those its manifest.json lists (cmoe-shards writes one), else its *.tar.
    A tar the manifest does not list (left by another writer) is not read, with a warning; a listed one
    that is missing is counted at read time (missing_shard)."""
    tars = sorted(glob.glob(os.path.join(glob.escape(folder), "*.tar")))
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        return tars
    try:
        with open(manifest_path, encoding="utf-8") as f:
            names = [s["path"] for s in json.load(f)["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{name}: {manifest_path} is not a shard manifest ({e})") from None
    if not all(isinstance(n, str) and n == os.path.basename(n) and n not in ("", ".", "..") for n in names):
        raise ConfigError(f"{name}: {manifest_path} lists shards outside its folder: {names[:3]}")
    listed = [os.path.join(folder, n) for n in names]
    extra = sorted(set(tars) - set(listed))
    if extra:
        warnings.warn(f"{name}: {len(extra)} tar file(s) in {folder} are not in its manifest and are not read "
                      f"({os.path.basename(extra[0])}{', ...' if len(extra) > 1 else ''})", stacklevel=3)
    return listed


def check_data(cfg: DataConfig, world_size: int = 1) -> list[list[str]]:
    """The checks that need the file system or the number of processes (run before anything is built):
    the shards exist and can feed every worker of every rank. Returns the shard URLs of each source."""
    check(world_size == 1 or cfg.infinite, "data.steps_per_epoch", cfg.steps_per_epoch,
          "must be set (or resampled: true) when world_size > 1, so that every rank runs the same steps")
    out = []
    for i, src in enumerate(cfg.sources):
        field_name = f"data.mixture[{i}].shards" if cfg.mixture else "data.shards"
        shards = list_shards(src.shards, field_name)
        workers = max(1, cfg.num_workers)
        check(not cfg.infinite or cfg.resampled or len(shards) >= world_size * workers, "data.num_workers",
              cfg.num_workers, f"too many: {len(shards)} shards{f' of {src.name}' if cfg.mixture else ''} cannot feed "
              f"{world_size} processes x {workers} workers in an endless stream (use fewer workers, more shards or "
              f"data.resampled)")
        out.append(shards)
    return out


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records on the archive how reading a header failed: tarfile ends an archive silently on a header
    cut short or corrupt, exactly as on the end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.end_reason = e
            raise


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream; raises tarfile.ReadError after the last
    complete member when the archive does not end with its end-of-archive block."""
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
    tar.end_reason = None
    for info in tar:
        if info.isreg() and not re.match(r"__[^/]*__($|/)", info.name):
            yield info.name, tar.extractfile(info).read()
        tar.members = []  # a stream has no random access: keep no index
    if not isinstance(tar.end_reason, tarfile.EOFHeaderError):
        reason = "ends without its end-of-archive block" if isinstance(tar.end_reason, tarfile.EmptyHeaderError) \
            else f"{tar.end_reason or 'bad header'} at byte {tar.offset}"
        raise tarfile.ReadError(f"truncated: {reason}")


def read_tar(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples ({'__key__', ext: bytes, ...}) of one tar shard, in file order. A key whose members
    repeat becomes one `__skip__` sample (duplicate_key) and reading goes on; the sample in progress
    when the archive turns out truncated is not yielded (it may have lost members)."""
    stream = wds.gopen(url, "rb")
    sample: dict[str, Any] | None = None
    try:
        for name, data in tar_members(stream):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            ext = ext.lower()
            if ext in sample and "__skip__" not in sample:
                sample = {"__key__": key, "__url__": url, "__skip__": ("duplicate_key", f"{name} appears twice")}
            elif "__skip__" not in sample:
                sample[ext] = data
        if sample is not None:
            yield sample
    finally:
        stream.close()


def shuffled_shard(url: str, rng: random.Random, buffer_size: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples of one shard through a shuffle buffer; a shard error is counted after its samples."""
    buffer: list[dict[str, Any]] = []
    error: BadSample | None = None
    read = 0
    try:
        for raw in read_tar(url):
            read += 1
            buffer.append(raw)
            if len(buffer) > buffer_size:
                yield _pop_random(buffer, rng)
    except FileNotFoundError as e:
        error = BadSample("missing_shard", str(e))
    except (tarfile.TarError, OSError, ValueError) as e:
        error = BadSample("unreadable_shard" if read == 0 else "truncated_shard", f"{type(e).__name__}: {e}")
    while buffer:
        yield _pop_random(buffer, rng)
    if error is not None:
        counter.skip(error.reason, url, error.detail)


def _pop_random(buffer: list[Any], rng: random.Random) -> Any:
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


class WorkerStream:
    """The documents and batches of one (rank, worker): deterministic from its cursor."""

    def __init__(self, cfg: DataConfig, shards: list[str], tokenizer: Tokenizer, transform: ImageTransform,
                 rank: int, world_size: int, worker: int, num_workers: int, source: int = 0):
        self.cfg, self.shards, self.tokenizer, self.transform = cfg, shards, tokenizer, transform
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers
        self.source = source
        self.seed = cfg.seed if source == 0 else f"{cfg.seed}-source{source}"  # each mixture source its own order

    def plan(self, pass_index: int) -> list[str]:
        """The shards this worker reads in pass `pass_index`, in order."""
        seed = self.seed
        if self.cfg.resampled:
            rng = random.Random(f"{seed}-resample-{pass_index}-{self.rank}-{self.worker}")
            return [rng.choice(self.shards) for _ in range(max(1, len(self.shards) // (self.world_size * self.num_workers)))]
        order = list(self.shards)
        random.Random(f"{seed}-{pass_index}").shuffle(order)
        return order[self.rank::self.world_size][self.worker::self.num_workers]

    def documents(self, cursor: Cursor, counter: SkipCounter) -> Iterator[tuple[Cursor, TokenSequence]]:
        """(cursor, sequence) of every good sample from `cursor` on: one pass, or endless passes."""
        pass_index, shard_index, sample_index = cursor
        empty_passes = 0
        while True:
            plan = self.plan(pass_index)
            found = False
            for s in range(shard_index, len(plan)):
                rng = random.Random(f"{self.seed}-{pass_index}-{self.rank}-{self.worker}-{s}")
                for i, raw in enumerate(shuffled_shard(plan[s], rng, self.cfg.shuffle_buffer, counter)):
                    if i < sample_index:
                        continue  # replaying up to the cursor: no decoding, nothing counted
                    seq = self._build(raw, counter, (pass_index, s, i))
                    if seq is not None:
                        found = True
                        yield (pass_index, s, i), seq
                sample_index = 0
            if not self.cfg.infinite:
                return
            empty_passes = 0 if found else empty_passes + 1
            if empty_passes == MAX_EMPTY_PASSES:
                raise RuntimeError(f"rank {self.rank} worker {self.worker}: no readable sample in {MAX_EMPTY_PASSES} "
                                   f"passes over its shards; skip counts: {counter.as_dict()}")
            pass_index, shard_index = pass_index + 1, 0

    def _build(self, raw: dict[str, Any], counter: SkipCounter, cursor: Cursor) -> TokenSequence | None:
        """Decode, transform images, build the sequence; None (counted) for a bad sample.

        Images are transformed with torch's default CPU generator seeded from (seed, rank, worker,
        cursor), so random augmentations drawn from it repeat exactly on resume; its previous state
        is restored afterwards."""
        try:
            pieces = decode_sample(raw, self.cfg.max_image_pixels)
        except BadSample as e:
            counter.skip(e.reason, f"{raw.get('__url__')}:{raw.get('__key__')}", e.detail)
            return None
        if self.cfg.drop_images:
            pieces = pieces.map_images(lambda _: "") if isinstance(pieces, Chat) else [p for p in pieces if isinstance(p, str)]
        has_images = bool(pieces.images()) if isinstance(pieces, Chat) else any(not isinstance(p, str) for p in pieces)
        if has_images:
            rng = torch.default_generator  # torch.manual_seed would also seed CUDA: 100x slower
            saved = rng.get_state()
            rng.manual_seed(hash((self.seed, self.rank, self.worker, *cursor)) & 0xFFFF_FFFF)
            try:
                if isinstance(pieces, Chat):
                    pieces = pieces.map_images(self.transform)
                else:
                    pieces = [p if isinstance(p, str) else self.transform(p) for p in pieces]
            finally:
                rng.set_state(saved)
        unit = self.cfg.image_token_unit
        seq = build_sequence(pieces, self.tokenizer, image_tokens_of(unit) if unit else self.cfg.tokens_per_image)
        seq.source = self.source
        return seq

    def batches(self, state: dict[str, Any]) -> Iterator[tuple[Batch | None, dict[str, Any]]]:
        """(batch, state after it); ends (finite mode) with (None, final state)."""
        counter = SkipCounter(state["skipped"])
        docs = self.documents(tuple(state["cursor"]), counter)
        packer = RowPacker(self.cfg.seq_len, self.tokenizer.pad_id, self.cfg.loss_on)
        if state["offset"]:
            tag, seq = next(docs)
            if list(tag) != list(state["cursor"]):
                raise RuntimeError(f"cannot resume: the document at {state['cursor']} is gone (found {tag}); "
                                   "have the shards changed?")
            packer.resume_with(tag, seq, state["offset"])
        image_shape = (3, self.cfg.image_size, self.cfg.image_size)
        rows = []

        def snapshot() -> dict[str, Any]:
            if packer.pending is not None:
                (p, s, i), offset = packer.pending
            else:
                (p, s, i), offset = packer.last_tag, 0
                i += 1
            return {"worker": self.worker, "cursor": [p, s, i], "offset": offset, "skipped": counter.as_dict()}

        for row in packer.rows(docs):
            rows.append(row)
            if len(rows) == self.cfg.batch_size:
                yield collate_rows(rows, image_shape), snapshot()
                rows = []
        if rows:
            yield collate_rows(rows, image_shape), snapshot()
        yield None, {**(snapshot() if packer.last_tag is not None else state), "skipped": counter.as_dict()}


class MixtureStream:
    """The documents and batches of one (rank, worker) drawn from a weighted mixture of sources
    (`data.mixture`), each source a `WorkerStream` looping over its own shards. The source of the
    n-th document is drawn from the weights by a generator seeded with (seed, rank, worker, n), so
    the sequence of sources replays exactly from the number of draws. The position: draws so far,
    each source's cursor, and the source of a document the packer had split (re-read first)."""

    def __init__(self, cfg: DataConfig, streams: list[WorkerStream]):
        self.cfg, self.streams = cfg, streams
        self.worker, self.rank = streams[0].worker, streams[0].rank
        total = sum(src.weight for src in cfg.sources)
        self.cumulative = list(itertools.accumulate(src.weight / total for src in cfg.sources))

    def source_of(self, n: int) -> int:
        u = random.Random(f"{self.cfg.seed}-mixture-{self.rank}-{self.worker}-{n}").random()
        return min(bisect.bisect_right(self.cumulative, u), len(self.streams) - 1)

    def batches(self, state: dict[str, Any]) -> Iterator[tuple[Batch | None, dict[str, Any]]]:
        """(batch, state after it), endlessly."""
        names = [src.name for src in self.cfg.sources]
        counters = [SkipCounter(state["skipped_by_source"].get(name, {})) for name in names]
        cursors = [tuple(c) for c in state["cursors"]]
        iters = [stream.documents(c, counters[i]) for i, (stream, c) in enumerate(zip(self.streams, cursors))]
        documents = list(state["documents"])  # per source: documents drawn from it (the realised mixture)
        after = [list(c) for c in cursors]  # per source: the cursor after its last document handed to the packer
        drawn = state["drawn"]

        def handed(src: int, cursor: Cursor, seq: TokenSequence):
            p, sh, i = cursor
            after[src] = [p, sh, i + 1]
            return (src, cursor), seq

        def docs() -> Iterator[tuple[tuple[int, Cursor], TokenSequence]]:
            nonlocal drawn
            if state["offset"]:  # the split document comes back first; its draw is already counted
                src = state["pending"]
                cursor, seq = next(iters[src])
                if list(cursor) != list(cursors[src]):
                    raise RuntimeError(f"cannot resume: the document of {names[src]} at {list(cursors[src])} is gone "
                                       f"(found {list(cursor)}); have the shards changed?")
                yield handed(src, cursor, seq)
            while True:
                src = self.source_of(drawn)
                drawn += 1
                documents[src] += 1
                yield handed(src, *next(iters[src]))

        packer = RowPacker(self.cfg.seq_len, self.streams[0].tokenizer.pad_id, self.cfg.loss_on)
        stream = docs()
        if state["offset"]:
            tag, seq = next(stream)
            packer.resume_with(tag, seq, state["offset"])

        def snapshot() -> dict[str, Any]:
            cursors_now = [list(c) for c in after]
            pending, offset = (None, 0) if packer.pending is None else packer.pending
            if pending is not None:  # split by the packer: re-read from its own cursor
                cursors_now[pending[0]] = list(pending[1])
            skipped = {name: c.as_dict() for name, c in zip(names, counters)}
            return {"worker": self.worker, "drawn": drawn, "cursors": cursors_now,
                    "pending": None if pending is None else pending[0], "offset": offset, "documents": list(documents),
                    "skipped_by_source": skipped,
                    "skipped": {f"{name}:{k}": v for name, counts in skipped.items() for k, v in counts.items()}}

        rows = []
        image_shape = (3, self.cfg.image_size, self.cfg.image_size)
        for row in packer.rows(stream):
            rows.append(row)
            if len(rows) == self.cfg.batch_size:
                yield collate_rows(rows, image_shape), snapshot()
                rows = []
        raise RuntimeError("a mixture stream ended")  # every source loops over its shards forever


def _ignore_stop_signals(_worker_id: int) -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def initial_worker_state(worker: int, pass_index: int, sources: int = 0) -> dict[str, Any]:
    """A worker's position at the start of a pass; with a mixture of `sources`, at the start of each."""
    if sources:
        return {"worker": worker, "drawn": 0, "cursors": [[0, 0, 0]] * sources, "pending": None, "offset": 0,
                "documents": [0] * sources, "skipped_by_source": {}, "skipped": {}}
    return {"worker": worker, "cursor": [pass_index, 0, 0], "offset": 0, "skipped": {}}


class _WorkerDataset(IterableDataset):
    """Runs one WorkerStream per DataLoader worker; slot i plays logical worker (i + rotation) % W."""

    def __init__(self, streams: list[WorkerStream], states: list[dict[str, Any]], rotation: int):
        self.streams, self.states, self.rotation = streams, states, rotation

    def __iter__(self) -> Iterator[tuple[Batch | None, dict[str, Any]]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % len(self.streams)
        return self.streams[worker].batches(self.states[worker])


class StreamingLoader:
    """Iterable of packed batches (see `packing` for the dict) with `state_dict`/`load_state_dict`."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None, image_transform: ImageTransform | None = None,
                 rank: int = 0, world_size: int = 1):
        check(0 <= rank < world_size, "rank", rank, f"must be in [0, world_size = {world_size})")
        for name in ("image_size", "tokens_per_image"):
            check(getattr(cfg, name) is not None, name, None, "is unset: an experiment derives it from the vision "
                  "and projector configs; a loader used on its own must set it")
        shards = check_data(cfg, world_size)  # one list per source
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
        transform = image_transform or default_image_transform(cfg.image_size)
        self.num_streams = max(1, cfg.num_workers)
        # what a saved position refers to: the same shards, buffer and sampling (checked on load)
        mixture = [(src.name, src.weight) for src in cfg.mixture]
        key = (shards[0], cfg.shuffle_buffer, cfg.resampled) if not cfg.mixture else (shards, mixture, cfg.shuffle_buffer,
                                                                                      cfg.resampled)
        self.stream_id = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        per_worker = [[WorkerStream(cfg, urls, self.tokenizer, transform, rank, world_size, w, self.num_streams, i)
                       for i, urls in enumerate(shards)] for w in range(self.num_streams)]
        self.streams = [MixtureStream(cfg, s) if cfg.mixture else s[0] for s in per_worker]
        self.epoch, self.step, self.next_worker = 0, 0, 0
        self.worker_states = self._fresh_states()
        self.past_skipped: dict[str, int] = {}

    def _fresh_states(self) -> list[dict[str, Any]]:
        pass_index = 0 if self.cfg.infinite else self.epoch
        return [initial_worker_state(w, pass_index, len(self.cfg.mixture)) for w in range(self.num_streams)]

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped inputs by reason, summed over workers and epochs (for the training log)."""
        return merge_counts([self.past_skipped] + [s["skipped"] for s in self.worker_states])

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch. Batches are held back by one so that a worker's end marker
        is seen before its last batch is yielded: the state after an epoch's last batch already
        points at the next epoch."""
        dataset = _WorkerDataset(self.streams, [dict(s) for s in self.worker_states], self.next_worker)
        if self.cfg.num_workers == 0:
            source = iter(dataset)
        else:
            # Its own generator: creating workers must not consume the caller's (training) RNG.
            generator = torch.Generator().manual_seed(self.cfg.seed)
            # A scheduler's SIGTERM (scancel, systemd) reaches the whole process group; the main process
            # checkpoints on it, so workers must not die of it. Blocked while they fork (none is killed
            # between fork and its init) and ignored in them.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                source = iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                         generator=generator, worker_init_fn=_ignore_stop_signals))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        held: tuple[Batch, dict[str, Any]] | None = None
        for batch, state in source:
            if batch is None:  # a worker's final state (finite mode)
                if held is not None and held[1]["worker"] == state["worker"]:
                    held = (held[0], state)
                else:
                    self.worker_states[state["worker"]] = state
                continue
            if held is not None:
                epoch = self.epoch
                yield self._advance(*held, last=False)
                if self.epoch != epoch:
                    return
            held = (batch, state)
        if self.cfg.infinite:
            raise RuntimeError("an infinite data stream ended")
        if held is not None:
            yield self._advance(*held, last=True)
        else:
            self._end_epoch()

    def _advance(self, batch: Batch, state: dict[str, Any], last: bool) -> Batch:
        """Account for `batch` (from the worker in `state`) being handed out."""
        self.worker_states[state["worker"]] = state
        self.next_worker = (state["worker"] + 1) % self.num_streams
        self.step += 1
        if last or self.step == self.cfg.steps_per_epoch:
            self._end_epoch()
        return batch

    def _end_epoch(self) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        if not self.cfg.infinite:  # the next epoch is the next pass: workers start over
            self.past_skipped = self.skipped
            self.worker_states, self.next_worker = self._fresh_states(), 0

    def state_dict(self) -> dict[str, Any]:
        """The position as plain data (JSON-able: it is stored in checkpoints without pickling)."""
        return {
            "epoch": self.epoch, "step": self.step, "next_worker": self.next_worker,
            "workers": [dict(s) for s in self.worker_states], "past_skipped": dict(self.past_skipped),
            "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_streams,
            "stream": self.stream_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Continue from a saved position; returns False when the position was saved for another stream
        (other shards, shuffle buffer or sampling): the current epoch then starts over on this one, with the
        epoch count and skip counts kept."""
        for name, mine in (("seed", self.cfg.seed), ("rank", self.rank), ("world_size", self.world_size),
                           ("num_workers", self.num_streams)):
            check(state[name] == mine, f"data.{name}" if name in ("seed", "num_workers") else name, mine,
                  f"must equal the saved loader state's {name} = {state[name]} to resume")
        self.epoch, self.past_skipped = state["epoch"], dict(state["past_skipped"])
        if state.get("stream") != self.stream_id:
            self.past_skipped = merge_counts([self.past_skipped] + [s["skipped"] for s in state["workers"]])
            self.step, self.next_worker, self.worker_states = 0, 0, self._fresh_states()
            return False
        self.step, self.next_worker = state["step"], state["next_worker"]
        self.worker_states = [dict(s) for s in state["workers"]]
        return True

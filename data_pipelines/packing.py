"""Greedy packing of documents into fixed-length rows, and rows into the model's `Batch`.

Rows of `seq_len` tokens are filled with documents in stream order. A document longer than the
space left is split: the part that fits ends the row, the rest starts the next row as a new
document (new doc id, no bos). A split never falls inside an image block (<img_start> ..
<img_end>): it moves to just before the block, and the row is padded at its end.

`collate_rows` builds the `cmoe_base.Batch` (B rows, T = seq_len, N images):
    input_ids  (B, T) int64  image positions hold image_id, padding holds pad_id
    modality   (B, T) int64  Modality codes (0 text, 1 image)
    layout     DocumentLayout: doc_ids (B, T) 0, 1, 2, ... per document in the row, −1 on padding;
               each row's document lengths on the host; document starts and positions (B, T)
    labels     (B, T) int64  already shifted: next token if it is text in the same doc (and a target of
                             its document: `data.loss_on`, sequence.py), else −100
    images     (N, 3, H, W) float  row-major order; their token counts sum to (modality == 1).sum(); of
                             several sizes (vision.max_pixels): padded to the largest, `image_sizes` each one's
    num_images (B,) int64    images per row
    source_ids (B, T) int64  data source of each position (data.mixture; 0 with one source), −1 on padding
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from cmoe_base import Batch, DocumentLayout, Modality, stack_images
from data_pipelines.sequence import TokenSequence, shift_labels


@dataclass
class Row:
    """One packed row under construction (unpadded)."""

    input_ids: list[int] = field(default_factory=list)
    modality: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    doc_lengths: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)  # per token: may carry LM loss (data.loss_on)
    sources: list[int] = field(default_factory=list)  # per token: its document's data source (−1 on padding)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, seq: TokenSequence, start: int, end: int, loss_on: str = "all") -> None:
        """Append tokens [start, end) of `seq` as a new document of this row."""
        self.input_ids.extend(seq.input_ids[start:end])
        self.modality.extend(seq.modality[start:end])
        self.targets.extend(seq.targets(loss_on)[start:end])
        self.sources.extend([seq.source] * (end - start))
        self.images.extend(img for img, (s, _) in zip(seq.images, seq.image_spans) if start <= s < end)
        self.doc_lengths.append(end - start)

    def pad_to(self, length: int, pad_id: int) -> Row:
        n = length - len(self)
        self.input_ids.extend([pad_id] * n)
        self.modality.extend([int(Modality.TEXT)] * n)
        self.targets.extend([False] * n)
        self.sources.extend([-1] * n)
        return self


def split_point(seq: TokenSequence, limit: int) -> int:
    """Largest cut <= limit that does not fall inside an image block."""
    for start, end in seq.image_spans:
        if start < limit < end:
            return start
    return limit


class RowPacker:
    """Turns a stream of (tag, TokenSequence) into full rows; remembers where it stands.

    After each yielded row, `pending` is (tag, offset) of the document whose tokens from `offset`
    on are not yet packed, or None when the document tagged `last_tag` was consumed completely.
    The loader stores these tags (stream positions) to resume exactly.
    """

    def __init__(self, seq_len: int, pad_id: int, loss_on: str = "all"):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.loss_on = loss_on
        self.pending: tuple[Any, int] | None = None
        self.last_tag: Any = None
        self._pending_seq: TokenSequence | None = None

    def resume_with(self, tag: Any, seq: TokenSequence, offset: int) -> None:
        """Start with the remainder (from `offset`) of a document split by an earlier run."""
        self.pending, self._pending_seq = (tag, offset), seq

    def rows(self, docs: Iterator[tuple[Any, TokenSequence]]) -> Iterator[Row]:
        row = Row()
        while True:
            if self.pending is None:
                nxt = next(docs, None)
                if nxt is None:
                    break
                self.pending, self._pending_seq = (nxt[0], 0), nxt[1]
            (tag, offset), seq = self.pending, self._pending_seq
            end = len(seq)
            if end - offset > self.seq_len - len(row):
                end = split_point(seq, offset + self.seq_len - len(row))
                if end == offset and len(row) == 0:
                    raise ValueError(f"an image block of {tag} does not fit in seq_len = {self.seq_len}")
            if end > offset:
                row.add(seq, offset, end, self.loss_on)
            if end == len(seq):
                self.pending, self._pending_seq, self.last_tag = None, None, tag
            else:
                self.pending = (tag, end)
            if end < len(seq) or len(row) == self.seq_len:
                yield row.pad_to(self.seq_len, self.pad_id)
                row = Row()
        if len(row):
            yield row.pad_to(self.seq_len, self.pad_id)


def collate_rows(rows: list[Row], image_shape: tuple[int, int, int]) -> Batch:
    """Stack equal-length rows into a Batch; images must already be tensors (3, H, W)."""
    input_ids = torch.tensor([r.input_ids for r in rows], dtype=torch.long)  # (B, T)
    modality = torch.tensor([r.modality for r in rows], dtype=torch.long)  # (B, T)
    layout = DocumentLayout.from_lengths([r.doc_lengths for r in rows], input_ids.shape[1])
    images = [img for r in rows for img in r.images]
    stacked, sizes = stack_images(images) if images else (torch.zeros(0, *image_shape), None)
    return Batch(
        input_ids=input_ids,
        modality=modality,
        layout=layout,
        labels=shift_labels(input_ids, modality, layout.doc_ids, torch.tensor([r.targets for r in rows], dtype=torch.bool)),
        images=stacked,  # (N, 3, H, W)
        num_images=torch.tensor([len(r.images) for r in rows], dtype=torch.long),  # (B,)
        image_tokens=sum(m for r in rows for m in r.modality),  # Modality.IMAGE is 1, TEXT 0
        source_ids=torch.tensor([r.sources for r in rows], dtype=torch.long),  # (B, T)
        image_sizes=sizes,  # host: each image's (H, W) when they differ
    )


def sequence_batch(seq: TokenSequence, image_shape: tuple[int, int, int]) -> Batch:
    """A batch of one unpadded row holding `seq` alone (evaluation, generation prompts)."""
    row = Row()
    row.add(seq, 0, len(seq))
    return collate_rows([row], image_shape)

"""The packed-batch contract between the data pipeline and the model (docs/design.md §10).

A batch is B rows of T positions. Each row holds whole or split documents back to back from its
start (document ids 0, 1, 2, ...), then padding (id −1) to its end. The packer
(`data_pipelines.packing.collate_rows`) builds it on the host; the model takes it as it is.

    batch = Batch.of(input_ids, doc_ids=doc_ids, labels=labels)   # from tensors (one host read)
    out = model(batch)

`DocumentLayout` is the part attention and positions need: document ids on the device and the
same information on the host (each row's document lengths), so the model arranges attention
without reading the device. A layout is also built at the concept level, from the boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cmoe_base.modality import Modality

IGNORE_INDEX = -100  # label of a position without LM loss (cross-entropy's ignore_index)


def document_index_tensors(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (B, T) -> starts (B, T) bool (a document, or the padding, begins here) and positions
    (B, T) that restart at 0 in every document (and in the padding). Vectorised, no host read."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start_idx = torch.where(starts, idx, 0).cummax(dim=1).values
    return starts, idx - start_idx


@dataclass
class DocumentLayout:
    """Where the documents of B rows of L positions lie (tokens, or concepts at the concept level).

    Rows hold documents 0..n−1 back to back from position 0, then padding (id −1). `lengths` is
    host data: for each row, the lengths of its documents in order (padding = L − their sum).
    `starts` marks the first position of each document (and of the padding), `positions` counts
    from 0 within each (RoPE positions; at the concept level, each concept's token position).
    """
    doc_ids: torch.Tensor                  # (B, L) int64, −1 on padding
    lengths: tuple[tuple[int, ...], ...]   # host: per row, its documents' lengths
    starts: torch.Tensor                   # (B, L) bool
    positions: torch.Tensor                # (B, L) int64

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], length: int) -> DocumentLayout:
        """A layout of rows of `length` positions holding documents of these lengths, on the CPU."""
        rows = []
        for r, docs in enumerate(lengths):
            if sum(docs) > length or any(n <= 0 for n in docs):
                raise ValueError(f"row {r}: document lengths {list(docs)} do not fit {length} positions")
            ids = [d for d, n in enumerate(docs) for _ in range(n)]
            rows.append(ids + [-1] * (length - len(ids)))
        doc_ids = torch.tensor(rows, dtype=torch.long).view(len(rows), length)
        return cls(doc_ids, tuple(tuple(d) for d in lengths), *document_index_tensors(doc_ids))

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> DocumentLayout:
        """The layout of given document ids (B, L); reads them once to the host and checks the
        rule: ids 0, 1, 2, ... in runs from each row's start, then only −1."""
        host = doc_ids.detach().cpu()
        valid = host >= 0
        bad = (host < -1).any(1) | (valid[:, 1:] & ~valid[:, :-1]).any(1)
        step = host[:, 1:] - host[:, :-1]
        bad |= (valid[:, 1:] & ((step < 0) | (step > 1))).any(1) | (valid[:, 0] & (host[:, 0] != 0))
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise ValueError(f"doc_ids row {r} = {host[r].tolist()}: expected documents 0, 1, 2, ... back to back "
                             f"from the row's start, then only padding (−1)")
        lengths = tuple(tuple(torch.bincount(row[row >= 0]).tolist()) for row in host)
        return cls(doc_ids, lengths, *document_index_tensors(doc_ids))

    @classmethod
    def single(cls, batch_size: int, length: int, device: torch.device | str | None = None) -> DocumentLayout:
        """Every row one document of `length` positions."""
        doc_ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        return cls(doc_ids, ((length,),) * batch_size, *document_index_tensors(doc_ids))

    @property
    def single_document(self) -> bool:
        """Every row holds at most one document (then plain causal attention is exact)."""
        return all(len(docs) <= 1 for docs in self.lengths)

    @property
    def valid(self) -> torch.Tensor:
        """(B, L) bool: not padding."""
        return self.doc_ids >= 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc_ids.shape)

    def to(self, device: torch.device | str) -> DocumentLayout:
        return replace(self, doc_ids=self.doc_ids.to(device), starts=self.starts.to(device),
                       positions=self.positions.to(device))


def stack_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[tuple[int, int], ...] | None]:
    """Images (3, H_i, W_i) -> (N, 3, H, W) and their sizes: stacked as they are when all share one
    size (sizes None), else each padded with zeros at its bottom and right to the largest H and W
    (sizes: each image's (H_i, W_i), host)."""
    shapes = {tuple(img.shape[-2:]) for img in images}
    if len(shapes) <= 1:
        return torch.stack(images), None
    height, width = max(h for h, _ in shapes), max(w for _, w in shapes)
    out = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for i, img in enumerate(images):  # one copy per image (host side, building the batch)
        out[i, :, :img.shape[-2], :img.shape[-1]] = img
    return out, tuple(tuple(img.shape[-2:]) for img in images)


@dataclass
class Batch:
    """B packed rows of T positions: what the model takes for training, scoring and prefill.

    Image positions (modality IMAGE) are filled, in order, with the projected patch tokens of
    `images`; each image occupies rows × cols consecutive positions in raster order, its token grid:
    tokens_per_image for the fixed square size, or its own grid when images come at their own size
    (`vision.max_pixels`): then `image_sizes` gives each image's pixel size (the model derives its grid),
    the images being padded at bottom and right to the largest (`stack_images`).
    """
    input_ids: torch.Tensor                 # (B, T) int64; image positions hold the image id, padding the pad id
    modality: torch.Tensor                  # (B, T) int64 Modality codes
    layout: DocumentLayout                  # documents of each row
    labels: torch.Tensor | None = None      # (B, T) int64, already shifted; IGNORE_INDEX = no loss
    images: torch.Tensor | None = None      # (N, 3, H, W) float, in row-major order of their positions
    num_images: torch.Tensor | None = None  # (B,) int64 images per row
    image_tokens: int = 0                   # host: positions with modality IMAGE (the images' token counts summed)
    source_ids: torch.Tensor | None = None  # (B, T) int64 data source of each position (−1 padding), for per-source logs
    image_sizes: tuple[tuple[int, int], ...] | None = None  # host: each image's (H, W) when sizes differ, else None

    @classmethod
    def of(cls, input_ids: torch.Tensor, modality: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
           labels: torch.Tensor | None = None, images: torch.Tensor | None = None,
           image_sizes: tuple[tuple[int, int], ...] | None = None) -> Batch:
        """A batch from tensors: modality defaults to text, doc_ids to one document per row.
        Reads doc_ids and modality to the host once (building it is not part of a forward)."""
        B, T = input_ids.shape
        modality = torch.full_like(input_ids, Modality.TEXT) if modality is None else modality
        layout = (DocumentLayout.single(B, T, input_ids.device) if doc_ids is None
                  else DocumentLayout.from_doc_ids(doc_ids))
        image_tokens = int((modality == Modality.IMAGE).sum())
        return cls(input_ids, modality, layout, labels, images, image_tokens=image_tokens,
                   image_sizes=None if image_sizes is None else tuple(tuple(s) for s in image_sizes))

    def sizes_of_images(self) -> tuple[tuple[int, int], ...]:
        """Each image's (H, W) in pixels (host): `image_sizes`, or the images' common size."""
        if self.images is None:
            return ()
        if self.image_sizes is not None:
            return self.image_sizes
        return (tuple(self.images.shape[-2:]),) * self.images.shape[0]

    @property
    def doc_ids(self) -> torch.Tensor:
        return self.layout.doc_ids

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def num_tokens(self) -> int:
        """Positions that are not padding (host: from the layout)."""
        return sum(sum(docs) for docs in self.layout.lengths)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """On `device`; images also cast to `dtype` when given."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        images = None if self.images is None else self.images.to(device, dtype or self.images.dtype)
        return replace(self, input_ids=move(self.input_ids), modality=move(self.modality), layout=self.layout.to(device),
                       labels=move(self.labels), images=images, num_images=move(self.num_images),
                       source_ids=move(self.source_ids))

"""One document → one token sequence. The single rule shared by training, evaluation and prompts.

A document is an ordered list of pieces: text (`str`) or an image (a PIL image or an already
transformed tensor (3, H, W)). `build_sequence` lays it out as

    [bos] text-tokens ... <img_start> <image> x tokens_per_image <img_end> ... [eos]

The image markers are text tokens (Modality.TEXT); the `tokens_per_image` placeholders are image
tokens (Modality.IMAGE) that the model replaces with projected ViT patches, in raster order. With
images at their own size (`vision.max_pixels`), `tokens_per_image` is a function giving each image's
own count (rows × cols of its token grid: `image_tokens_of` for transformed tensors).
`shift_labels` turns ids into next-token targets: images and document ends get no LM loss.

Answers. A piece of type `Answer` (a `str`) is text the document teaches the model to produce: a
question's answer, an assistant turn. The sequence records where its tokens are (`answer_spans`;
the document's eos joins the last answer when it ends the document). With `data.loss_on: answers`
a document that has answers gets LM loss on those tokens only (`TokenSequence.targets`); a document
without any (a caption, plain text) keeps the loss on all its text, as with `loss_on: all`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cmoe_base import IGNORE_INDEX, Modality, Tiles
from data_pipelines.chat import Chat, render_chat
from data_pipelines.document import Answer
from data_pipelines.tokenizer import Tokenizer


@dataclass
class TokenSequence:
    """Token ids of one document, their modality, and its images in order."""

    input_ids: list[int] = field(default_factory=list)
    modality: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [<img_start>, <img_end>] + 1
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each Answer's tokens
    source: int = 0  # index of the data source it came from (data.mixture; 0 with one source)

    def __len__(self) -> int:
        return len(self.input_ids)

    def targets(self, loss_on: str = "all") -> list[bool]:
        """Per token: may it be predicted (carry LM loss as its predecessor's label)? All tokens with
        loss_on "all" or without answers; else the answers' tokens only."""
        if loss_on == "all" or not self.answer_spans:
            return [True] * len(self)
        mask = [False] * len(self)
        for start, end in self.answer_spans:
            mask[start:end] = [True] * (end - start)
        return mask

    def labels(self, loss_on: str = "all") -> list[int]:
        """Next-token targets of this document alone (see `shift_labels`)."""
        ids = torch.tensor([self.input_ids])
        doc = torch.zeros_like(ids)
        targets = torch.tensor([self.targets(loss_on)])
        return shift_labels(ids, torch.tensor([self.modality]), doc, targets)[0].tolist()


TILE_ROW_SEPARATOR = "\n"  # text between tile rows of a tiled image (vision.max_tiles)


def image_tokens_of(unit: tuple[int, int]) -> Callable[[torch.Tensor], int]:
    """For images at their own size: a transformed image (3, H, W) -> its LM tokens (H / uh) · (W / uw),
    `unit` = (uh, uw) the pixels one token covers (patch size × projector block)."""
    uh, uw = unit

    def count(image: torch.Tensor) -> int:
        height, width = image.shape[-2:]
        if height % uh or width % uw:
            raise ValueError(f"image of size {(height, width)} is not a multiple of the token unit {(uh, uw)}")
        return (height // uh) * (width // uw)
    return count


def build_sequence(
    pieces: list[Any], tokenizer: Tokenizer, tokens_per_image: int | Callable[[Any], int], add_bos: bool = True,
    add_eos: bool = True,
) -> TokenSequence:
    """Tokenise text pieces and expand each image into <img_start> <image>*n <img_end>: n =
    tokens_per_image, or tokens_per_image(image) when it is a function (images at their own size).
    A `Chat` is first rendered with the tokenizer's chat template (data_pipelines/chat.py)."""
    if isinstance(pieces, Chat):
        pieces = render_chat(pieces, tokenizer.chat_template)
    seq = TokenSequence()

    def extend(ids: list[int], modality: Modality) -> None:
        seq.input_ids.extend(ids)
        seq.modality.extend([int(modality)] * len(ids))

    def image_block(*images: Any) -> None:  # several: tiles in one image run (Tiles.forced false)
        start = len(seq)
        seq.images.extend(images)
        extend([tokenizer.img_start_id], Modality.TEXT)
        n = sum(tokens_per_image(im) if callable(tokens_per_image) else tokens_per_image for im in images)
        extend([tokenizer.image_id] * n, Modality.IMAGE)
        extend([tokenizer.img_end_id], Modality.TEXT)
        seq.image_spans.extend([(start, len(seq))] * len(images))  # one span per image: the block's

    if add_bos:
        extend([tokenizer.bos_id], Modality.TEXT)
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            start = len(seq)
            extend(tokenizer.encode(piece), Modality.TEXT)
            if isinstance(piece, Answer) and len(seq) > start:
                seq.answer_spans.append((start, len(seq)))
        elif piece is None:
            raise TypeError(f"pieces[{i}] is None: expected text (str) or an image")
        elif isinstance(piece, Tiles) and not piece.forced:  # thumbnail, then all tiles as one image run
            image_block(piece.thumbnail)
            image_block(*piece.tiles)
        elif isinstance(piece, Tiles):  # thumbnail, then the tiles row by row, a separator between rows
            image_block(piece.thumbnail)
            for r in range(piece.rows):
                if r:
                    extend(tokenizer.encode(TILE_ROW_SEPARATOR), Modality.TEXT)
                for c in range(piece.cols):
                    image_block(piece.tiles[r * piece.cols + c])
        else:
            image_block(piece)
    if add_eos:
        if seq.answer_spans and seq.answer_spans[-1][1] == len(seq):  # the answer ends the document: so does eos
            seq.answer_spans[-1] = (seq.answer_spans[-1][0], len(seq) + 1)
        extend([tokenizer.eos_id], Modality.TEXT)
    return seq


def shift_labels(input_ids: torch.Tensor, modality: torch.Tensor, doc_ids: torch.Tensor,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
    """labels[b, t] = input_ids[b, t+1] if t+1 is a text token of the same document (and a target,
    when `targets` is given), else -100.

    input_ids, modality, doc_ids, targets (bool): (B, T) with doc_ids = -1 on padding. Returns (B, T) int64.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)  # (B, T-1)
    keep = same_doc & (modality[:, 1:] == Modality.TEXT)
    if targets is not None:
        keep &= targets[:, 1:]
    labels[:, :-1] = torch.where(keep, input_ids[:, 1:], IGNORE_INDEX)
    return labels

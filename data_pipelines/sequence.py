"""One document → one token sequence. The single rule shared by training, evaluation and prompts.

A document is an ordered list of pieces: text (`str`) or an image (a PIL image or an already
transformed tensor (3, H, W)). `build_sequence` lays it out as

    [bos] text-tokens ... <img_start> <image> x tokens_per_image <img_end> ... [eos]

The image markers are text tokens (Modality.TEXT); the `tokens_per_image` placeholders are image
tokens (Modality.IMAGE) that the model replaces with projected ViT patches, in raster order.
`shift_labels` turns ids into next-token targets: images and document ends get no LM loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cmoe_base import IGNORE_INDEX, Modality
from data_pipelines.tokenizer import Tokenizer


@dataclass
class TokenSequence:
    """Token ids of one document, their modality, and its images in order."""

    input_ids: list[int] = field(default_factory=list)
    modality: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [<img_start>, <img_end>] + 1

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self) -> list[int]:
        """Next-token targets of this document alone (see `shift_labels`)."""
        ids = torch.tensor([self.input_ids])
        doc = torch.zeros_like(ids)
        return shift_labels(ids, torch.tensor([self.modality]), doc)[0].tolist()


def build_sequence(
    pieces: list[Any], tokenizer: Tokenizer, tokens_per_image: int, add_bos: bool = True, add_eos: bool = True
) -> TokenSequence:
    """Tokenise text pieces and expand each image into <img_start> <image>*n <img_end>."""
    seq = TokenSequence()

    def extend(ids: list[int], modality: Modality) -> None:
        seq.input_ids.extend(ids)
        seq.modality.extend([int(modality)] * len(ids))

    if add_bos:
        extend([tokenizer.bos_id], Modality.TEXT)
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            extend(tokenizer.encode(piece), Modality.TEXT)
        elif piece is None:
            raise TypeError(f"pieces[{i}] is None: expected text (str) or an image")
        else:
            start = len(seq)
            seq.images.append(piece)
            extend([tokenizer.img_start_id], Modality.TEXT)
            extend([tokenizer.image_id] * tokens_per_image, Modality.IMAGE)
            extend([tokenizer.img_end_id], Modality.TEXT)
            seq.image_spans.append((start, len(seq)))
    if add_eos:
        extend([tokenizer.eos_id], Modality.TEXT)
    return seq


def shift_labels(input_ids: torch.Tensor, modality: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """labels[b, t] = input_ids[b, t+1] if t+1 is a text token of the same document, else -100.

    input_ids, modality, doc_ids: (B, T) with doc_ids = -1 on padding. Returns (B, T) int64.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)  # (B, T-1)
    keep = same_doc & (modality[:, 1:] == Modality.TEXT)
    labels[:, :-1] = torch.where(keep, input_ids[:, 1:], IGNORE_INDEX)
    return labels

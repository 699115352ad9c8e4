"""What a decoded sample is, before tokenisation: an ordered list of pieces (no torch here).

    str       text, context the model reads
    Answer    text the document teaches the model to produce (a question's answer, an assistant
              turn): with `data.loss_on: answers` the only text with LM loss in its document
    image     a PIL image (or, after the loader's transform, a tensor (3, H, W), or with vision.max_tiles
              a `cmoe_base.Tiles` of such tensors)

`sequence.build_sequence` lays the pieces out as tokens.
"""
from __future__ import annotations

LOSS_ON = ("all", "answers")  # data.loss_on: which text tokens of a document get LM loss


class Answer(str):
    """Text a document teaches the model to produce (an answer, an assistant turn): with
    `data.loss_on: answers` the only text with LM loss in its document."""

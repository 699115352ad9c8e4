"""A run's starting weights from an export (`train.init_from`; docs/design.md §16).

The export's model config must build the experiment's model, except the vocabulary, which may grow:
with `train.init_from`, `model.vocab_size` follows the tokenizer (`fit_vocab`), and the embedding and
LM-head rows of tokens the export never trained (ids at or past its tokenizer's vocabulary, e.g. the
image tokens the project's tokenizer adds) start as the mean of its trained rows, not random.

An export names the parts whose weights it trained in config.json's `parts` (absent: all). An import
from transformers holds only the language model (`["lm"]`): its vision tower and projector are
placeholders, so the run keeps the ones its own config built (a pretrained tower from `vision.*`, a
fresh projector). That is how a VLM is put together from parts: an imported LM + a vision tower.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from data_pipelines.tokenizer import Tokenizer

from ..checkpoints.export import load_pretrained
from ..config import to_dict
from ..model.vlm import ConceptMoEVLM
from .config import ExperimentConfig

PARTS = ("lm", "vision", "projector")  # the VLM's top-level modules
GROWN = ("lm.embed.weight", "lm.lm_head.weight")  # rows indexed by token id


def fit_vocab(exp: ExperimentConfig, tokenizer: Tokenizer) -> ExperimentConfig:
    """With `train.init_from`, an experiment whose model.vocab_size is below its tokenizer's vocabulary
    gets the tokenizer's (a new config; `exp` is not changed). Without it, the size must be stated."""
    if not exp.train.init_from or tokenizer.vocab_size <= exp.model.vocab_size:
        return exp
    warnings.warn(f"model.vocab_size raised from {exp.model.vocab_size} to {tokenizer.vocab_size}, the vocabulary of "
                  f"data.tokenizer = {exp.data.tokenizer!r}: the embedding of train.init_from grows (new rows = the "
                  f"mean of its trained rows)", stacklevel=2)
    return dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=tokenizer.vocab_size))


def mean_rows(weight: torch.Tensor, trained: int, rows: int) -> torch.Tensor:
    """`weight` (V, d) grown or kept to `rows` rows, rows from `trained` on set to the mean of those before."""
    out = weight.new_empty(rows, weight.shape[1])
    keep = min(trained, weight.shape[0], rows)
    out[:keep] = weight[:keep]
    out[keep:] = weight[:keep].mean(0)
    return out


def load_initial_weights(model: ConceptMoEVLM, path: str) -> None:
    """Copy an export's trained parts into `model`; the configs must build the same model (but the vocabulary)."""
    src, meta = load_pretrained(path)
    want, have = to_dict(model.cfg.model), to_dict(src.cfg.model)
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k) and k != "vocab_size")
    if diff:
        raise ValueError(f"train.init_from = {path}: its model config differs in {', '.join(diff)}; build the same "
                         f"model (the export lists the overrides in {path}/train_overrides.txt)")
    vocab, src_vocab = model.cfg.model.vocab_size, src.cfg.model.vocab_size
    if vocab < src_vocab:
        raise ValueError(f"train.init_from = {path}: its vocabulary has {src_vocab} tokens, model.vocab_size = {vocab} "
                         f"cannot hold them")
    parts = meta.get("parts", list(PARTS))
    trained = min(meta.get("tokenizer_vocab_size", src_vocab), src_vocab)
    state = {}
    for key, value in src.state_dict().items():
        if key.split(".")[0] not in parts:
            continue
        state[key] = mean_rows(value, trained, vocab) if key in GROWN and trained < vocab else value
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch in a part the experiment configures differently
        raise ValueError(f"train.init_from = {path}: its weights do not fit the experiment's model: "
                         f"{' '.join(str(e).split())[:400]}") from None
    missing = [k for k in missing if k.split(".")[0] in parts]
    if missing or unexpected:
        raise ValueError(f"train.init_from = {path}: missing {missing[:3]}, unexpected {unexpected[:3]}")

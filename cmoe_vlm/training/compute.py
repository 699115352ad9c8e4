"""How the model runs in training: precision, activation checkpointing, torch.compile (docs/design.md §17).

Applied to a built model by the training loop (and the benchmarks), so model code stays free of them:

    apply_activation_checkpointing(model.lm, "concept")   # train.activation_checkpointing
    apply_compile(model.lm)                               # train.compile
    with autocast(device, bf16=True): out = model(batch)  # train.precision = bf16

- Precision: bf16 is autocast around forward and loss, on CPU and GPU alike, with fp32 weights,
  gradients and optimizer states (the master weights; DeepSpeed runs in fp32).
- Activation checkpointing: a checkpointed block keeps only its input for backward and recomputes
  the rest (`torch.utils.checkpoint`, non-reentrant): "blocks" = every block, "concept" = the
  concept layers only.
- Compile: each block compiled on its own (`nn.Module.compile`, as torchtitan does), so blocks of one
  kind share code and the host-side parts of a forward (the batch's document lengths, the concept
  count M read by the merger, the attention plans) stay outside any graph. The attention call and
  the CPU expert loop (which reads its per-expert token counts) are graph breaks; a changing M
  makes the concept-level graphs dynamic after one recompile (torch's automatic dynamic shapes).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..model.conceptmoe import ConceptMoE
from ..model.layers.block import Block

if TYPE_CHECKING:  # not at run time: the GPU check imports this without the data pipeline (webdataset)
    from .config import TrainConfig


def checkpointed_blocks(lm: ConceptMoE, mode: str) -> list[Block]:
    """The blocks `train.activation_checkpointing = mode` checkpoints."""
    if mode == "off":
        return []
    if mode == "concept":
        return list(lm.concept.layers)
    return [*lm.encoder.layers, *lm.concept.layers, *lm.decoder.layers]


def apply_activation_checkpointing(lm: ConceptMoE, mode: str) -> int:
    """Mark the blocks of `mode` ("off", "blocks", "concept") as checkpointed; returns how many."""
    chosen = checkpointed_blocks(lm, mode)
    for blk in [*lm.encoder.layers, *lm.concept.layers, *lm.decoder.layers]:
        blk.checkpointed = blk in chosen
    return len(chosen)


def compile_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """train.compile, with "auto" = on CUDA only (on CPU the compiled step measured slower)."""
    return device.type == "cuda" if cfg.compile == "auto" else bool(cfg.compile)


def apply_compile(lm: ConceptMoE, backend: str = "inductor") -> int:
    """torch.compile every block in place (state-dict names unchanged); returns how many."""
    blocks = [m for m in lm.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.compile(backend=backend)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds graphs)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    """bf16 autocast on `device` when `bf16`, else nothing."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        yield


def prepare(model: nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, int | bool]:
    """Apply train.activation_checkpointing and train.compile to a ConceptMoEVLM (or ConceptMoE);
    returns what was applied."""
    lm = getattr(model, "lm", model)
    done = {"checkpointed_blocks": apply_activation_checkpointing(lm, cfg.activation_checkpointing), "compiled": False}
    if compile_enabled(cfg, device):
        apply_compile(lm)
        done["compiled"] = True
    return done

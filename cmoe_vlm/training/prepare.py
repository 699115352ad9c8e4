"""How the model runs in training: precision, activation checkpointing, torch.compile (docs/design.md §17).

Applied from outside to a built model, which knows nothing of them (as torchtitan's `parallelize`):

    prepared = prepare_model(model, cfg, device)           # train.activation_checkpointing, train.compile
    with prepared.autocast(device): out = model(batch)     # train.precision

- Precision: bf16 is autocast around forward and loss, on CPU and GPU alike, with fp32 weights,
  gradients and optimizer states (the master weights; DeepSpeed runs in fp32).
- Activation checkpointing: a checkpointed block keeps only its input for backward and recomputes
  the rest: torch's composable `checkpoint` (non-reentrant, as forward hooks: the block's class and
  its weight names stay as they are): "blocks" = every block, "concept" = the concept layers only.
- Compile: each block compiled on its own (`nn.Module.compile`, as torchtitan does), so blocks of one
  kind share code and the host-side parts of a forward (the batch's document lengths, the concept
  count M read by the merger, the attention plans) stay outside any graph. The attention call and
  the CPU expert loop (which reads its per-expert token counts) are graph breaks; a changing M
  makes the concept-level graphs dynamic after one recompile (torch's automatic dynamic shapes).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from ..model.conceptmoe import ConceptMoE
from ..model.layers.block import Block

if TYPE_CHECKING:  # not at run time: the GPU check imports this without the data pipeline (webdataset)
    from .config import TrainConfig


def blocks_to_checkpoint(lm: ConceptMoE, mode: str) -> list[Block]:
    """The blocks `train.activation_checkpointing = mode` checkpoints."""
    if mode == "off":
        return []
    if mode == "concept":
        return list(lm.concept.layers)
    return [*lm.encoder.layers, *lm.concept.layers, *lm.decoder.layers]


def apply_activation_checkpointing(lm: ConceptMoE, mode: str) -> int:
    """Checkpoint the blocks of `mode` ("off", "blocks", "concept") of a model not checkpointed before;
    returns how many."""
    chosen = blocks_to_checkpoint(lm, mode)
    for blk in chosen:
        checkpoint(blk)
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


def use_bf16(cfg: TrainConfig) -> bool:
    """Whether the forward runs under bf16 autocast: precision bf16 (CPU or GPU), or auto on a GPU with bf16."""
    if cfg.precision == "fp32":
        return False
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and torch.cuda.is_available() and not supported:
        raise RuntimeError("train.precision = bf16: this GPU has no bf16 support; use fp32 (or auto)")
    return cfg.precision == "bf16" or supported


@contextlib.contextmanager
def autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    """bf16 autocast on `device` when `bf16`, else nothing."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        yield


@dataclass
class Prepared:
    """What `prepare_model` applied (the run summary reports the counts)."""
    bf16: bool               # forward and loss under bf16 autocast
    checkpointed_blocks: int
    compiled: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        return autocast(device, self.bf16)


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Prepared:
    """Apply train.activation_checkpointing and train.compile to a ConceptMoEVLM (or ConceptMoE), and
    resolve train.precision; returns what was applied."""
    lm = getattr(model, "lm", model)
    blocks = apply_activation_checkpointing(lm, cfg.activation_checkpointing)
    compiled = compile_enabled(cfg, device)
    if compiled:
        apply_compile(lm)
    return Prepared(bf16=use_bf16(cfg), checkpointed_blocks=blocks, compiled=compiled)

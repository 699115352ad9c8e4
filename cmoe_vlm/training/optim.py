"""AdamW parameter groups (decay vs no-decay, each named) and the warmup + cosine schedule."""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # not at run time: the GPU check imports this without the data pipeline (webdataset)
    from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm gains, biases) and embeddings do not. Every group carries a
    `name`, which DeepSpeed's MoE group split needs."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [
        {"name": "decay", "decay": True, "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "decay": False, "params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine down to min_lr_ratio at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class AdamW(torch.optim.AdamW):
    """torch's AdamW with DeepSpeed's overflow protocol: while `overflow` is set, `step` changes nothing.
    With fp32 ZeRO-0 DeepSpeed steps this optimizer directly and has no non-finite check of its own; the
    loop sets `overflow` from the gradient norm and DeepSpeed then treats the step as its own ZeRO
    optimizers treat an overflow: no update, no lr-schedule step, counted in `engine.skipped_steps`."""

    overflow = False

    def step(self, closure=None):
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[AdamW, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.ep_size > 1:  # expert parameters get their own groups, reduced over the expert-data group
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    opt = AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched


def apply_hyperparameters(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig) -> None:
    """Set lr, betas and weight decay from `cfg` on every group of the scheduler's optimizer, at the
    schedule's current step. A checkpoint restores the saved ones; after a resume the config's apply."""
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [cfg.lr] * len(groups)
    factor = lr_factor(scheduler.last_epoch, cfg)
    for g in groups:
        g.update(initial_lr=cfg.lr, lr=cfg.lr * factor, betas=tuple(cfg.betas),
                 weight_decay=cfg.weight_decay if g["decay"] else 0.0)

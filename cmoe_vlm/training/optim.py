"""AdamW parameter groups (decay vs no-decay, per learning-rate scale, each named) and the warmup +
cosine schedule. A group's `lr_scale` multiplies the configured lr (train.lr_scale, training/stages.py)."""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch
from torch import nn

from .stages import components_of

if TYPE_CHECKING:  # not at run time: the GPU check imports this without the data pipeline (webdataset)
    from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Matrices decay; vectors (norm gains, biases) and embeddings do not; parameters of components
    with a learning-rate scale get groups of their own (`scaled`: those components, whichever values
    they have, so a resume may change the values). Frozen parameters are left out. Every group carries
    a `name`, which DeepSpeed's MoE group split needs, and its `lr_scale`."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[bool, tuple[str, ...]], list] = {(True, ()): [], (False, ()): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scaled = tuple(c for c in components_of(name) if c in lr_scale)
            groups.setdefault((p.dim() >= 2 and "embed" not in name, scaled), []).append(p)
    return [{"name": ("decay" if decay else "no_decay") + "".join(f":{c}" for c in scaled), "decay": decay,
             "scaled": list(scaled), "lr_scale": math.prod(lr_scale[c] for c in scaled), "params": params,
             "weight_decay": weight_decay if decay else 0.0}
            for (decay, scaled), params in groups.items() if params or not scaled]


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
    groups = param_groups(model, cfg.weight_decay, cfg.lr_scale)
    if cfg.ep_size > 1:  # expert parameters get their own groups, reduced over the expert-data group
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    opt = AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched


def apply_hyperparameters(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig) -> None:
    """Set lr, betas and weight decay from `cfg` on every group of the scheduler's optimizer, at the
    schedule's current step. A checkpoint restores the saved ones; after a resume the config's apply."""
    groups = scheduler.optimizer.param_groups
    for g in groups:  # a checkpoint from before per-component scales has no `scaled`
        g["lr_scale"] = math.prod(cfg.lr_scale[c] for c in g.get("scaled", ()))
    scheduler.base_lrs = [cfg.lr * g["lr_scale"] for g in groups]
    factor = lr_factor(scheduler.last_epoch, cfg)
    for g, base in zip(groups, scheduler.base_lrs):
        g.update(initial_lr=base, lr=base * factor, betas=tuple(cfg.betas),
                 weight_decay=cfg.weight_decay if g["decay"] else 0.0)

"""The training objective (docs/design.md §3): what a model output costs. The model computes no loss.

    controller = RatioController.of(model_cfg)        # the integral term's state, or None (chunk.ratio_integral = 0)
    objective = Objective(model_cfg, controller)
    losses = objective(out, batch)                     # Losses: total, lm, ratio, balance
    controller.update(out.own_boundaries, batch)       # after a training forward: μ moves

    total = lm + λ · ratio + λ_lb · balance            λ = chunk.ratio_loss_weight, λ_lb = lb_loss_weight

- lm: cross entropy over the predicted tokens (labels ≠ IGNORE_INDEX); a batch with none adds 0.
- ratio: the paper's loss per token set on the chunk module's own boundaries,
  R/(R−1) · ((R−1)·F·G + (1−F)·(1−G)) with F = mean b (no gradient), G = mean p, summed over the sets of
  `chunk.ratio_mode` (one set "all", or "text" and "image"). [ours] `chunk.image_margin_weight` adds a
  margin term on image p; the integral term adds μ_i · G_i (`RatioController`).
- balance: per MoE layer call E · Σ_e f_e · P_e (f_e the share of assignments to expert e, P_e its mean
  router probability), averaged over the calls; minimum 1 at uniform routing.

The controller's μ is state the training loop owns, like the optimizer's: saved in its checkpoints,
averaged over ranks, restored when a step is skipped. Without a controller (evaluation, transformers'
loss with labels) the integral term is left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmoe_base import IGNORE_INDEX, Batch

from .model.chunk import Boundaries, ChunkConfig
from .model.compression import boundary_rates, token_sets
from .model.conceptmoe import ModelOutput
from .model.config import ModelConfig
from .model.layers.moe import MoEStats


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy (fp32) of logits (B, T, V) against labels (B, T) over the predicted tokens;
    0, not 0/0 = NaN, for a batch without any (images only)."""
    labels = labels.reshape(-1)
    return (F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels, ignore_index=IGNORE_INDEX,
                            reduction="sum") / (labels != IGNORE_INDEX).sum().clamp_min(1))


def ratio_loss(p: torch.Tensor, b: torch.Tensor, target: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L = R/(R-1) · ((R-1)·F·G + (1-F)·(1-G)), F = mean b (no grad), G = mean p, over `mask`.

    Minimum 1 at F = G = 1/R; 0 for an empty set or R <= 1. p, b (B, T); mask (B, T) bool selects
    the token set S.
    """
    if target <= 1.0:
        return p.sum() * 0.0
    R = target
    f, g, n = boundary_rates(p, b, mask)
    loss = R / (R - 1) * ((R - 1) * f * g + (1 - f) * (1 - g))
    return torch.where(n > 0, loss, loss * 0.0)


def margin_loss(p: torch.Tensor, mask: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over `mask` of relu(margin − |2p − 1|): zero once every p is at least margin/2 from the
    0.5 threshold (0 for an empty mask). p (B, T); mask (B, T) bool. Forced boundaries (p = 1) cost
    nothing. [ours] The ratio loss only sets the mean of p, and with sharpened sampling (τ = 6) a p
    just above or below 0.5 is a boundary with probability 0.89 or 0.11, so p can sit at 0.5 ± 0.01
    on every image token, blind to content, while training meets the target; the evaluation
    threshold then flips whole images. This term makes p decide (bench/bench_image_adaptivity.py)."""
    gap = F.relu(margin - (2 * p.float() - 1).abs())
    return (gap * mask).sum() / mask.sum().clamp_min(1)


def balance_loss(stats: MoEStats) -> torch.Tensor:
    """Switch-style load balance of one MoE layer call: E · Σ_e (share of assignments to e) · (mean router
    probability of e); minimum 1 at uniform routing, 0 for a call without tokens."""
    counts = stats.tokens_per_expert
    share = counts.float() / counts.sum().clamp_min(1)
    return counts.numel() * (share * stats.router_probs).sum()


class RatioController:
    """The integral term of the ratio control [ours]: μ_i · G_i joins token set i's ratio loss, and after
    each training forward μ_i += η · (R_i · F_i − 1) (η = chunk.ratio_integral), for every set with a
    target and tokens in the batch. The paper's loss pulls with a force ∝ (R·F − 1); another steady
    force on p (the LM loss preferring fewer image boundaries, say) leaves it off target, and μ
    integrates the remaining error until it cancels (a PI controller's I).

    mu (one per token set of `chunk.targets()`) is the training loop's state: `state_dict` /
    `load_state_dict` for checkpoints and skipped steps."""

    def __init__(self, cfg: ChunkConfig, device: torch.device | str = "cpu"):
        self.gain, self.targets = cfg.ratio_integral, cfg.targets()
        self.mu = torch.zeros(len(self.targets), device=device)

    @classmethod
    def of(cls, cfg: ModelConfig, device: torch.device | str = "cpu") -> RatioController | None:
        """The controller a model config asks for: None with chunking off or chunk.ratio_integral = 0."""
        return cls(cfg.chunk, device) if cfg.chunk.enabled and cfg.chunk.ratio_integral > 0 else None

    def term(self, index: int, g: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """μ_index · G for a token set of n tokens with mean p G (0 for an empty set). μ is copied, since
        `update` changes it in place before the loss's backward."""
        return torch.where(n > 0, self.mu[index].clone() * g, 0.0)

    @torch.no_grad()
    def update(self, own: Boundaries, batch: Batch) -> None:
        """μ_i += η · (R_i · F_i − 1) from the chunk module's own boundaries of a training forward."""
        sets = token_sets(batch.modality, batch.layout.valid)
        for i, (name, target) in enumerate(self.targets.items()):
            if target > 1:
                f, _, n = boundary_rates(own.p, own.b, sets[name])
                self.mu[i] += torch.where(n > 0, self.gain * (target * f - 1), 0.0)

    def state_dict(self) -> dict[str, list[float]]:
        return {"mu": self.mu.tolist()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.mu.copy_(torch.tensor(state["mu"], dtype=self.mu.dtype))


@dataclass
class Losses:
    """One batch's loss terms, each a () tensor."""
    total: torch.Tensor    # lm + λ · ratio + λ_lb · balance: what training minimises
    lm: torch.Tensor
    ratio: torch.Tensor
    balance: torch.Tensor


class Objective:
    """The losses of a ConceptMoE (or VLM) output for a batch with labels (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, controller: RatioController | None = None):
        self.cfg, self.controller = cfg, controller

    def __call__(self, out: ModelOutput, batch: Batch) -> Losses:
        if batch.labels is None:
            raise ValueError("the objective needs labels: build the batch with Batch.of(..., labels=...)")
        lm = lm_loss(out.logits, batch.labels)
        ratio = lm.new_zeros(()) if out.own_boundaries is None else self.ratio_loss(out.own_boundaries, batch)
        balance = (torch.stack([balance_loss(s) for s in out.moe_stats]).mean() if out.moe_stats
                   else out.logits.sum() * 0)
        total = lm + self.cfg.chunk.ratio_loss_weight * ratio + self.cfg.lb_loss_weight * balance
        return Losses(total=total, lm=lm, ratio=ratio, balance=balance)

    def ratio_loss(self, own: Boundaries, batch: Batch) -> torch.Tensor:
        """The ratio loss on the chunk module's own boundaries, with the configured options, summed over
        the token sets (docs/design.md §3)."""
        cfg = self.cfg.chunk
        sets = token_sets(batch.modality, batch.layout.valid)
        losses = []
        if cfg.image_margin_weight > 0:
            losses.append(cfg.image_margin_weight * margin_loss(own.p, sets["image"], cfg.image_margin))
        for i, (name, target) in enumerate(cfg.targets().items()):
            loss = ratio_loss(own.p, own.b, target, sets[name])
            if self.controller is not None and target > 1:
                _, g, n = boundary_rates(own.p, own.b, sets[name])
                loss = loss + self.controller.term(i, g, n)
            losses.append(loss)
        return torch.stack(losses).sum()

"""Rotary position embeddings at explicit (per-token) positions, with optional frequency scaling.

Positions are given per token, not assumed to be 0..T-1: packed documents restart at 0, and the
concept model sees the original position of each concept's boundary token (docs/design.md §6).
The rotate-half convention (pairs (i, i + head_dim/2)) and the scaled frequencies ("linear",
"llama3", "yarn") are computed as transformers computes them, so imported models see the angles
they were trained with (docs/design.md §16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from cmoe_base import check


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for contexts beyond pre-training, named as in transformers' `rope_parameters`.

    linear: every frequency / factor. llama3: low frequencies / factor, high ones kept, a smooth ramp
    between (by wavelength against original_max_position / low_freq_factor and / high_freq_factor).
    yarn: frequencies ramped between kept and / factor by how many rotations they make within
    original_max_position (beta_fast, beta_slow), and cos/sin scaled by attention_factor."""
    type: Literal["linear", "llama3", "yarn"]
    factor: float
    original_max_position: int | None = None  # llama3, yarn: the pre-training context length
    low_freq_factor: float = 1.0               # llama3
    high_freq_factor: float = 4.0              # llama3
    beta_fast: float = 32.0                    # yarn
    beta_slow: float = 1.0                     # yarn
    attention_factor: float | None = None      # yarn: scale of cos and sin; None = 0.1·ln(factor) + 1
    truncate: bool = True                      # yarn: round the ramp's ends to whole dimensions

    def __post_init__(self):
        check(self.factor > 0, "factor", self.factor, "must be > 0")
        if self.type in ("llama3", "yarn"):
            check(self.original_max_position is not None and self.original_max_position > 0, "original_max_position",
                  self.original_max_position, f"must be > 0 for {self.type} scaling (the pre-training context length)")
        if self.type == "llama3":
            check(self.high_freq_factor > self.low_freq_factor, "high_freq_factor", self.high_freq_factor,
                  f"must be > low_freq_factor = {self.low_freq_factor}")


def _scaled(inv_freq: torch.Tensor, head_dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """The scaled inverse frequencies (head_dim/2,) and the cos/sin scale."""
    if s.type == "linear":
        return inv_freq / s.factor, 1.0
    if s.type == "llama3":
        old = s.original_max_position
        wavelen = 2 * math.pi / inv_freq
        low = torch.where(wavelen > old / s.low_freq_factor, inv_freq / s.factor, inv_freq)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * low / s.factor + smooth * low
        medium = ~(wavelen < old / s.high_freq_factor) & ~(wavelen > old / s.low_freq_factor)
        return torch.where(medium, smoothed, low), 1.0
    # yarn
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: divided by factor (interpolation)
    inv = inv_freq / s.factor * (1 - keep) + inv_freq * keep
    scale = s.attention_factor if s.attention_factor is not None else (
        0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return inv, float(scale)


@lru_cache(maxsize=16)
def _frequencies(head_dim: int, theta: float, scaling: RopeScaling | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The head_dim/2 inverse frequencies twice (head_dim,), the signs (−1 first half, +1 second),
    and the scale of cos and sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    scale = 1.0
    if scaling is not None:
        inv_freq, scale = _scaled(inv_freq, head_dim, theta, scaling)
    sign = torch.ones(head_dim, device=device)
    sign[:head_dim // 2] = -1
    return torch.cat([inv_freq, inv_freq]), sign, scale


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) int -> cos, sin (B, T, 1, head_dim) in fp32, laid out for `apply_rope`: the
    head_dim/2 angles twice, the sines negated in the first half."""
    inv_freq, sign, scale = _frequencies(head_dim, float(theta), scaling, positions.device)
    angles = positions.float()[:, :, None, None] * inv_freq  # (B, T, 1, head_dim)
    if scale == 1.0:
        return angles.cos(), angles.sin() * sign
    return angles.cos() * scale, angles.sin() * (sign * scale)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh) rotated pairwise (first half, second half) by the angles:
    (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin), as x·cos + (x2, x1)·(−sin, sin) in four ops
    (at decode each op is a few µs for a few hundred numbers)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.addcmul(xf * cos, torch.cat([x2, x1], dim=-1), sin)
    return out if out.dtype == x.dtype else out.to(x.dtype)

"""Rotary position embeddings at explicit (per-token) positions.

Positions are given per token, not assumed to be 0..T-1: packed documents restart at 0, and the
concept model sees the original position of each concept's boundary token (docs/design.md §6).
"""
from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _frequencies(head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The head_dim/2 inverse frequencies twice (head_dim,), and the signs (−1 first half, +1 second)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    sign = torch.ones(head_dim, device=device)
    sign[:head_dim // 2] = -1
    return torch.cat([inv_freq, inv_freq]), sign


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) int -> cos, sin (B, T, 1, head_dim) in fp32, laid out for `apply_rope`: the
    head_dim/2 angles twice, the sines negated in the first half."""
    inv_freq, sign = _frequencies(head_dim, float(theta), positions.device)
    angles = positions.float()[:, :, None, None] * inv_freq  # (B, T, 1, head_dim)
    return angles.cos(), angles.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh) rotated pairwise (first half, second half) by the angles:
    (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin), as x·cos + (x2, x1)·(−sin, sin) in four ops
    (at decode each op is a few µs for a few hundred numbers)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.addcmul(xf * cos, torch.cat([x2, x1], dim=-1), sin)
    return out if out.dtype == x.dtype else out.to(x.dtype)

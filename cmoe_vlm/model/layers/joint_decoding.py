"""Joint decoding (docs/design.md §5): a decoder layer also sees the smoothed concept of each token.

    Q = z W_q + norm(c̄) W_q^c,   K = z W_k + norm(c̄) W_k^c,   V = z W_v + norm(c̄) W_v^c

W^c is shaped like the layer's own Q/K/V projection and applied to the pre-normed concept c̄;
RoPE and causal attention then run as usual, so a KV cache stores the summed K and V and needs no
separate concept cache. Converted models start with W^c = 0 (no effect); from scratch it has the
standard initialisation.
"""
from __future__ import annotations

import torch
from torch import nn

from .norm import RMSNorm


class JointDecoding(nn.Module):
    def __init__(self, dim: int, qkv_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps)
        self.proj = nn.Linear(dim, qkv_dim, bias=False)

    def forward(self, c_bar: torch.Tensor) -> torch.Tensor:
        """c̄ (B, T, dim) of each token -> its additions to the layer's Q/K/V projection (B, T, qkv_dim)."""
        return self.proj(self.norm(c_bar))

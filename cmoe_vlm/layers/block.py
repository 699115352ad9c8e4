"""Pre-norm transformer block: attention then MoE feed-forward, each with a residual."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, KVCache
from .moe import MoE, MoEConfig, MoEStats
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, moe: MoEConfig,
                 joint: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, num_kv_heads, joint=joint)
        self.ffn_norm = RMSNorm(dim)
        self.moe = MoE(dim, moe)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                concept: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: torch.Tensor | None = None, with_stats: bool = True) -> tuple[torch.Tensor, MoEStats | None]:
        """x (B, T, dim) -> (B, T, dim), MoE stats (None without `with_stats`). See
        `Attention.forward` for the rest."""
        x = x + self.attn(self.attn_norm(x), rope, mask, concept, cache, rows)
        y, stats = self.moe(self.ffn_norm(x), with_stats)
        return x + y, stats

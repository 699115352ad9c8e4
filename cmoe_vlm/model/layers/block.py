"""Pre-norm transformer block (attention then MoE feed-forward, each with a residual), and a stack
of them. A decoder block with joint decoding also takes each token's concept c̄."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import Attention, AttentionConfig, AttentionLayout, KVCache
from .joint_decoding import JointDecoding
from .moe import MoE, MoEConfig, MoEStats
from .norm import RMSNorm

Rope = tuple[torch.Tensor, torch.Tensor]


class Block(nn.Module):
    def __init__(self, attn: AttentionConfig, moe: MoEConfig, joint: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(attn.dim, attn.norm_eps)
        self.attn = Attention(attn)
        self.joint = JointDecoding(attn.dim, attn.qkv_dim, attn.norm_eps) if joint else None
        self.ffn_norm = RMSNorm(attn.dim, attn.norm_eps)
        self.moe = MoE(attn.dim, moe)

    def _extra_qkv(self, concept: torch.Tensor | None) -> torch.Tensor | None:
        if self.joint is None:
            return None
        if concept is None:
            raise ValueError("a joint-decoding block needs the tokens' concepts")
        return self.joint(concept)

    def forward(self, x: torch.Tensor, rope: Rope, layout: AttentionLayout, concept: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, MoEStats]:
        """x (B, T, dim) -> (B, T, dim) and the MoE layer's stats; concept (B, T, dim) for joint decoding."""
        x = x + self.attn(self.attn_norm(x), rope, layout, self._extra_qkv(concept))
        y, stats = self.moe(self.ffn_norm(x))
        return x + y, stats

    def extend(self, x: torch.Tensor, rope: Rope, cache: KVCache, rows: torch.Tensor | None = None,
               concept: torch.Tensor | None = None) -> torch.Tensor:
        """The next tokens of cached rows (see `Attention.extend`); no MoE stats (inference)."""
        x = x + self.attn.extend(self.attn_norm(x), rope, cache, rows, self._extra_qkv(concept))
        y, _ = self.moe(self.ffn_norm(x), with_stats=False)
        return x + y


def run_blocks(blocks: Sequence[Block], x: torch.Tensor, rope: Rope, layout: AttentionLayout,
               concept: torch.Tensor | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
    """Blocks in order over a packed batch; returns the output and each block's MoE stats."""
    stats = []
    for blk in blocks:
        x, st = blk(x, rope, layout, concept)
        stats.append(st)
    return x, stats


def extend_blocks(blocks: Sequence[Block], x: torch.Tensor, rope: Rope, caches: Sequence[KVCache],
                  advance: torch.Tensor | int, rows: torch.Tensor | None = None,
                  concept: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks in order over the next tokens of cached rows (`rows`, default all); each block's cache
    then advances by `advance` (an int for every row, or per row (b,))."""
    for blk, cache in zip(blocks, caches):
        x = blk.extend(x, rope, cache, rows, concept)
        cache.advance(advance, rows)
    return x


class LayerStack(nn.Module):
    """Blocks that run once each, in order (the encoder, the decoder). Its decoding state is one
    KVCache per block (`new_caches`)."""

    def __init__(self, blocks: Sequence[Block], attn: AttentionConfig):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.attn_cfg = attn

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor, rope: Rope, layout: AttentionLayout, concept: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, list[MoEStats]]:
        return run_blocks(self.layers, x, rope, layout, concept)

    def extend(self, x: torch.Tensor, rope: Rope, caches: Sequence[KVCache], advance: torch.Tensor | int,
               concept: torch.Tensor | None = None) -> torch.Tensor:
        return extend_blocks(self.layers, x, rope, caches, advance, concept=concept)

    def new_caches(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
        a = self.attn_cfg
        return [KVCache(batch_size, a.num_kv_heads, a.head_dim, device, dtype) for _ in self.layers]

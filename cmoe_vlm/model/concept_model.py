"""The concept model (docs/design.md §1, §8): the middle of the network, run on concepts.

    x (B, M, d) -> proj_in (d -> d_c, a wider concept model only) -> concept layers in schedule
    order (all layers, then the first `loop_layers` again with shared weights) -> proj_out -> ĉ

RoPE positions are the concepts' own (their boundary tokens' positions, §6). Converted models
return the update ĉ − x instead of ĉ (`chunk.dechunk_update`). With chunking off (the baseline),
the same layers run on tokens.

Decoding state: one KVCache per schedule position, concept-level (one entry per concept).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers.attention import AttentionLayout, KVCache
from .layers.block import Block, extend_blocks, run_blocks
from .layers.moe import MoEStats
from .layers.rope import rope_angles


class ConceptModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, dc = cfg.dim, cfg.concept_width
        self.attn_cfg = cfg.attention(dc)
        self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
        self.layers = nn.ModuleList(Block(self.attn_cfg, cfg.concept_moe_cfg) for _ in range(cfg.concept_layers))
        self.schedule = cfg.concept_schedule()
        self.proj_in = nn.Linear(d, dc, bias=False) if dc != d else None
        self.proj_out = nn.Linear(dc, d, bias=False) if dc != d else None
        self.update_only = cfg.chunk.enabled and cfg.chunk.dechunk_update

    @property
    def blocks(self) -> list[Block]:
        """The layers in execution order (looped layers appear twice)."""
        return [self.layers[i] for i in self.schedule]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_angles(positions, self.attn_cfg.head_dim, self.rope_theta, self.rope_scaling)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj_in is None else self.proj_in(x)

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y if self.proj_out is None else self.proj_out(y)
        return y - x if self.update_only else y

    def forward(self, x: torch.Tensor, positions: torch.Tensor, layout: AttentionLayout,
                ) -> tuple[torch.Tensor, list[MoEStats]]:
        """x (B, M, d) concepts at positions (B, M), attending as `layout` -> ĉ (B, M, d), MoE stats."""
        y, stats = run_blocks(self.blocks, self._in(x), self._rope(positions), layout)
        return self._out(y, x), stats

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
        a = self.attn_cfg
        return [KVCache(batch_size, a.num_kv_heads, a.head_dim, device, dtype) for _ in self.schedule]

    def extend(self, x: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor | int,
               caches: list[KVCache]) -> torch.Tensor:
        """New concepts of cached rows: x (B, M, d) at positions (B, M), of which row r has the
        first counts[r] (an int: every row all M). Only rows with new concepts run; their caches
        grow by their counts. -> ĉ (B, M, d), zero for rows without new concepts."""
        if isinstance(counts, int):
            y = extend_blocks(self.blocks, self._in(x), self._rope(positions), caches, counts)
            return self._out(y, x)
        rows = (counts > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return torch.zeros_like(x)
        if rows.numel() == x.shape[0]:
            y = extend_blocks(self.blocks, self._in(x), self._rope(positions), caches, counts)
            return self._out(y, x)
        y = extend_blocks(self.blocks, self._in(x[rows]), self._rope(positions[rows]), caches, counts[rows], rows)
        return torch.zeros_like(x).index_copy(0, rows, self._out(y, x[rows]))

    def step(self, x: torch.Tensor, positions: torch.Tensor, closes: torch.Tensor | None,
             caches: list[KVCache]) -> torch.Tensor:
        """One new concept for the rows where `closes` (B,) (None: every row): x (B, d) at
        positions (B,). -> ĉ (B, d), zero for the other rows; their caches do not grow."""
        if closes is None:
            return self.extend(x[:, None], positions[:, None], 1, caches)[:, 0]
        rows = closes.nonzero().squeeze(1)
        if rows.numel() == 0:
            return torch.zeros_like(x)
        if rows.numel() == x.shape[0]:
            return self.extend(x[:, None], positions[:, None], 1, caches)[:, 0]
        y = extend_blocks(self.blocks, self._in(x[rows, None]), self._rope(positions[rows, None]), caches, 1, rows)
        return torch.zeros_like(x).index_copy(0, rows, self._out(y, x[rows, None])[:, 0])

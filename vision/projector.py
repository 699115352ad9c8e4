"""Projector: ViT patch tokens (width D_vit) -> LM image tokens (width d), with optional reduction.

Token reduction by a factor r merges each r x r block of neighbouring patches into one token, so a
high-resolution image costs P / r^2 LM positions instead of P:
  pixel_shuffle: concatenate the block's r^2 vectors (width r^2 * D_vit) before the MLP (no
                 information dropped; the MLP learns the mixing), as in nanoVLM / InternVL;
  avg_pool:      average the block (width stays D_vit).
Output tokens are in raster order of the reduced grid, which is what the LM and 2d chunking expect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cmoe_base import check
from vision.encoder import VisionConfig, patch_grid


@dataclass
class ProjectorConfig:
    kind: Literal["mlp", "linear"] = "mlp"  # mlp = Linear-GELU-Linear; linear = one Linear (the paper's VLM)
    reduction: int = 1  # r: each r x r block of patches becomes one token
    reduce: Literal["pixel_shuffle", "avg_pool"] = "pixel_shuffle"

    def __post_init__(self) -> None:
        check(self.kind in ("mlp", "linear"), "kind", self.kind, "must be one of 'mlp', 'linear'")
        check(self.reduction >= 1, "reduction", self.reduction, "must be >= 1 (1 = one token per patch)")
        check(self.reduce in ("pixel_shuffle", "avg_pool"), "reduce", self.reduce,
              "must be one of 'pixel_shuffle', 'avg_pool'")


def reduced_grid(grid: tuple[int, int], reduction: int) -> tuple[int, int]:
    """(rows / r, cols / r); a ConfigError naming `reduction` if r does not divide the grid."""
    rows, cols = grid
    check(rows % reduction == 0 and cols % reduction == 0, "reduction", reduction,
          f"must divide the patch grid {rows}x{cols}")
    return rows // reduction, cols // reduction


def image_token_grid(vision_cfg: VisionConfig, projector_cfg: ProjectorConfig) -> tuple[int, int]:
    """(rows, cols) of LM image tokens per image at the configured size, without building weights."""
    return reduced_grid(patch_grid(vision_cfg), projector_cfg.reduction)


def tokens_per_image(vision_cfg: VisionConfig, projector_cfg: ProjectorConfig) -> int:
    """LM positions one image occupies (without <img_start>/<img_end>), for sizing sequences."""
    rows, cols = image_token_grid(vision_cfg, projector_cfg)
    return rows * cols


def group_blocks(x: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """(N, rows*cols, D) raster tokens -> (N, rows/r * cols/r, r*r, D): each r x r block's tokens,
    blocks in raster order of the reduced grid, tokens within a block in raster order too."""
    n, p, d = x.shape
    rows, cols = grid
    if p != rows * cols:
        raise ValueError(f"projector input has {p} tokens, but grid {rows}x{cols} has {rows * cols}")
    out_rows, out_cols = reduced_grid(grid, r)
    x = x.reshape(n, out_rows, r, out_cols, r, d)  # (N, R, dy, C, dx, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, R, C, dy, dx, D)
    return x.reshape(n, out_rows * out_cols, r * r, d)


class Projector(nn.Module):
    """(N, rows*cols, in_dim) patch tokens -> (N, rows*cols / r^2, out_dim) LM image tokens."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.cfg = cfg
        width = in_dim * cfg.reduction ** 2 if cfg.reduce == "pixel_shuffle" else in_dim
        if cfg.kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            self.proj = nn.Linear(width, out_dim)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return reduced_grid(grid, self.cfg.reduction)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        r = self.cfg.reduction
        blocks = group_blocks(x, grid, r)  # (N, T, r*r, D)
        if self.cfg.reduce == "pixel_shuffle":
            x = blocks.flatten(2)  # (N, T, r*r*D), block tokens concatenated in raster order
        else:
            x = blocks.mean(dim=2)  # (N, T, D)
        return self.proj(x)  # (N, T, out_dim)

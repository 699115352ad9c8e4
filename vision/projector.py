"""Projector: ViT patch tokens (width D_vit) -> LM image tokens (width d), with optional reduction.

Token reduction by a factor r merges each r x r block of neighbouring patches into one token, so a
high-resolution image costs P / r^2 LM positions instead of P (`reduction_cols` makes the blocks
r x r_c, e.g. to halve the count exactly):
  pixel_shuffle: concatenate the block's vectors (width r * r_c * D_vit) before the MLP (no
                 information dropped; the MLP learns the mixing), as in nanoVLM / InternVL;
  avg_pool:      average the block (width stays D_vit).
Output tokens are in raster order of the reduced grid, which is what the LM and 2d chunking expect.

`center: true` subtracts each image's mean output token from its tokens. An end-to-end trained ViT
whose text only asks about the whole image (counts, colours) learns one large component shared by
all tokens of an image (measured on the built-in data: the tokens' deviation from their image's
mean is 4% of their norm, adjacent tokens at cosine 0.9996), and the chunker, which compares each
token with its predecessor by cosine, then sees every image as uniform. Centring leaves only what
differs inside the image. It is not a causality leak: the ViT already mixes all patches of an image.

`keep_tokens: k` is a training-free pruning baseline in the manner of VisionZip / FastV: of the
reduced tokens, only the k that receive the most attention are kept, in raster order (saliency of
token i = mean over tokens j of softmax_i(x_j · x_i / sqrt(d)) within its image, parameter-free on
the output tokens). The kept tokens no longer form a grid: the image grid is (1, k).
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
    reduction_cols: int | None = None  # blocks of reduction x reduction_cols patches (None = square)
    reduce: Literal["pixel_shuffle", "avg_pool"] = "pixel_shuffle"
    center: bool = False  # [ours] subtract each image's mean token (content-adaptive chunking of images)
    keep_tokens: int = 0  # [ours] keep only the k most attended tokens per image (0 = all; training-free)
    # [ours] add a projection of the image's max-pooled tokens to its last token: a summary an LM position
    # reads with one attention lookup (a softmax-weighted mean of centred tokens loses shape; design.md §7b)
    summary: bool = False

    def __post_init__(self) -> None:
        check(self.kind in ("mlp", "linear"), "kind", self.kind, "must be one of 'mlp', 'linear'")
        check(self.reduction >= 1, "reduction", self.reduction, "must be >= 1 (1 = one token per patch)")
        check(self.reduction_cols is None or self.reduction_cols >= 1, "reduction_cols", self.reduction_cols,
              "must be >= 1, or null for square blocks")
        check(self.reduce in ("pixel_shuffle", "avg_pool"), "reduce", self.reduce,
              "must be one of 'pixel_shuffle', 'avg_pool'")
        check(self.keep_tokens >= 0, "keep_tokens", self.keep_tokens, "must be >= 0 (0 = keep all)")

    @property
    def block(self) -> tuple[int, int]:
        """(rows, cols) of patches merged into one token."""
        return self.reduction, self.reduction_cols or self.reduction


def reduced_grid(grid: tuple[int, int], block: int | tuple[int, int]) -> tuple[int, int]:
    """(rows / r, cols / r_c); a ConfigError naming `reduction` if a block side does not divide the grid."""
    rows, cols = grid
    ry, rx = (block, block) if isinstance(block, int) else block
    check(rows % ry == 0, "reduction", ry, f"must divide the patch grid {rows}x{cols}")
    check(cols % rx == 0, "reduction_cols" if ry != rx else "reduction", rx, f"must divide the patch grid {rows}x{cols}")
    return rows // ry, cols // rx


def image_token_grid(vision_cfg: VisionConfig, projector_cfg: ProjectorConfig) -> tuple[int, int]:
    """(rows, cols) of LM image tokens per image at the configured size, without building weights;
    (1, keep_tokens) when pruning (the kept tokens are no grid)."""
    rows, cols = reduced_grid(patch_grid(vision_cfg), projector_cfg.block)
    k = projector_cfg.keep_tokens
    check(k <= rows * cols, "keep_tokens", k, f"must be <= the {rows * cols} tokens the reduction leaves")
    return (1, k) if k else (rows, cols)


def tokens_per_image(vision_cfg: VisionConfig, projector_cfg: ProjectorConfig) -> int:
    """LM positions one image occupies (without <img_start>/<img_end>), for sizing sequences."""
    rows, cols = image_token_grid(vision_cfg, projector_cfg)
    return rows * cols


def group_blocks(x: torch.Tensor, grid: tuple[int, int], block: int | tuple[int, int]) -> torch.Tensor:
    """(N, rows*cols, D) raster tokens -> (N, rows/r * cols/r_c, r*r_c, D): each block's tokens,
    blocks in raster order of the reduced grid, tokens within a block in raster order too."""
    n, p, d = x.shape
    rows, cols = grid
    if p != rows * cols:
        raise ValueError(f"projector input has {p} tokens, but grid {rows}x{cols} has {rows * cols}")
    ry, rx = (block, block) if isinstance(block, int) else block
    out_rows, out_cols = reduced_grid(grid, (ry, rx))
    x = x.reshape(n, out_rows, ry, out_cols, rx, d)  # (N, R, dy, C, dx, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, R, C, dy, dx, D)
    return x.reshape(n, out_rows * out_cols, ry * rx, d)


def attention_received(x: torch.Tensor) -> torch.Tensor:
    """(N, T, d) -> (N, T): mean over queries j of softmax_i(x_j · x_i / sqrt(d)) within each image."""
    scores = x.float() @ x.float().transpose(1, 2) / x.shape[-1] ** 0.5  # (N, T_query, T_key)
    return scores.softmax(dim=-1).mean(dim=1)


def keep_top_k(x: torch.Tensor, saliency: torch.Tensor, k: int) -> torch.Tensor:
    """(N, T, d), (N, T) -> (N, k, d): the k most salient tokens of each image, in raster order."""
    idx = saliency.topk(k, dim=1).indices.sort(dim=1).values  # (N, k)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class Projector(nn.Module):
    """(N, rows*cols, in_dim) patch tokens -> (N, rows*cols / (r*r_c), out_dim) LM image tokens
    (N, keep_tokens, out_dim) when pruning."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.cfg = cfg
        ry, rx = cfg.block
        width = in_dim * ry * rx if cfg.reduce == "pixel_shuffle" else in_dim
        if cfg.kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            self.proj = nn.Linear(width, out_dim)
        if cfg.summary:
            self.summary = nn.Linear(out_dim, out_dim)
            nn.init.zeros_(self.summary.weight)  # starts as no summary
            nn.init.zeros_(self.summary.bias)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        rows, cols = reduced_grid(grid, self.cfg.block)
        return (1, self.cfg.keep_tokens) if self.cfg.keep_tokens else (rows, cols)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        blocks = group_blocks(x, grid, self.cfg.block)  # (N, T, r*r_c, D)
        if self.cfg.reduce == "pixel_shuffle":
            x = blocks.flatten(2)  # (N, T, r*r_c*D), block tokens concatenated in raster order
        else:
            x = blocks.mean(dim=2)  # (N, T, D)
        x = self.proj(x)  # (N, T, out_dim)
        if self.cfg.center:
            x = x - x.mean(dim=1, keepdim=True)
        if self.cfg.keep_tokens:
            x = keep_top_k(x, attention_received(x), self.cfg.keep_tokens)
        if self.cfg.summary:
            last = x[:, -1] + self.summary(x.amax(dim=1))  # (N, out_dim)
            x = torch.cat([x[:, :-1], last[:, None]], dim=1)
        return x

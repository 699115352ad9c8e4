"""ViT image encoder, built through timm or read from a transformers folder: images in, patch tokens out.

Any timm ViT-like model (one with a `patch_embed` and `num_prefix_tokens`: vit_*, deit, eva,
beit, ...) is built with `pretrained=False` and optional size overrides, so the tiny CPU config
is the same code as a real checkpoint. `backend: transformers` takes a SigLIP or CLIP vision tower
from a local folder instead (vision/hf_tower.py). Weights only ever come from local files: there is
no network. Prefix tokens are dropped; output tokens keep raster order (row by row, left to right),
which is the order the LM sees them in and the order the 2d image chunking relies on.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from cmoe_base import ConfigError, check
from vision.hf_tower import TransformersTower, tower_geometry


@dataclass
class VisionConfig:
    model_name: str = "vit_tiny_patch16_224"  # any timm ViT-like name; backend transformers: a local folder
    backend: Literal["timm", "transformers"] = "timm"  # transformers: a SigLIP / CLIP vision tower (hf_tower.py)
    # Architecture overrides; None keeps the timm default of `model_name`.
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    dynamic_img_size: bool = False  # accept any input size divisible by the patch size
    # Images at their own size (vision/sizes.py): each image keeps its aspect ratio and is scaled into
    # [min_pixels, max_pixels] (sides multiples of patch × projector block). Both null (default): every
    # image is resized to the square img_size. Needs dynamic_img_size: true (backend timm).
    min_pixels: int | None = None
    max_pixels: int | None = None
    # Tiles (vision/sizes.py, tile_grid): an image larger than img_size becomes up to max_tiles img_size
    # tiles (the grid closest to its aspect ratio) after a global thumbnail; 0 = off. Backend timm.
    max_tiles: int = 0
    # With tiles, is a tile edge a chunk boundary? forced: each tile its own image block (markers between
    # tiles, a newline between tile rows: modality switches, so no concept spans two tiles); learned: the
    # tiles follow each other in one image run and the chunk module decides (docs/design.md §7c, measured).
    tile_boundaries: Literal["forced", "learned"] = "forced"
    drop_path_rate: float = 0.0
    # Weights: `pretrained: true` loads `checkpoint_path` (.safetensors/.pt/.pth), or with backend
    # transformers the folder's safetensors; never downloads.
    pretrained: bool = False
    checkpoint_path: str | None = None
    freeze: bool = False  # no gradients, and the ViT stays in eval mode under .train()
    # Preprocessing (see vision/transforms.py).
    crop_pct: float | None = None  # None = the model's data config (e.g. 0.9); 1.0 = no crop
    augment: bool = False  # mild train-time augmentation: random resized crop, no flip, no colour jitter

    def __post_init__(self) -> None:
        check(bool(self.model_name), "model_name", self.model_name, "must name a timm ViT, e.g. vit_tiny_patch16_224")
        if self.backend == "transformers":
            for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "checkpoint_path", "crop_pct"):
                check(getattr(self, name) is None, name, getattr(self, name),
                      "must be null with backend transformers: the tower folder's config and image processor decide")
            check(not self.dynamic_img_size and self.drop_path_rate == 0, "dynamic_img_size", self.dynamic_img_size,
                  "and drop_path_rate must be off with backend transformers")
            check(self.max_pixels is None and self.min_pixels is None, "max_pixels", self.max_pixels,
                  "must be null with backend transformers (variable image sizes need backend timm)")
            check(self.max_tiles == 0, "max_tiles", self.max_tiles, "must be 0 with backend transformers (tiles need backend timm)")
            return
        check(self.max_tiles >= 0, "max_tiles", self.max_tiles, "must be >= 0 (0 = no tiles)")
        check(self.tile_boundaries in ("forced", "learned"), "tile_boundaries", self.tile_boundaries,
              "must be one of forced, learned")
        check(self.tile_boundaries == "forced" or self.max_tiles, "tile_boundaries", self.tile_boundaries,
              "learned needs max_tiles set (it lays out tiles)")
        if self.max_tiles:
            check(self.max_pixels is None, "max_tiles", self.max_tiles,
                  "and max_pixels are exclusive: tiles are img_size squares; set one of them")
            check(not self.augment, "augment", self.augment, "must be false with max_tiles set (not supported yet)")
        check(self.min_pixels is None or self.max_pixels is not None, "min_pixels", self.min_pixels,
              "needs max_pixels too (variable image sizes), or leave both null for the square img_size")
        if self.max_pixels is not None:
            check(self.max_pixels >= 1, "max_pixels", self.max_pixels, "must be >= 1, or null")
            check(self.min_pixels is None or 1 <= self.min_pixels <= self.max_pixels, "min_pixels", self.min_pixels,
                  f"must be in [1, max_pixels = {self.max_pixels}], or null")
            check(self.dynamic_img_size, "dynamic_img_size", self.dynamic_img_size,
                  "must be true with max_pixels set (the ViT then interpolates its position embeddings per size)")
            check(not self.augment, "augment", self.augment, "must be false with max_pixels set (not supported yet)")
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            check(value is None or value > 0, name, value, "must be > 0, or null for the timm default")
        if self.img_size is not None and self.patch_size is not None:
            check(self.img_size % self.patch_size == 0, "img_size", self.img_size,
                  f"must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim is not None and self.num_heads is not None:
            check(self.embed_dim % self.num_heads == 0, "embed_dim", self.embed_dim,
                  f"must be a multiple of num_heads={self.num_heads}")
        check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
        check(not self.pretrained or self.checkpoint_path is not None, "pretrained", self.pretrained,
              "needs checkpoint_path (a local .safetensors/.pt/.pth file): there is no network to download from")
        check(self.checkpoint_path is None or self.pretrained, "checkpoint_path", self.checkpoint_path,
              "is only loaded with pretrained: true (set it, or remove checkpoint_path)")
        check(self.crop_pct is None or 0.0 < self.crop_pct <= 1.0, "crop_pct", self.crop_pct, "must be in (0, 1], or null")

    @property
    def variable_size(self) -> bool:
        """Images at their own size (max_pixels set), not all resized to img_size."""
        return self.max_pixels is not None

    def timm_kwargs(self) -> dict:
        """Keyword arguments for `timm.create_model`: the overrides that are set."""
        kwargs = {k: getattr(self, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.dynamic_img_size:
            kwargs["dynamic_img_size"] = True
        return dict(kwargs, drop_path_rate=self.drop_path_rate)


def create_vit(cfg: VisionConfig) -> nn.Module:
    """The timm model, randomly initialised, with no classifier head; checked to be ViT-like."""
    if not timm.is_model(cfg.model_name.split(".")[0]):  # a ".tag" suffix names pretrained weights
        raise ConfigError(f"model_name = {cfg.model_name!r}: not a timm model (see timm.list_models('vit_*'))")
    vit = timm.create_model(cfg.model_name, pretrained=False, num_classes=0, **cfg.timm_kwargs())
    patch_embed = getattr(vit, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "grid_size", None) is None or not hasattr(vit, "num_prefix_tokens"):
        raise ConfigError(
            f"model_name = {cfg.model_name!r}: not a ViT-like timm model (needs patch_embed.grid_size and "
            f"num_prefix_tokens, and forward_features returning (N, tokens, D)); got {type(vit).__name__}"
        )
    return vit


def patch_grid(cfg: VisionConfig) -> tuple[int, int]:
    """(rows, cols) of patch tokens at the configured image size, without allocating weights."""
    if cfg.backend == "transformers":
        return tower_geometry(cfg.model_name).grid_size
    with torch.device("meta"):
        vit = create_vit(cfg)
    return tuple(vit.patch_embed.grid_size)


def patch_size(cfg: VisionConfig) -> tuple[int, int]:
    """(height, width) of one ViT patch, without allocating weights."""
    if cfg.backend == "transformers":
        return tower_geometry(cfg.model_name).patch_size
    with torch.device("meta"):
        vit = create_vit(cfg)
    return tuple(vit.patch_embed.patch_size)


def input_size(cfg: VisionConfig) -> tuple[int, int]:
    """(height, width) of the images the encoder takes (img_size, or the timm default), without
    allocating weights. Taken from the model: timm's data config reports the pretrained size."""
    if cfg.backend == "transformers":
        return tower_geometry(cfg.model_name).img_size
    with torch.device("meta"):
        vit = create_vit(cfg)
    return tuple(vit.patch_embed.img_size)


def load_weights(vit: nn.Module, path: str) -> None:
    """Load a local timm-format checkpoint into `vit`; any key or shape mismatch is a ConfigError.

    The model family's own `checkpoint_filter_fn` runs first (as in timm's pretrained loading), so a
    real 224-px checkpoint loads into a model with overridden img_size/patch_size (position and
    patch embeddings are resampled). Classifier-head weights are dropped: the encoder has no head.
    """
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint_path = {path!r}: no such file")
    state = timm.models.load_state_dict(path)
    filter_fn = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, vit)
    heads = vit.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}

    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                    if keys]
        raise ConfigError(f"checkpoint_path = {path!r}: does not match {type(vit).__name__} "
                          f"as configured; {'; '.join(problems)}")
    vit.load_state_dict(state)


class VisionEncoder(nn.Module):
    """images (N, 3, H, W) -> patch tokens (N, P, D_vit), P = rows * cols in raster order."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backend == "transformers":
            self.vit = TransformersTower(cfg.model_name, cfg.pretrained)
        else:
            self.vit = create_vit(cfg)
            if cfg.pretrained:
                load_weights(self.vit, cfg.checkpoint_path)
        if cfg.freeze:
            self.vit.requires_grad_(False)
            self.vit.eval()

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.img_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of patch tokens at the configured img_size."""
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patch tokens for an input of this size; errors if the model cannot take it."""
        ph, pw = self.patch_size
        if not self.cfg.dynamic_img_size and (height, width) != self.img_size:
            raise ValueError(f"image size {(height, width)} != img_size {self.img_size} "
                             f"(set vision.dynamic_img_size: true to accept other sizes)")
        if height % ph or width % pw:
            raise ValueError(f"image size {(height, width)} is not a multiple of patch_size {(ph, pw)}")
        return height // ph, width // pw

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        if self.cfg.freeze:
            self.vit.eval()  # frozen: dropout/drop-path stay off
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape  # (N, 3, H, W)
        rows, cols = self.grid_for(height, width)
        tokens = self.vit.forward_features(images)  # (N, prefix + rows*cols, D)
        if tokens.dim() != 3 or tokens.shape[1] != self.vit.num_prefix_tokens + rows * cols:
            raise ValueError(f"{type(self.vit).__name__}.forward_features gave {tuple(tokens.shape)}, expected "
                             f"({n}, {self.vit.num_prefix_tokens} + {rows}*{cols}, D): not a ViT-like model")
        return tokens[:, self.vit.num_prefix_tokens:]  # (N, rows*cols, D), raster order

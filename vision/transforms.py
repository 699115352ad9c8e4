"""Image preprocessing matched to the encoder: PIL image -> normalised (3, H, W) float tensor.

Built from timm's data config, so switching to a real checkpoint brings its own interpolation,
crop and mean/std. The input size comes from the model itself (`patch_embed.img_size`): timm's
`resolve_data_config` reports the pretrained config's 224 even when img_size is overridden.

Training uses the eval transform unless `vision.augment` is on: the built-in data names sides and
colours in its captions ("red square on the left"), so flips and colour jitter would make the
captions wrong. With augment on, only a mild random resized crop is added.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from vision.encoder import VisionEncoder

TRAIN_CROP_SCALE = (0.5, 1.0)  # random resized crop keeps at least half the image area


def data_config(encoder: VisionEncoder) -> dict[str, Any]:
    """timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for `encoder`."""
    args: dict[str, Any] = {"input_size": (3, *encoder.img_size)}
    if encoder.cfg.crop_pct is not None:
        args["crop_pct"] = encoder.cfg.crop_pct
    return resolve_data_config(args, model=encoder.vit)


def build_image_transform(encoder: VisionEncoder, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL.Image -> FloatTensor (3, H, W) at the encoder's img_size, normalised with its mean/std."""
    cfg = data_config(encoder)
    if train and encoder.cfg.augment:
        return create_transform(**cfg, is_training=True, scale=TRAIN_CROP_SCALE, hflip=0.0, color_jitter=None)
    return create_transform(**cfg, is_training=False)


def image_mean_std(encoder: VisionEncoder) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that the transform normalises with (to undo it for display)."""
    cfg = data_config(encoder)
    return tuple(cfg["mean"]), tuple(cfg["std"])

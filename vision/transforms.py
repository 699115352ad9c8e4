"""Image preprocessing matched to the encoder: PIL image -> normalised (3, H, W) float tensor.

Built from timm's data config, so switching to a real checkpoint brings its own interpolation,
crop and mean/std; a transformers tower (vision/hf_tower.py) brings its image processor's resize,
centre crop, rescale and mean/std, applied as transformers applies them. The input size comes from
the model itself (`patch_embed.img_size`): timm's `resolve_data_config` reports the pretrained
config's 224 even when img_size is overridden.

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
from vision.hf_tower import processor_settings
from vision.sizes import fit_size, tile_grid

TRAIN_CROP_SCALE = (0.5, 1.0)  # random resized crop keeps at least half the image area


def data_config(encoder: VisionEncoder) -> dict[str, Any]:
    """timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for `encoder`."""
    args: dict[str, Any] = {"input_size": (3, *encoder.img_size)}
    if encoder.cfg.crop_pct is not None:
        args["crop_pct"] = encoder.cfg.crop_pct
    return resolve_data_config(args, model=encoder.vit)


def tower_transform(encoder: VisionEncoder, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The transformers tower's image processor as torchvision transforms (`settings_transform`); with
    `vision.augment` in training, a mild random resized crop replaces its resize and crop."""
    from torchvision.transforms import InterpolationMode, v2

    p = processor_settings(encoder.cfg.model_name)
    if train and encoder.cfg.augment:
        resample = InterpolationMode(Image.Resampling(p["resample"]).name.lower())
        crop = v2.RandomResizedCrop(encoder.img_size, scale=TRAIN_CROP_SCALE, interpolation=resample)
        return settings_transform({**p, "size": None, "crop": None}, first=crop)
    return settings_transform(p)


def settings_transform(p: dict[str, Any], first: Callable | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """A tower's preprocessing from its `processor_settings` (also as recorded in an export's processor
    config), as transformers 5.24 runs it (its torchvision backend): the image as a uint8 tensor,
    antialiased resize, centre crop, then rescale and normalise in float; the same pixel values to
    ~1e-7. `first`: a step applied to the uint8 tensor before the resize (training augmentation)."""
    from torchvision.transforms import InterpolationMode, v2

    resample = InterpolationMode(Image.Resampling(p["resample"]).name.lower())
    steps: list[Callable] = [lambda im: im.convert("RGB"), v2.PILToTensor()]
    if first is not None:
        steps.append(first)
    if p["size"] is not None:
        size = p["size"] if isinstance(p["size"], int) else list(p["size"])
        steps.append(v2.Resize(size, interpolation=resample, antialias=True))
    if p["crop"] is not None:
        steps.append(v2.CenterCrop(list(p["crop"])))
    scale = p["rescale"]
    steps.append(lambda x: x.float() * scale if scale is not None else x.float())
    if p["mean"] is not None:
        steps.append(v2.Normalize(list(p["mean"]), list(p["std"])))
    return v2.Compose(steps)


class FitTransform:
    """PIL image -> (3, H, W) at its own size: scaled into the pixel budget with its aspect ratio kept
    (`vision.sizes.fit_size`), no crop, then [0, 1] and normalised with the encoder's mean/std. A class,
    not a closure, so loader workers can pickle it."""

    def __init__(self, unit: tuple[int, int], min_pixels: int, max_pixels: int, interpolation: str,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        self.unit, self.min_pixels, self.max_pixels = tuple(unit), min_pixels, max_pixels
        self.interpolation, self.mean, self.std = interpolation, tuple(mean), tuple(std)

    def size(self, image: Image.Image) -> tuple[int, int]:
        """(H, W) the image is resized to."""
        return fit_size(image.height, image.width, self.unit, self.min_pixels, self.max_pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import functional as F

        image = image.convert("RGB")
        height, width = self.size(image)
        resample = Image.Resampling[self.interpolation.upper()]
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample)
        return F.normalize(F.to_tensor(image), self.mean, self.std)


class TileTransform:
    """PIL image -> `cmoe_base.Tiles` (vision.max_tiles): the thumbnail through the encoder's usual
    transform (the image as an untiled model sees it), and the image resized to rows × cols tiles of
    img_size (`vision.sizes.tile_grid`), each tile normalised with the encoder's mean/std. An image that
    gets one tile stays a plain image (no thumbnail). `forced` (vision.tile_boundaries) picks the layout
    (`cmoe_base.Tiles`)."""

    def __init__(self, base: Callable, tile: tuple[int, int], max_tiles: int, interpolation: str,
                 mean: tuple[float, ...], std: tuple[float, ...], forced: bool = True):
        self.base, self.tile, self.max_tiles, self.forced = base, tuple(tile), max_tiles, forced
        self.interpolation, self.mean, self.std = interpolation, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image):
        from torchvision.transforms import functional as F

        from cmoe_base import Tiles

        image = image.convert("RGB")
        rows, cols = tile_grid(image.height, image.width, self.tile, self.max_tiles)
        if rows * cols == 1:
            return self.base(image)
        th, tw = self.tile
        big = F.normalize(F.to_tensor(image.resize((cols * tw, rows * th), Image.Resampling[self.interpolation.upper()])),
                          self.mean, self.std)  # (3, rows*th, cols*tw)
        tiles = big.unflatten(1, (rows, th)).unflatten(3, (cols, tw)).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, th, tw)
        return Tiles(self.base(image), list(tiles.flatten(0, 1).contiguous()), rows, cols, self.forced)


def fit_transform(encoder: VisionEncoder, unit: tuple[int, int]) -> FitTransform:
    """The variable-size transform of `encoder` (vision.max_pixels set) for token unit `unit`."""
    cfg = data_config(encoder)
    min_pixels = encoder.cfg.min_pixels or unit[0] * unit[1]
    return FitTransform(unit, min_pixels, encoder.cfg.max_pixels, cfg["interpolation"], cfg["mean"], cfg["std"])


def build_image_transform(encoder: VisionEncoder, train: bool,
                          unit: tuple[int, int] | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """PIL.Image -> FloatTensor (3, H, W) at the encoder's img_size, normalised with its mean/std; with
    `vision.max_pixels` set, at the image's own size (`unit`: pixels per LM token, patch × projector
    block; `ConceptMoEVLM.image_transform` passes it)."""
    if encoder.cfg.variable_size:
        if unit is None:
            raise ValueError("vision.max_pixels is set: build_image_transform needs the token unit "
                             "(use ConceptMoEVLM.image_transform)")
        return fit_transform(encoder, unit)
    if encoder.cfg.max_tiles:
        cfg = data_config(encoder)
        base = create_transform(**cfg, is_training=False)
        return TileTransform(base, encoder.img_size, encoder.cfg.max_tiles, cfg["interpolation"], cfg["mean"], cfg["std"],
                             encoder.cfg.tile_boundaries == "forced")
    if encoder.cfg.backend == "transformers":
        return tower_transform(encoder, train)
    cfg = data_config(encoder)
    if train and encoder.cfg.augment:
        return create_transform(**cfg, is_training=True, scale=TRAIN_CROP_SCALE, hflip=0.0, color_jitter=None)
    return create_transform(**cfg, is_training=False)


def image_mean_std(encoder: VisionEncoder) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that the transform normalises with (to undo it for display)."""
    if encoder.cfg.backend == "transformers":
        p = processor_settings(encoder.cfg.model_name)
        return (p["mean"], p["std"]) if p["mean"] is not None else ((0.0,) * 3, (1.0,) * 3)
    cfg = data_config(encoder)
    return tuple(cfg["mean"]), tuple(cfg["std"])

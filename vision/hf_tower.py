"""Vision towers from transformers: SigLIP and CLIP vision models read from a local folder.

`vision.backend: transformers` with `vision.model_name: FOLDER` takes the folder's config.json (a
SiglipVisionModel / CLIPVisionModel, or a full SiglipModel / CLIPModel, whose vision half is used)
and, with `vision.pretrained: true`, its safetensors weights (never a pickle). The encoder's output
is the tower's `last_hidden_state` without its prefix tokens (CLIP's class token): the patch tokens
in raster order, as for timm ViTs. Preprocessing is the tower's own image processor
(preprocessor_config.json; without one, the family's default processor at the tower's image size):
its resize, centre crop, mean and std (`processor_settings`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmoe_base import ConfigError

# config.json model_type -> (transformers model class, prefix tokens, image processor class)
TOWERS = {"siglip_vision_model": ("SiglipVisionModel", 0, "SiglipImageProcessor"),
          "siglip": ("SiglipVisionModel", 0, "SiglipImageProcessor"),
          "clip_vision_model": ("CLIPVisionModel", 1, "CLIPImageProcessor"),
          "clip": ("CLIPVisionModel", 1, "CLIPImageProcessor")}


def tower_config(folder: str | Path) -> tuple[str, dict[str, Any]]:
    """(model_type, the vision config as a dict) of the tower folder, from its config.json alone."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"vision.model_name = {str(folder)!r}: no config.json there (expected a local "
                          f"SiglipVisionModel or CLIPVisionModel folder)")
    raw = json.loads(path.read_text())
    kind = raw.get("model_type")
    if kind not in TOWERS:
        raise ConfigError(f"vision.model_name = {str(folder)!r}: model_type {kind!r} is not a supported tower "
                          f"({', '.join(TOWERS)})")
    return kind, raw.get("vision_config", {}) if kind in ("siglip", "clip") else raw


@dataclass(frozen=True)
class TowerGeometry:
    """The part of timm's `patch_embed` the encoder reads: image and patch size, patch grid."""
    img_size: tuple[int, int]
    patch_size: tuple[int, int]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]


@lru_cache(maxsize=64)
def tower_geometry(folder: str | Path) -> TowerGeometry:
    """Read once per folder: the VLM asks for its tokens per image at every forward."""
    kind, vc = tower_config(folder)
    image, patch = vc.get("image_size", 224), vc.get("patch_size", 32 if kind.startswith("clip") else 16)
    return TowerGeometry((image, image), (patch, patch))


class TransformersTower(nn.Module):
    """A transformers vision tower with the interface VisionEncoder uses of a timm ViT: `patch_embed`
    (geometry), `embed_dim`, `num_prefix_tokens`, `forward_features` -> (N, prefix + P, D)."""

    def __init__(self, folder: str | Path, pretrained: bool):
        super().__init__()
        import transformers

        kind, vision = tower_config(folder)
        class_name, self.num_prefix_tokens, _ = TOWERS[kind]
        cls = getattr(transformers, class_name)
        if pretrained:
            if not any(Path(folder).glob("*.safetensors")):
                raise ConfigError(f"vision.model_name = {str(folder)!r}: no safetensors weights there (pickled "
                                  f"checkpoints are never loaded)")
            self.model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                   output_loading_info=True)
            if info["missing_keys"]:
                raise ConfigError(f"vision.model_name = {str(folder)!r}: its weights lack "
                                  f"{sorted(info['missing_keys'])[:3]}")
        else:
            self.model = cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
        self.model.float()
        self.patch_embed = tower_geometry(folder)
        self.embed_dim = self.model.config.hidden_size

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state


def processor_settings(folder: str | Path) -> dict[str, Any]:
    """The tower's preprocessing: resize (`size`: (h, w), or the shortest edge as an int), `resample` (PIL),
    `crop` ((h, w) or None), `rescale` (factor or None), `mean` and `std` (None: no normalisation)."""
    import transformers

    def get(size: Any, key: str) -> int | None:  # a dict, or transformers' SizeDict
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    def dims(size: Any) -> tuple[int, int] | int | None:
        if size is None:
            return None
        if get(size, "height"):
            return int(get(size, "height")), int(get(size, "width"))
        return int(get(size, "shortest_edge")) if get(size, "shortest_edge") else None

    kind, _ = tower_config(folder)
    geometry = tower_geometry(folder)
    if (Path(folder) / "preprocessor_config.json").is_file():
        proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    else:  # the family's default processor, at the tower's own size
        side = geometry.img_size[0]
        square = {"height": side, "width": side}
        proc = getattr(transformers, TOWERS[kind][2])(
            size=square if get(getattr(transformers, TOWERS[kind][2])().size, "height") else {"shortest_edge": side},
            crop_size=square)

    resize = dims(proc.size) if getattr(proc, "do_resize", True) else None
    crop = dims(getattr(proc, "crop_size", None)) if getattr(proc, "do_center_crop", False) else None
    normalise = getattr(proc, "do_normalize", True)
    out = {"size": resize, "resample": int(getattr(proc, "resample", 3)), "crop": crop,
           "rescale": float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else None,
           "mean": tuple(float(x) for x in proc.image_mean) if normalise else None,
           "std": tuple(float(x) for x in proc.image_std) if normalise else None}
    final = crop or resize
    if not isinstance(final, tuple) or final != geometry.img_size:
        raise ConfigError(f"vision.model_name = {str(folder)!r}: its image processor makes images of {final}, "
                          f"the tower takes {geometry.img_size}")
    return out

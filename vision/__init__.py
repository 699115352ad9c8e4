"""Vision side of the VLM: timm ViT encoder, projector to the LM width, matching preprocessing."""
import cmoe_base  # noqa: F401  first: its runtime defaults must precede torch (cmoe_base/runtime.py)
from vision.encoder import VisionConfig, VisionEncoder, input_size, patch_grid
from vision.projector import Projector, ProjectorConfig, image_token_grid, tokens_per_image
from vision.transforms import build_image_transform, image_mean_std

__all__ = [
    "VisionConfig", "VisionEncoder", "input_size", "patch_grid",
    "ProjectorConfig", "Projector", "image_token_grid", "tokens_per_image",
    "build_image_transform", "image_mean_std",
]

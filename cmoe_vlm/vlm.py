"""ConceptMoE VLM: timm ViT → projector → image tokens interleaved with text → ConceptMoE LM (spec §7).

The packed batch (see data_pipelines) marks image positions with modality 1; each image occupies
exactly `tokens_per_image` consecutive positions in raster order (between `<img_start>` and
`<img_end>` text tokens). Projected patch tokens are written into those positions in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vision import Projector, ProjectorConfig, VisionConfig, VisionEncoder
from vision.projector import image_token_grid

from .chunking import IMAGE
from .model import ConceptMoE, InferenceState, ModelConfig, ModelOutput


@dataclass
class VLMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, crop_pct=1.0))
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of image tokens after the projector's reduction."""
        return image_token_grid(self.vision, self.projector)

    @property
    def tokens_per_image(self) -> int:
        rows, cols = self.image_grid
        return rows * cols


def image_run_index(modality: torch.Tensor) -> torch.Tensor:
    """(B, T) -> index of each image position inside its image (0..P−1); −1 for text."""
    B, T = modality.shape
    is_img = modality == IMAGE
    first = is_img.clone()
    first[:, 1:] &= ~is_img[:, :-1]
    idx = torch.arange(T, device=modality.device).expand(B, T)
    run_start = torch.where(first, idx, 0).cummax(dim=1).values
    return torch.where(is_img, idx - run_start, -1)


def above_patch_index(modality: torch.Tensor, grid_cols: int) -> torch.Tensor:
    """(B, T) -> position of the image token directly above each image token, −1 if none (top row,
    or text). Used by 2D image chunking; always an earlier position, so chunking stays causal."""
    k = image_run_index(modality)
    idx = torch.arange(modality.shape[1], device=modality.device).expand_as(k)
    return torch.where(k >= grid_cols, idx - grid_cols, -1)


class ConceptMoEVLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg.projector, self.vision.embed_dim, cfg.model.dim)
        self.lm = ConceptMoE(cfg.model)

    def embed(self, input_ids: torch.Tensor, modality: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with the projected patch tokens written into image positions. (B, T, d)"""
        x = self.lm.embed(input_ids)
        slots = modality == IMAGE
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * self.cfg.tokens_per_image:
            raise ValueError(f"batch has {n_slots} image positions but {n_images} images × "
                             f"{self.cfg.tokens_per_image} tokens per image; were the sequences built with "
                             f"data.tokens_per_image={self.cfg.tokens_per_image}?")
        if n_images:
            feats = self.projector(self.vision(images), self.vision.grid_size)  # (N, P, d)
            x = x.masked_scatter(slots[..., None], feats.to(x.dtype))
        elif self.training and torch.is_grad_enabled():
            # A text-only batch still runs the vision tower once, on a blank image, at zero weight:
            # every parameter then gets a gradient, so data-parallel ranks (ZeRO's gradient buckets)
            # reduce the same tensors whether or not their batch held images.
            blank = x.new_zeros(1, 3, *self.vision.img_size)
            x = x + 0.0 * self.projector(self.vision(blank), self.vision.grid_size).sum().to(x.dtype)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        modality: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        state: InferenceState | None = None,
        **_: torch.Tensor,
    ) -> ModelOutput:
        """Packed batch -> ModelOutput (logits, losses, per-modality compression). Extra batch keys
        (e.g. num_images) are ignored. With `state`, images must lie wholly inside this span."""
        modality = torch.zeros_like(input_ids) if modality is None else modality
        x = self.embed(input_ids, modality, images)
        above = None
        if self.cfg.model.chunk.image_chunking == "2d":
            above = above_patch_index(modality, self.cfg.image_grid[1])
        return self.lm(inputs_embeds=x, labels=labels, doc_ids=doc_ids, modality=modality, above_index=above,
                       state=state)

    def new_state(self, batch_size: int) -> InferenceState:
        return self.lm.new_state(batch_size)

"""ConceptMoE VLM: timm ViT → projector → image tokens interleaved with text → ConceptMoE LM (docs/design.md §7).

The batch (`cmoe_base.Batch`) marks image positions with Modality.IMAGE; each image occupies
exactly `tokens_per_image` consecutive positions in raster order (between `<img_start>` and
`<img_end>` text tokens). Projected patch tokens are written into those positions in order.
The VLM has the LM's three ways through (`forward`, `extend`, `step`); it adds the image
embeddings and, for 2D image chunking, each patch's neighbour above.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cmoe_base import Batch, Modality
from vision import Projector, ProjectorConfig, VisionConfig, VisionEncoder
from vision.projector import image_token_grid

from .boundaries import BoundaryPolicy
from .conceptmoe import ConceptMoE, DecodingState, ModelConfig, ModelOutput


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
    is_img = modality == Modality.IMAGE
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

    def embed(self, batch: Batch) -> torch.Tensor:
        """Text embeddings with the projected patch tokens written into image positions. (B, T, d)"""
        x = self.lm.embed(batch.input_ids)
        images = batch.images
        n_images = 0 if images is None else images.shape[0]
        if batch.image_tokens != n_images * self.cfg.tokens_per_image:
            raise ValueError(f"batch has {batch.image_tokens} image positions but {n_images} images × "
                             f"{self.cfg.tokens_per_image} tokens per image; were the sequences built with "
                             f"the model's tokens_per_image = {self.cfg.tokens_per_image}?")
        if n_images:
            feats = self.projector(self.vision(images), self.vision.grid_size)  # (N, P, d)
            x = x.masked_scatter((batch.modality == Modality.IMAGE)[..., None], feats.to(x.dtype))
        elif self.training and torch.is_grad_enabled():
            # A text-only batch still runs the vision tower once, on a blank image, at zero weight:
            # every parameter then gets a gradient, so data-parallel ranks (ZeRO's gradient buckets)
            # reduce the same tensors whether or not their batch held images.
            blank = x.new_zeros(1, 3, *self.vision.img_size)
            x = x + 0.0 * self.projector(self.vision(blank), self.vision.grid_size).sum().to(x.dtype)
        return x

    def above_index(self, modality: torch.Tensor) -> torch.Tensor | None:
        """For 2D image chunking, each image token's neighbour above (else None)."""
        if self.cfg.model.chunk.image_chunking != "2d":
            return None
        return above_patch_index(modality, self.cfg.image_grid[1])

    def forward(self, batch: Batch, boundaries: BoundaryPolicy | None = None) -> ModelOutput:
        """A packed batch -> ModelOutput (logits, losses with labels, per-modality compression)."""
        return self.lm(batch, inputs_embeds=self.embed(batch), above_index=self.above_index(batch.modality),
                       boundaries=boundaries)

    def new_state(self, batch_size: int) -> DecodingState:
        return self.lm.new_state(batch_size)

    def extend(self, batch: Batch, state: DecodingState, boundaries: BoundaryPolicy | None = None,
               last_only: bool = False) -> ModelOutput:
        """The next tokens of cached rows (see `ConceptMoE.extend`); images must lie wholly in this span."""
        return self.lm.extend(batch, state, inputs_embeds=self.embed(batch),
                              above_index=self.above_index(batch.modality), boundaries=boundaries, last_only=last_only)

    def step(self, input_ids: torch.Tensor, state: DecodingState, active: torch.Tensor | None = None,
             boundaries: BoundaryPolicy | None = None) -> torch.Tensor:
        """One text token per row (see `ConceptMoE.step`)."""
        return self.lm.step(input_ids, state, active, boundaries)

"""ConceptMoE VLM: timm ViT → projector → image tokens interleaved with text → ConceptMoE LM (docs/design.md §7).

The batch (`cmoe_base.Batch`) marks image positions with Modality.IMAGE; each image occupies
its token grid's rows × cols consecutive positions in raster order (between `<img_start>` and
`<img_end>` text tokens): `tokens_per_image` for the square `vision.img_size`, or each image's own
grid with `vision.max_pixels` set (images at their own size, docs/design.md §7c). Projected patch
tokens are written into those positions in order. The VLM has the LM's three ways through
(`forward`, `extend`, `step`); it adds the image embeddings and, for 2D image chunking, each patch's
neighbour above (on its own image's grid).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cmoe_base import Batch, Modality, check
from vision import Projector, ProjectorConfig, VisionConfig, VisionEncoder
from vision.encoder import patch_size
from vision.projector import image_token_grid
from vision.sizes import fit_size, token_grid

from .boundaries import BoundaryPolicy
from .conceptmoe import ConceptMoE, DecodingState, ModelConfig, ModelOutput


@dataclass
class VLMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3, crop_pct=1.0))
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def __post_init__(self) -> None:
        if self.vision.variable_size:
            check(not self.projector.keep_tokens, "projector.keep_tokens", self.projector.keep_tokens,
                  "must be 0 with vision.max_pixels set (pruned tokens form no grid of the image's own size)")
            uh, uw = self.image_unit
            check(self.vision.max_pixels >= uh * uw, "vision.max_pixels", self.vision.max_pixels,
                  f"must be >= one token's pixels, {uh}x{uw} = {uh * uw} (patch size × projector block)")

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, cols) of image tokens after the projector's reduction, at the square img_size."""
        return image_token_grid(self.vision, self.projector)

    @property
    def tokens_per_image(self) -> int:
        """Image tokens of one image at the square img_size (every image, unless vision.max_pixels is set)."""
        rows, cols = self.image_grid
        return rows * cols

    @property
    def image_unit(self) -> tuple[int, int]:
        """(uh, uw): the pixels one LM image token covers, patch size × projector block."""
        (ph, pw), (ry, rx) = patch_size(self.vision), self.projector.block
        return ph * ry, pw * rx

    @property
    def max_tokens_per_image(self) -> int:
        """The most LM tokens one image may take: tokens_per_image, or with vision.max_pixels the
        budget in tokens (an extreme aspect ratio, kept to one token per side, may go a little over)."""
        if not self.vision.variable_size:
            return self.tokens_per_image
        uh, uw = self.image_unit
        return self.vision.max_pixels // (uh * uw)


def image_run_index(modality: torch.Tensor) -> torch.Tensor:
    """(B, T) -> index of each image position inside its image (0..P−1); −1 for text."""
    B, T = modality.shape
    is_img = modality == Modality.IMAGE
    first = is_img.clone()
    first[:, 1:] &= ~is_img[:, :-1]
    idx = torch.arange(T, device=modality.device).expand(B, T)
    run_start = torch.where(first, idx, 0).cummax(dim=1).values
    return torch.where(is_img, idx - run_start, -1)


def above_patch_index(modality: torch.Tensor, grid_cols: int | torch.Tensor, per_image: int | None = None) -> torch.Tensor:
    """(B, T) -> position of the image token directly above each image token, −1 if none (top row,
    or text). Used by 2D image chunking; always an earlier position, so chunking stays causal.

    grid_cols: one width for every image, or (N,) int64 each image's own, images in row-major order
    of their positions (images at their own size). per_image (with one width): the tokens of one image,
    when an image run may hold several images back to back (tiles, vision.tile_boundaries: learned)."""
    k = image_run_index(modality)
    if per_image is not None:
        k = torch.where(k >= 0, k % per_image, k)
    idx = torch.arange(modality.shape[1], device=modality.device).expand_as(k)
    if isinstance(grid_cols, torch.Tensor):
        if grid_cols.numel() == 0:  # no images
            return torch.full_like(k, -1)
        ordinal = (k == 0).flatten().cumsum(0).view_as(k) - 1  # (B, T) image index of each position, row-major
        cols = grid_cols.to(k.device)[ordinal.clamp(0, grid_cols.numel() - 1)]  # (B, T) its image's width
        grid_cols = torch.where(k >= 0, cols, 0)
    return torch.where(k >= grid_cols, idx - grid_cols, -1)


class ConceptMoEVLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = Projector(cfg.projector, self.vision.embed_dim, cfg.model.dim)
        self.lm = ConceptMoE(cfg.model)
        (ph, pw), (ry, rx) = self.vision.patch_size, cfg.projector.block
        self.image_unit = (ph * ry, pw * rx)  # pixels per LM image token (cfg.image_unit, without a meta ViT)

    def image_grids(self, batch: Batch) -> list[tuple[int, int]]:
        """Each image's (rows, cols) of LM tokens (host): the configured grid, or from its own size."""
        if batch.images is None:
            return []
        if not self.cfg.vision.variable_size:
            return [self.cfg.image_grid] * batch.images.shape[0]
        return [token_grid(h, w, self.image_unit) for h, w in batch.sizes_of_images()]

    def image_grid_of(self, image: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of LM tokens of one transformed image (3, H, W)."""
        if not self.cfg.vision.variable_size:
            return self.cfg.image_grid
        return token_grid(*image.shape[-2:], self.image_unit)

    def image_transform(self, train: bool):
        """PIL image -> (3, H, W): the encoder's transform (at the image's own size with vision.max_pixels)."""
        from vision.transforms import build_image_transform
        return build_image_transform(self.vision, train, unit=self.image_unit if self.cfg.vision.variable_size else None)

    def image_tokens(self, image) -> int:
        """LM tokens of one image as `build_sequence` lays it out: a transformed (3, H, W) tensor, or a
        PIL image (the size the eval transform gives it)."""
        if not self.cfg.vision.variable_size:
            return self.cfg.tokens_per_image
        unit = self.image_unit
        if isinstance(image, torch.Tensor):
            height, width = image.shape[-2:]
        else:  # the size FitTransform gives it
            height, width = fit_size(image.height, image.width, unit, self.cfg.vision.min_pixels or unit[0] * unit[1],
                                     self.cfg.vision.max_pixels)
        rows, cols = token_grid(height, width, unit)
        return rows * cols

    def sequence_tokens_per_image(self):
        """What `build_sequence` takes as tokens_per_image for this model: the fixed count, or a function."""
        return self.image_tokens if self.cfg.vision.variable_size else self.cfg.tokens_per_image

    def encode_images(self, images: torch.Tensor, sizes: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """images (N, 3, H, W), padded at bottom and right, with each one's (H_i, W_i) -> projected tokens
        (sum_i rows_i · cols_i, d), image after image, each in raster order. Images of one size run through
        the ViT together (one call per distinct size; timm's dynamic_img_size interpolates the position
        embeddings), and their tokens are put back in image order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(i)
        if len(groups) == 1:  # one size: no regrouping
            (height, width), = groups
            x = images[:, :, :height, :width]
            return self.projector(self.vision(x), self.vision.grid_for(height, width)).flatten(0, 1)
        counts = [rows * cols for rows, cols in (token_grid(h, w, self.image_unit) for h, w in sizes)]
        starts = torch.tensor([0] + counts[:-1]).cumsum(0)  # (N,) host: each image's first token
        outs, where = [], []
        for (height, width), idx in groups.items():
            feats = self.projector(self.vision(images[idx, :, :height, :width]),
                                   self.vision.grid_for(height, width))  # (n, rows*cols, d)
            outs.append(feats.flatten(0, 1))
            where.append((starts[idx][:, None] + torch.arange(feats.shape[1])).flatten())
        order = torch.cat(where).to(images.device)  # (sum tokens,) destination of each grouped token
        grouped = torch.cat(outs)  # (sum tokens, d) grouped by size
        return grouped.new_empty(grouped.shape).index_copy(0, order, grouped)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Text embeddings with the projected patch tokens written into image positions. (B, T, d)"""
        x = self.lm.embed(batch.input_ids)
        images = batch.images
        n_images = 0 if images is None else images.shape[0]
        if self.cfg.vision.variable_size:
            expected = sum(rows * cols for rows, cols in self.image_grids(batch))
            if batch.image_tokens != expected:
                raise ValueError(f"batch has {batch.image_tokens} image positions but its {n_images} images' "
                                 f"grids (their own sizes, vision.max_pixels) give {expected}; were the "
                                 f"sequences built with the model's image_tokens?")
        elif batch.image_tokens != n_images * self.cfg.tokens_per_image:
            raise ValueError(f"batch has {batch.image_tokens} image positions but {n_images} images × "
                             f"{self.cfg.tokens_per_image} tokens per image; were the sequences built with "
                             f"the model's tokens_per_image = {self.cfg.tokens_per_image}?")
        if n_images and self.cfg.vision.variable_size:
            feats = self.encode_images(images, batch.sizes_of_images())  # (sum tokens, d)
            x = x.masked_scatter((batch.modality == Modality.IMAGE)[..., None], feats.to(x.dtype))
        elif n_images:
            feats = self.projector(self.vision(images), self.vision.grid_size)  # (N, P, d)
            x = x.masked_scatter((batch.modality == Modality.IMAGE)[..., None], feats.to(x.dtype))
        elif self.training and torch.is_grad_enabled():
            # A text-only batch still runs the vision tower once, on a blank image, at zero weight:
            # every parameter then gets a gradient, so data-parallel ranks (ZeRO's gradient buckets)
            # reduce the same tensors whether or not their batch held images.
            blank = x.new_zeros(1, 3, *self.vision.img_size)
            x = x + 0.0 * self.projector(self.vision(blank), self.vision.grid_size).sum().to(x.dtype)
        return x

    def above_index(self, batch: Batch) -> torch.Tensor | None:
        """For 2D image chunking, each image token's neighbour above (else None), on its image's grid."""
        if self.cfg.model.chunk.image_chunking != "2d":
            return None
        if not self.cfg.vision.variable_size:
            return above_patch_index(batch.modality, self.cfg.image_grid[1], self.cfg.tokens_per_image)
        cols = torch.tensor([c for _, c in self.image_grids(batch)], dtype=torch.long)
        return above_patch_index(batch.modality, cols)

    def forward(self, batch: Batch, boundaries: BoundaryPolicy | None = None) -> ModelOutput:
        """A packed batch -> ModelOutput (logits, losses with labels, per-modality compression)."""
        return self.lm(batch, inputs_embeds=self.embed(batch), above_index=self.above_index(batch),
                       boundaries=boundaries)

    def new_state(self, batch_size: int) -> DecodingState:
        return self.lm.new_state(batch_size)

    def extend(self, batch: Batch, state: DecodingState, boundaries: BoundaryPolicy | None = None,
               last_only: bool = False) -> ModelOutput:
        """The next tokens of cached rows (see `ConceptMoE.extend`); images must lie wholly in this span."""
        return self.lm.extend(batch, state, inputs_embeds=self.embed(batch),
                              above_index=self.above_index(batch), boundaries=boundaries, last_only=last_only)

    def step(self, input_ids: torch.Tensor, state: DecodingState, active: torch.Tensor | None = None,
             boundaries: BoundaryPolicy | None = None) -> torch.Tensor:
        """One text token per row (see `ConceptMoE.step`)."""
        return self.lm.step(input_ids, state, active, boundaries)

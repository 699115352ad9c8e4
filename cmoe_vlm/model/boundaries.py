"""Boundary policies: which boundaries the model uses (docs/design.md §2, "Boundary policies").

The chunk module proposes its own boundaries (`chunk.Boundaries`: sampled in training,
thresholded in evaluation, forced at document starts and modality switches); the ratio loss always
steers those. A policy maps them to the boundaries the model then merges, runs the concept model
on and dechunks with. It is passed with each call, never set on the model:

    model(batch)                                    # Learned(): the chunker's own
    model(batch, boundaries=AllTokens())            # every token its own concept (R = 1)
    model(batch, boundaries=ConversionRamp(ramp_steps=200, step=s))  # the conversion ramp, at step s
    InferenceSession(model, boundaries=FixedStride(2.0))             # benchmarks: exactly R = 2
    model(batch, boundaries=ImageStride(2))         # images: a boundary every 2 tokens; text: learned

Every policy keeps the forced boundaries and takes p = 1 wherever it adds a boundary the chunker
did not force (the concept is then its own: the EMA resets), except `FixedStride` and
`ExternalMask`, which keep the chunker's p so the dechunk EMA still weights by its confidence
(and `ImageStride`, which keeps it everywhere). Shapes: (B, T) for spans, (B,) for one decoding
step; positions are document positions; modality holds `Modality` codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from cmoe_base import Modality

from .chunk import Boundaries


class BoundaryPolicy:
    """own boundaries, positions, valid and modality (B, T) or (B,) -> the boundaries the model
    uses. Policies that do not depend on the modality ignore it (callers outside the model may
    leave it out)."""

    def __call__(self, own: Boundaries, positions: torch.Tensor, valid: torch.Tensor,
                 modality: torch.Tensor | None = None) -> Boundaries:
        raise NotImplementedError


@dataclass(frozen=True)
class Learned(BoundaryPolicy):
    """The chunk module's own boundaries (the default)."""

    def __call__(self, own: Boundaries, positions: torch.Tensor, valid: torch.Tensor,
                 modality: torch.Tensor | None = None) -> Boundaries:
        return own


@dataclass(frozen=True)
class AllTokens(BoundaryPolicy):
    """Every token a boundary with p = 1: R = 1, every concept one token (lossless-conversion checks)."""

    def __call__(self, own: Boundaries, positions: torch.Tensor, valid: torch.Tensor,
                 modality: torch.Tensor | None = None) -> Boundaries:
        return Boundaries(p=torch.ones_like(own.p), b=torch.ones_like(own.b), forced=own.forced)


@dataclass(frozen=True)
class ConversionRamp(BoundaryPolicy):
    """The continual-training ramp (train.ratio_ramp_steps): at step `step` of `ramp_steps`, each
    valid token is also made a boundary, p = 1, with probability max(0, 1 − step/ramp_steps). At
    probability 1 a converted model computes what its baseline did; at 0 this is `Learned`."""
    ramp_steps: int
    step: int

    @property
    def probability(self) -> float:
        return max(0.0, 1.0 - self.step / self.ramp_steps) if self.ramp_steps else 0.0

    def __call__(self, own: Boundaries, positions: torch.Tensor, valid: torch.Tensor,
                 modality: torch.Tensor | None = None) -> Boundaries:
        if self.probability <= 0:
            return own
        extra = (torch.rand(own.b.shape, device=own.b.device) < self.probability) & valid
        return Boundaries(p=torch.where(extra, torch.ones_like(own.p), own.p), b=own.b | extra, forced=own.forced)


@dataclass(frozen=True)
class FixedStride(BoundaryPolicy):
    """A boundary every `stride` tokens of a document, whatever the chunker scores: token n is one
    iff ⌊n/R⌋ > ⌊(n−1)/R⌋ (n = 0 always), so exactly ⌈N/R⌉ of N tokens are boundaries, spread
    evenly for a fractional R (R is taken as a fraction of denominator <= 64). Forced boundaries
    stay; p stays the chunker's. The pattern is a table over positions < max_positions, built once
    per device: a decoding step looks one entry up."""
    stride: float
    max_positions: int = 1 << 17
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.stride < 1:
            raise ValueError(f"FixedStride: stride = {self.stride} must be >= 1")

    def pattern(self, device: torch.device) -> torch.Tensor:
        """(max_positions,) bool: whether position n is a boundary."""
        if device not in self._tables:
            r = Fraction(self.stride).limit_denominator(64)
            n = torch.arange(self.max_positions)
            table = (n == 0) | ((n * r.denominator) // r.numerator != ((n - 1) * r.denominator) // r.numerator)
            self._tables[device] = table.to(device)
        return self._tables[device]

    def __call__(self, own: Boundaries, positions: torch.Tensor, valid: torch.Tensor,
                 modality: torch.Tensor | None = None) -> Boundaries:
        return Boundaries(p=own.p, b=self.pattern(positions.device)[positions] | own.forced, forced=own.forced)


@dataclass(frozen=True)
class ExternalMask(BoundaryPolicy):
    """Boundaries given from outside (inspection, benchmarks): `mask` (B, T) bool for the batch it
    is passed with, plus the forced ones; p stays the chunker's."""
    mask: torch.Tensor

    def __call__(self, own: Boundaries, positions: torch.Tensor, valid: torch.Tensor,
                 modality: torch.Tensor | None = None) -> Boundaries:
        if self.mask.shape != own.b.shape:
            raise ValueError(f"ExternalMask: mask {tuple(self.mask.shape)} does not match the batch {tuple(own.b.shape)}")
        return Boundaries(p=own.p, b=self.mask.to(own.b.device) | own.forced, forced=own.forced)


@dataclass(frozen=True)
class ImageStride(BoundaryPolicy):
    """Fixed-stride chunking of images, learned chunking of text: inside each image a boundary at the
    last of every `stride` image tokens in raster order, counted from the image's first token, so the
    concepts are the groups of `stride` consecutive tokens (the image's last token always closes one,
    a forced boundary; stride 1: every image token its own concept, as after a fixed projector
    reduction); text tokens keep the chunk
    module's own boundaries. Forced boundaries stay; p stays the chunker's. Offsets are counted
    within the span, so a span must hold whole images (training, scoring and prefill rows do; a
    decoding step is text, and a step holding an image token is an error)."""
    stride: int

    def __post_init__(self):
        if int(self.stride) != self.stride or self.stride < 1:
            raise ValueError(f"ImageStride: stride = {self.stride} must be an integer >= 1")

    def __call__(self, own: Boundaries, positions: torch.Tensor, valid: torch.Tensor,
                 modality: torch.Tensor | None = None) -> Boundaries:
        if modality is None:
            raise ValueError("ImageStride needs the modality of the tokens")
        image = modality == Modality.IMAGE
        if image.dim() == 1:  # one decoding step: its offset inside an image is unknown here
            if bool(image.any()):
                raise ValueError("ImageStride: a decoding step holds an image token; images go in a span")
            return own
        n = torch.arange(image.shape[1], device=image.device).expand_as(image)
        first = image & ~torch.cat([torch.zeros_like(image[:, :1]), image[:, :-1]], dim=1)
        offset = n - torch.where(first, n, -1).cummax(dim=1).values  # tokens since the image's first
        b = torch.where(image, (offset + 1) % int(self.stride) == 0, own.b) | own.forced
        return Boundaries(p=own.p, b=b, forced=own.forced)

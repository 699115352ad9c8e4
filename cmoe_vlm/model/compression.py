"""What a batch's boundaries compress (docs/design.md §3): token sets, boundary rates, per-modality counts.

    sets = token_sets(modality, valid)            # "all", "text", "image": (B, T) bool
    f, g, n = boundary_rates(p, b, sets["image"])  # F = mean b, G = mean p, n = set size
    compression_stats(p, b, modality, valid)       # per token set: tokens, concepts, Σp (ModelOutput.compression)

Means are masked sums: no host read, no data-dependent shape; an empty set gives 0. The ratio loss
(cmoe_vlm/objective.py) and the logs both read these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cmoe_base import Modality


def token_sets(modality: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token set name -> (B, T) bool: "all" valid tokens, and one set per modality ("text", "image")."""
    return {"all": valid, **{m.label: valid & (modality == m) for m in Modality}}


def boundary_rates(p: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F, G, n) over the token set `mask` (all tokens when None): F = mean b (no gradient),
    G = mean p (fp32), n = the set's size. Masked sums, so no host read and no data-dependent shape;
    an empty set gives F = G = 0."""
    if mask is None:
        mask = torch.ones_like(b, dtype=torch.bool)
    n = mask.sum()
    denom = n.clamp_min(1).float()
    f = ((b & mask).sum() / denom).detach()
    g = (p.float() * mask).sum() / denom
    return f, g, n


@dataclass
class ModalityStats:
    """Compression of one token set in one batch (tensors, so they can be all-reduced)."""
    tokens: torch.Tensor     # () number of tokens
    concepts: torch.Tensor   # () number of boundaries among them
    p_sum: torch.Tensor      # () sum of boundary probabilities

    @property
    def ratio(self) -> float:
        return float(self.tokens) / max(float(self.concepts), 1.0)

    @property
    def mean_p(self) -> float:
        return float(self.p_sum) / max(float(self.tokens), 1.0)


def compression_stats(p: torch.Tensor, b: torch.Tensor, modality: torch.Tensor,
                      valid: torch.Tensor) -> dict[str, ModalityStats]:
    """Per-modality and overall compression over valid tokens. p, b, modality, valid: (B, T)."""
    return {name: ModalityStats(m.sum().detach(), (b & m).sum().detach(), (p.detach() * m).sum())
            for name, m in token_sets(modality, valid).items()}

"""Chunk module: learned boundaries between adjacent tokens (docs/design.md §2). For encoder outputs
h (B, T, d):
    q_n = W_q h_n,  k_{n-1} = W_k h_{n-1},  p_n = (1 - cos(q_n, k_{n-1})) / 2,
with p_n = 1 forced at document starts and at the last token of each modality run
(`forced_boundaries`). The chunk module's own boundaries are sampled in training,
b_n ~ Bernoulli(sharpen(p_n)), and thresholded in evaluation, b_n = [p_n >= 0.5]: what the ratio loss
steers (cmoe_vlm/objective.py, §3). Which boundaries the model then uses is a boundary policy's choice
(boundaries.py; by default these). Concepts are built in merge.py.

Decoding state (`ChunkState`): the unit key of each row's last token, which the next token is scored
against. `forward` scores a packed batch, `extend` the next tokens of cached rows (a decoding step is a
one-token span: a path of its own measured no faster, docs/design.md §9); both compute the same p and b
(tests/cmoe_vlm/test_stages.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cmoe_base import check


@dataclass
class ChunkConfig:
    enabled: bool = True                   # False = baseline MoE (every token its own concept)
    ratio_mode: Literal["joint", "per_modality"] = "joint"
    target_ratio: float = 2.0              # joint mode: R over all tokens
    text_ratio: float = 1.5                # per_modality mode: R for text tokens
    image_ratio: float = 3.0               # per_modality mode: R for image tokens
    ratio_loss_weight: float = 0.03        # λ (paper: 0.03; short runs need more, docs/design.md §3)
    ratio_integral: float = 0.0            # [ours] integral gain of the ratio control (0 = the paper's loss alone)
    image_margin_weight: float = 0.0       # [ours] margin term on image p, inside the ratio loss (0 = off)
    image_margin: float = 0.5              # [ours] the margin term wants |2p - 1| >= this on image tokens
    merge: Literal["sum", "last"] = "sum"  # concept content: sum of its tokens, or its boundary token
    init: Literal["random", "identity"] = "random"  # W_q, W_k initialisation
    sharpen_tau: float = 6.0
    image_chunking: Literal["raster", "2d"] = "raster"
    dechunk_update: bool = False           # dechunk the concept model's update ĉ − x, not ĉ (converted models)
    detach_images: bool = True             # [ours] score image tokens on detached encoder outputs: the ratio loss and
                                           # the boundary gradient train W_q, W_k but never what the model sees
                                           # (with it off the VLM learned no image content: docs/design.md §7b)

    # Keys of older configs: accepted with the value that is now the default, else an error saying why.
    legacy_keys: ClassVar[dict[str, tuple[Any, str]]] = {
        "force_all_boundaries": (False, "was removed: every token a boundary is now the boundary policy "
                                        "AllTokens() (cmoe_vlm.model.boundaries), passed with the batch: "
                                        "model(batch, boundaries=AllTokens())"),
        "split_at_modality_switch": (True, "was removed: every modality run ends in a forced boundary (no "
                                           "concept spans text and image; merge.py relies on it)"),
        "ratio_statistic": ("pooled", "was removed: a per-image statistic did not make image p follow content "
                                      "(docs/design.md §3); use image_margin_weight with projector.center"),
        "sample_boundaries": (True, "was removed: training samples boundaries from the sharpened p "
                                    "(thresholded training gave an eval image ratio of 13 for a target of 2, "
                                    "docs/design.md §7)"),
    }

    def __post_init__(self):
        for name in ("target_ratio", "text_ratio", "image_ratio"):
            check(getattr(self, name) >= 1.0, name, getattr(self, name), "must be >= 1 (1 = no compression)")
        check(self.ratio_loss_weight >= 0, "ratio_loss_weight", self.ratio_loss_weight, "must be >= 0")
        check(self.ratio_integral >= 0, "ratio_integral", self.ratio_integral, "must be >= 0 (0 = off)")
        check(self.sharpen_tau >= 1, "sharpen_tau", self.sharpen_tau, "must be >= 1 (1 = no sharpening)")
        check(self.image_margin_weight >= 0, "image_margin_weight", self.image_margin_weight, "must be >= 0 (0 = off)")
        check(0 < self.image_margin <= 1, "image_margin", self.image_margin, "must be in (0, 1]")

    def targets(self) -> dict[str, float]:
        """Token set name -> target ratio, as the ratio loss uses them."""
        if self.ratio_mode == "joint":
            return {"all": self.target_ratio}
        return {"text": self.text_ratio, "image": self.image_ratio}


def sharpen(p: torch.Tensor, tau: float) -> torch.Tensor:
    """s(p) = p^(1/τ) if p > 0.5 else 1 - (1-p)^(1/τ): pushes p away from 0.5 before sampling."""
    return torch.where(p > 0.5, p.pow(1 / tau), 1 - (1 - p).pow(1 / tau))


@dataclass
class Boundaries:
    """Boundary decisions for B rows of T tokens (or for one token per row: shapes (B,))."""
    p: torch.Tensor       # (B, T) boundary probability; forced positions are 1
    b: torch.Tensor       # (B, T) bool boundary
    forced: torch.Tensor  # (B, T) bool document start or last token of a modality run: always a boundary, p = 1

    @property
    def confidence(self) -> torch.Tensor:
        """c_n = p_n at a boundary, 1 − p_n elsewhere (from the decision actually used)."""
        return torch.where(self.b, self.p, 1 - self.p)

    def at(self, t: int) -> Boundaries:
        """The decisions at position t of every row: shapes (B,)."""
        return Boundaries(self.p[:, t], self.b[:, t], self.forced[:, t])


def last_of_rows(values: torch.Tensor, lengths: torch.Tensor | int, previous: torch.Tensor) -> torch.Tensor:
    """values (B, T, ...) -> each row's entry at its last valid token (row r's first lengths[r]
    tokens are valid; an int: all T), `previous` (B, ...) for rows with none."""
    if isinstance(lengths, int):
        return values[:, -1].clone()  # a copy, not a view that keeps all T
    has, last = lengths > 0, (lengths - 1).clamp_min(0)
    index = last.view(-1, 1, *([1] * (values.dim() - 2))).expand(-1, 1, *values.shape[2:])
    picked = values.gather(1, index)[:, 0]
    return torch.where(has.view(-1, *([1] * (values.dim() - 2))), picked, previous)


@dataclass
class ChunkState:
    """What the next token is scored against: each row's last unit key."""
    last_key: torch.Tensor       # (B, d)

    def select(self, rows: torch.Tensor) -> None:
        self.last_key = self.last_key[rows]


def forced_boundaries(starts: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the boundaries every policy keeps, p = 1: document starts, and the last token of each
    modality run whose successor (same document, same span) is of the other modality. A boundary there
    closes the run's content (merge.py), so the next concept starts with the new modality: no concept
    mixes text and image and no token's content is left out. It is known causally: an image block
    (<img_start>, its tokens, <img_end>) is laid out whole before any of it is scored, and every span
    holds whole blocks."""
    forced = starts.clone()
    forced[:, :-1] |= (modality[:, :-1] != modality[:, 1:]) & ~starts[:, 1:]
    return forced


class ChunkModule(nn.Module):
    """Scores every token against its predecessor (and, for 2D image chunking, the patch above)."""

    def __init__(self, dim: int, cfg: ChunkConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj):
            if self.cfg.init == "identity":
                nn.init.eye_(lin.weight)
            else:
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)

    def _decide(self, p: torch.Tensor, forced: torch.Tensor) -> Boundaries:
        """Forced positions get p = 1; boundaries are sampled (training) or thresholded (evaluation)."""
        p = torch.where(forced, torch.ones_like(p), p)
        if self.training:
            with torch.no_grad():
                b = torch.bernoulli(sharpen(p.detach().float(), self.cfg.sharpen_tau)).bool()
        else:
            b = p >= 0.5
        return Boundaries(p=p, b=b | forced, forced=forced)

    def _span(self, h: torch.Tensor, forced: torch.Tensor, prev_k: torch.Tensor | None,
              above_index: torch.Tensor | None) -> tuple[Boundaries, torch.Tensor]:
        """Boundaries of a span whose first token follows a token of key prev_k (B, 1, d) (None: the
        span starts a document: position 0 is forced, whatever it is compared with); also returns the
        span's unit keys (B, T, d)."""
        q = F.normalize(self.q_proj(h), dim=-1)
        k = F.normalize(self.k_proj(h), dim=-1)
        k_prev = torch.cat([k[:, :1] if prev_k is None else prev_k, k[:, :-1]], dim=1)
        p = ((1 - (q * k_prev).sum(-1)) / 2).clamp(0, 1)  # (B, T)
        if self.cfg.image_chunking == "2d" and above_index is not None:
            has_above = above_index >= 0
            k_above = k.gather(1, above_index.clamp_min(0)[..., None].expand_as(k))
            p_above = ((1 - (q * k_above).sum(-1)) / 2).clamp(0, 1)
            p = torch.where(has_above, torch.maximum(p, p_above), p)
        return self._decide(p, forced), k

    def forward(self, h: torch.Tensor, forced: torch.Tensor, above_index: torch.Tensor | None = None) -> Boundaries:
        """h (B, T, d) encoder outputs; forced (B, T) bool boundaries every policy keeps
        (`forced_boundaries`: document starts, modality run ends); above_index (B, T) index in T of
        the patch above (−1 if none), for 2D chunking. Position 0 of a row is always a document
        start, so it needs no predecessor."""
        return self._span(h, forced, None, above_index)[0]

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> ChunkState:
        return ChunkState(torch.zeros(batch_size, self.k_proj.out_features, device=device, dtype=dtype))

    def extend(self, h: torch.Tensor, forced: torch.Tensor, lengths: torch.Tensor | int, state: ChunkState,
               above_index: torch.Tensor | None = None) -> Boundaries:
        """The next tokens of cached rows: row r's first lengths[r] tokens (an int: all T) follow
        its last token in `state`; the state moves on to each row's last of them (rows with none
        keep theirs). above_index must point inside this span."""
        bnd, k = self._span(h, forced, state.last_key[:, None], above_index)
        state.last_key = last_of_rows(k, lengths, state.last_key)
        return bnd

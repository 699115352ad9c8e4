"""Chunk module: learned boundaries between adjacent tokens, merge into concepts, ratio loss.

Spec §2-§3. For encoder outputs h (B, T, d):
    q_n = W_q h_n,  k_{n-1} = W_k h_{n-1},  p_n = (1 - cos(q_n, k_{n-1})) / 2,
with p_n = 1 forced at document starts and (optionally) modality switches. Training samples
b_n ~ Bernoulli(sharpen(p_n)); evaluation thresholds b_n = [p_n >= 0.5]. The m-th boundary φ(m)
closes concept m, whose content is the tokens (φ(m-1), φ(m)] of the same document.
"""
from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import check

TEXT, IMAGE = 0, 1
MODALITY_NAMES = {TEXT: "text", IMAGE: "image"}


@dataclass
class ChunkConfig:
    enabled: bool = True                   # False = baseline MoE (every token its own concept)
    ratio_mode: Literal["joint", "per_modality"] = "joint"
    target_ratio: float = 2.0              # joint mode: R over all tokens
    text_ratio: float = 1.5                # per_modality mode: R for text tokens
    image_ratio: float = 3.0               # per_modality mode: R for image tokens
    ratio_loss_weight: float = 0.03        # λ (paper: 0.03; short runs need more, spec §12)
    ratio_integral: float = 0.0            # [ours] integral gain of the ratio control (0 = the paper's loss alone)
    merge: Literal["sum", "last"] = "sum"  # concept content: sum of its tokens, or its boundary token
    init: Literal["random", "identity"] = "random"  # W_q, W_k initialisation
    sample_boundaries: bool = True         # training: sample b ~ Bernoulli(sharpen(p)); False: threshold
    sharpen_tau: float = 6.0
    split_at_modality_switch: bool = True  # force a boundary where text turns to image and back
    image_chunking: Literal["raster", "2d"] = "raster"
    force_all_boundaries: bool = False     # every token a boundary (p = 1): R = 1, for lossless-conversion checks
    dechunk_update: bool = False           # dechunk the concept model's update ĉ − x, not ĉ (converted models)

    def __post_init__(self):
        for name in ("target_ratio", "text_ratio", "image_ratio"):
            check(getattr(self, name) >= 1.0, name, getattr(self, name), "must be >= 1 (1 = no compression)")
        check(self.ratio_loss_weight >= 0, "ratio_loss_weight", self.ratio_loss_weight, "must be >= 0")
        check(self.ratio_integral >= 0, "ratio_integral", self.ratio_integral, "must be >= 0 (0 = off)")
        check(self.sharpen_tau >= 1, "sharpen_tau", self.sharpen_tau, "must be >= 1 (1 = no sharpening)")

    def targets(self) -> dict[str, float]:
        """Token set name -> target ratio, as the ratio loss uses them."""
        if self.ratio_mode == "joint":
            return {"all": self.target_ratio}
        return {"text": self.text_ratio, "image": self.image_ratio}


def sharpen(p: torch.Tensor, tau: float) -> torch.Tensor:
    """s(p) = p^(1/τ) if p > 0.5 else 1 - (1-p)^(1/τ): pushes p away from 0.5 before sampling."""
    return torch.where(p > 0.5, p.pow(1 / tau), 1 - (1 - p).pow(1 / tau))


def ratio_loss(p: torch.Tensor, b: torch.Tensor, target: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L = R/(R-1) · ((R-1)·F·G + (1-F)·(1-G)), F = mean b (no grad), G = mean p, over `mask`.

    Minimum 1 at F = G = 1/R. p, b (B, T); mask (B, T) bool selects the token set S.
    """
    if mask is not None:
        p, b = p[mask], b[mask]
    if p.numel() == 0 or target <= 1.0:
        return p.sum() * 0.0
    R = target
    f = b.float().mean().detach()
    g = p.float().mean()
    return R / (R - 1) * ((R - 1) * f * g + (1 - f) * (1 - g))


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
    out = {}
    sets = {"all": valid, **{name: valid & (modality == m) for m, name in MODALITY_NAMES.items()}}
    for name, m in sets.items():
        out[name] = ModalityStats(m.sum().detach(), (b & m).sum().detach(), (p.detach() * m).sum())
    return out


class ChunkingCollapseWarning(UserWarning):
    """The learned chunker stopped compressing (a boundary at every token) or merges nearly everything."""


class CollapseMonitor:
    """Pools compression over a window of steps for every token set, and warns when it collapses.

    Collapse (checked for the token sets that have a target) = ratio below `low` (almost every
    token a boundary) or above `high_factor` × target (almost no boundaries). Warns once per kind
    until the ratio recovers.
    """

    def __init__(self, targets: dict[str, float], window: int = 20, low: float = 1.05, high_factor: float = 4.0):
        self.targets, self.window, self.low, self.high_factor = targets, window, low, high_factor
        self.history: dict[str, deque] = {}
        self.active: set[str] = set()

    def update(self, stats: dict[str, ModalityStats]) -> dict[str, float]:
        """Add one step's stats; returns the windowed ratio per token set (and warns on collapse)."""
        ratios = {}
        for name, s in stats.items():
            hist = self.history.setdefault(name, deque(maxlen=self.window))
            hist.append((float(s.tokens), float(s.concepts)))
            tokens = sum(t for t, _ in hist)
            if tokens == 0:
                continue
            ratio = tokens / max(sum(c for _, c in hist), 1.0)
            ratios[name] = ratio
            if name in self.targets:
                self._check(name, ratio, self.targets[name], full=len(hist) == self.window)
        return ratios

    def _check(self, name: str, ratio: float, target: float, full: bool) -> None:
        kind = "low" if ratio < self.low and target > self.low else (
            "high" if ratio > self.high_factor * target else None)
        if kind is None:
            self.active = {k for k in self.active if not k.startswith(f"{name}:")}
            return
        key = f"{name}:{kind}"
        if full and key not in self.active:
            self.active.add(key)
            what = "nearly every token is a boundary" if kind == "low" else "almost no boundaries are left"
            warnings.warn(f"chunking collapse on {name} tokens: {what} (ratio {ratio:.2f} over the last "
                          f"{self.window} steps, target {target}); check the ratio loss weight "
                          f"(model.chunk.ratio_loss_weight) and learning rate", ChunkingCollapseWarning, stacklevel=3)


@dataclass
class Boundaries:
    p: torch.Tensor  # (B, T) boundary probability, forced positions = 1
    b: torch.Tensor  # (B, T) bool boundary actually used
    k: torch.Tensor | None = None  # (B, T, d) unit keys k_n (a cache keeps the last one for the next token)


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

    def forward(
        self,
        h: torch.Tensor,
        starts: torch.Tensor,
        modality: torch.Tensor,
        prev_k: torch.Tensor | None = None,
        prev_modality: torch.Tensor | None = None,
        above_index: torch.Tensor | None = None,
    ) -> Boundaries:
        """h (B, T, d) encoder outputs; starts (B, T) bool document starts (forced boundaries);
        modality (B, T); prev_k (B, d) / prev_modality (B,) the unit key (`Boundaries.k`) and modality
        of the token before h[:, 0] when decoding with a cache; above_index (B, T) index in T of the
        patch above (−1 if none) for 2D chunking.
        """
        q = F.normalize(self.q_proj(h), dim=-1)
        k = F.normalize(self.k_proj(h), dim=-1)
        if prev_k is None:
            prev_k, prev_modality = k[:, :1], modality[:, :1]  # position 0 is always a start
        else:
            prev_k, prev_modality = prev_k[:, None], prev_modality[:, None]
        k_prev = torch.cat([prev_k, k[:, :-1]], dim=1)
        p = ((1 - (q * k_prev).sum(-1)) / 2).clamp(0, 1)  # (B, T)

        if self.cfg.image_chunking == "2d" and above_index is not None:
            has_above = above_index >= 0
            k_above = k.gather(1, above_index.clamp_min(0)[..., None].expand_as(k))
            p_above = ((1 - (q * k_above).sum(-1)) / 2).clamp(0, 1)
            p = torch.where(has_above, torch.maximum(p, p_above), p)

        forced = torch.ones_like(starts) if self.cfg.force_all_boundaries else starts.clone()
        if self.cfg.split_at_modality_switch:
            forced |= modality != torch.cat([prev_modality, modality[:, :-1]], dim=1)
        p = torch.where(forced, torch.ones_like(p), p)

        if self.training and self.cfg.sample_boundaries:
            with torch.no_grad():
                b = torch.bernoulli(sharpen(p.detach().float(), self.cfg.sharpen_tau)).bool()
        else:
            b = p >= 0.5
        return Boundaries(p=p, b=b | forced, k=k)


@dataclass
class Concepts:
    """The concept sequence of a batch, padded to the longest row (M concepts)."""
    x: torch.Tensor            # (B, M, d) concept inputs (merged tokens)
    positions: torch.Tensor    # (B, M) position of each concept's boundary token (spec §6)
    doc_ids: torch.Tensor      # (B, M) document of each concept, −1 for padding slots
    p: torch.Tensor            # (B, M) boundary probability of the boundary token (for the EMA)
    reset: torch.Tensor        # (B, M) bool, the concept starts a document
    counts: torch.Tensor       # (B,) concepts per row
    token_index: torch.Tensor  # (B, T) each token's latest concept, −1 if none in this span
    tail: torch.Tensor         # (B, d) content after the row's last boundary (sum merge carry)


def merge_concepts(h: torch.Tensor, bnd: Boundaries, starts: torch.Tensor, doc_ids: torch.Tensor,
                   positions: torch.Tensor, merge: str, modality: torch.Tensor | None = None,
                   carry: torch.Tensor | None = None, carry_modality: torch.Tensor | None = None) -> Concepts:
    """Group tokens into concepts. h (B, T, d); starts, doc_ids, positions, modality (B, T).

    `sum`: concept m = Σ h_n over the tokens of (φ(m−1), φ(m)] that share the boundary token's
    document and modality (scatter_add). The forced boundary at a modality switch closes a concept
    at the switch's first token; the other modality's tokens just before it (the unclosed tail of
    the previous run) join no concept, so no concept mixes text and image. `last`: concept m =
    h_{φ(m)}. `carry` (B, d) of `carry_modality` (B,): content before this span not yet closed by
    a boundary (decoding with a cache), added to the span's first concept when the modality matches.
    """
    B, T, d = h.shape
    b = bnd.b
    closed = b.long().cumsum(1)                 # (B, T) boundaries at or before n
    counts = closed[:, -1]
    M = int(counts.max()) if T else 0
    slot = torch.where(b, closed - 1, M)        # boundary token -> its concept, others -> spare slot M
    token_pos = torch.arange(T, device=h.device).expand(B, T)
    bpos = torch.zeros(B, M + 1, dtype=torch.long, device=h.device).scatter_(1, slot, token_pos)
    bpos[:, M] = 0
    valid = torch.arange(M, device=h.device)[None] < counts[:, None]  # (B, M)
    bpos_M = bpos[:, :M]

    doc_M = doc_ids.gather(1, bpos_M)
    if merge == "last":
        x = h.gather(1, bpos_M[..., None].expand(B, M, d))
        tail = torch.zeros_like(h[:, 0])
    else:
        content = closed - b.long()             # (B, T) the concept whose content holds token n
        doc_ext = torch.cat([doc_M, doc_M.new_full((B, 1), -2)], dim=1)  # (B, M+1)
        inside = (content < counts[:, None]) & (doc_ext.gather(1, content) == doc_ids)
        if modality is not None:
            mod_M = modality.gather(1, bpos_M)
            mod_ext = torch.cat([mod_M, mod_M.new_full((B, 1), -2)], dim=1)
            inside &= mod_ext.gather(1, content) == modality
        target = torch.where(inside, content, M)
        x = torch.zeros(B, M + 1, d, dtype=h.dtype, device=h.device)
        x = x.scatter_add(1, target[..., None].expand(B, T, d), h)[:, :M]
        tail = (h * (content == counts[:, None])[..., None]).sum(1)
        if carry is not None:
            has = counts > 0
            if M:
                joins = has if carry_modality is None or modality is None else has & (mod_M[:, 0] == carry_modality)
                x = torch.cat([x[:, :1] + carry[:, None] * joins[:, None, None], x[:, 1:]], dim=1)
            tail = tail + carry * (~has)[:, None]
    return Concepts(
        x=x,
        positions=positions.gather(1, bpos_M),
        doc_ids=torch.where(valid, doc_M, -1),
        p=bnd.p.gather(1, bpos_M),
        reset=starts.gather(1, bpos_M) & valid,
        counts=counts,
        token_index=closed - 1,
        tail=tail,
    )

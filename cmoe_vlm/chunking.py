"""Chunk module: learned boundaries between adjacent tokens, and the ratio loss that steers them.

docs/design.md §2-§3. For encoder outputs h (B, T, d):
    q_n = W_q h_n,  k_{n-1} = W_k h_{n-1},  p_n = (1 - cos(q_n, k_{n-1})) / 2,
with p_n = 1 forced at document starts and (optionally) at the last token of each modality run. The chunk module's own
boundaries are sampled in training, b_n ~ Bernoulli(sharpen(p_n)), and thresholded in evaluation,
b_n = [p_n >= 0.5]: what the ratio loss steers. Which boundaries the model then uses is a boundary
policy's choice (cmoe_vlm/boundaries.py; by default these). Concepts are built in merge.py.

Decoding state (`ChunkState`): the unit key of each row's last token, which the next token is
scored against. `forward` scores a packed batch, `extend` the next tokens of cached
rows, `step` one token per row; all three compute the same p and b (tests/cmoe_vlm/test_stages.py).
"""
from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cmoe_base import Modality, check


@dataclass
class ChunkConfig:
    enabled: bool = True                   # False = baseline MoE (every token its own concept)
    ratio_mode: Literal["joint", "per_modality"] = "joint"
    target_ratio: float = 2.0              # joint mode: R over all tokens
    text_ratio: float = 1.5                # per_modality mode: R for text tokens
    image_ratio: float = 3.0               # per_modality mode: R for image tokens
    ratio_loss_weight: float = 0.03        # λ (paper: 0.03; short runs need more, docs/design.md §3)
    ratio_integral: float = 0.0            # [ours] integral gain of the ratio control (0 = the paper's loss alone)
    ratio_statistic: Literal["pooled", "per_image"] = "pooled"  # [ours] per_image: image F, G per image
    image_margin_weight: float = 0.0       # [ours] margin term on image p, inside the ratio loss (0 = off)
    image_margin: float = 0.5              # [ours] the margin term wants |2p - 1| >= this on image tokens
    merge: Literal["sum", "last"] = "sum"  # concept content: sum of its tokens, or its boundary token
    init: Literal["random", "identity"] = "random"  # W_q, W_k initialisation
    sample_boundaries: bool = True         # training: sample b ~ Bernoulli(sharpen(p)); False: threshold
    sharpen_tau: float = 6.0
    split_at_modality_switch: bool = True  # force a boundary at the last token before text turns to image and back
    image_chunking: Literal["raster", "2d"] = "raster"
    dechunk_update: bool = False           # dechunk the concept model's update ĉ − x, not ĉ (converted models)

    # Keys of older configs: accepted with the value that is now the default, else an error saying why.
    legacy_keys: ClassVar[dict[str, tuple[Any, str]]] = {
        "force_all_boundaries": (False, "was removed: every token a boundary is now the boundary policy "
                                        "AllTokens() (cmoe_vlm.boundaries), passed with the batch: "
                                        "model(batch, boundaries=AllTokens())"),
    }

    def __post_init__(self):
        for name in ("target_ratio", "text_ratio", "image_ratio"):
            check(getattr(self, name) >= 1.0, name, getattr(self, name), "must be >= 1 (1 = no compression)")
        check(self.ratio_loss_weight >= 0, "ratio_loss_weight", self.ratio_loss_weight, "must be >= 0")
        check(self.ratio_integral >= 0, "ratio_integral", self.ratio_integral, "must be >= 0 (0 = off)")
        check(self.sharpen_tau >= 1, "sharpen_tau", self.sharpen_tau, "must be >= 1 (1 = no sharpening)")
        check(self.ratio_statistic in ("pooled", "per_image"), "ratio_statistic", self.ratio_statistic,
              "must be 'pooled' or 'per_image'")
        check(self.ratio_statistic == "pooled" or self.ratio_mode == "per_modality", "ratio_statistic",
              self.ratio_statistic, "per_image needs ratio_mode: per_modality (joint mode has one token set)")
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


def ratio_loss(p: torch.Tensor, b: torch.Tensor, target: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L = R/(R-1) · ((R-1)·F·G + (1-F)·(1-G)), F = mean b (no grad), G = mean p, over `mask`.

    Minimum 1 at F = G = 1/R; 0 for an empty set or R <= 1. p, b (B, T); mask (B, T) bool selects
    the token set S.
    """
    if target <= 1.0:
        return p.sum() * 0.0
    R = target
    f, g, n = boundary_rates(p, b, mask)
    loss = R / (R - 1) * ((R - 1) * f * g + (1 - f) * (1 - g))
    return torch.where(n > 0, loss, loss * 0.0)


def image_ids(modality: torch.Tensor) -> torch.Tensor:
    """(B, T) -> index of the image each image token belongs to (0, 1, ... in row-major order over
    the batch; consecutive image tokens form one image); −1 for text."""
    is_img = modality == Modality.IMAGE
    first = is_img.clone()
    first[:, 1:] &= ~is_img[:, :-1]
    ids = first.flatten().long().cumsum(0).view_as(modality) - 1
    return torch.where(is_img, ids, -1)


def per_group_ratio_loss(p: torch.Tensor, b: torch.Tensor, target: float, groups: torch.Tensor) -> torch.Tensor:
    """The ratio loss of each group from its own F_g and G_g, averaged over groups. p, b, groups (B, T);
    groups ≥ 0 name a token's group (e.g. `image_ids`), −1 leaves it out. With one group this is
    `ratio_loss`; with images as groups every image is pulled to the target ratio on its own, where
    the pooled loss lets some images be one chunk and others all boundaries. Scatter sums into B·T + 1
    slots (the last one collects the left-out tokens): no host read, no data-dependent shape."""
    if target <= 1.0:
        return p.sum() * 0.0
    slots = groups.numel() + 1
    g = torch.where(groups >= 0, groups, slots - 1).flatten()
    zeros = torch.zeros(slots, device=p.device)
    count = zeros.index_add(0, g, torch.ones_like(g, dtype=zeros.dtype))[:-1]
    f = zeros.index_add(0, g, b.flatten().float())[:-1].detach() / count.clamp_min(1)
    gp = zeros.index_add(0, g, p.flatten().float())[:-1] / count.clamp_min(1)
    R, used = target, (count > 0).float()
    per_group = R / (R - 1) * ((R - 1) * f * gp + (1 - f) * (1 - gp))
    return (per_group * used).sum() / used.sum().clamp_min(1)


def margin_loss(p: torch.Tensor, mask: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over `mask` of relu(margin − |2p − 1|): zero once every p is at least margin/2 from the
    0.5 threshold (0 for an empty mask). p (B, T); mask (B, T) bool. Forced boundaries (p = 1) cost
    nothing. [ours] The ratio loss only sets the mean of p, and with sharpened sampling (τ = 6) a p
    just above or below 0.5 is a boundary with probability 0.89 or 0.11, so p can sit at 0.5 ± 0.01
    on every image token, blind to content, while training meets the target; the evaluation
    threshold then flips whole images. This term makes p decide (bench/bench_image_adaptivity.py)."""
    gap = F.relu(margin - (2 * p.float() - 1).abs())
    return (gap * mask).sum() / mask.sum().clamp_min(1)


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


def token_sets(modality: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token set name -> (B, T) bool: "all" valid tokens, and one set per modality ("text", "image")."""
    return {"all": valid, **{m.label: valid & (modality == m) for m in Modality}}


def compression_stats(p: torch.Tensor, b: torch.Tensor, modality: torch.Tensor,
                      valid: torch.Tensor) -> dict[str, ModalityStats]:
    """Per-modality and overall compression over valid tokens. p, b, modality, valid: (B, T)."""
    return {name: ModalityStats(m.sum().detach(), (b & m).sum().detach(), (p.detach() * m).sum())
            for name, m in token_sets(modality, valid).items()}


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
    """Boundary decisions for B rows of T tokens (or for one token per row: shapes (B,))."""
    p: torch.Tensor       # (B, T) boundary probability; forced positions are 1
    b: torch.Tensor       # (B, T) bool boundary
    forced: torch.Tensor  # (B, T) bool document start or last token of a modality run: always a boundary, p = 1

    @property
    def confidence(self) -> torch.Tensor:
        """c_n = p_n at a boundary, 1 − p_n elsewhere (from the decision actually used)."""
        return torch.where(self.b, self.p, 1 - self.p)


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


def forced_boundaries(starts: torch.Tensor, modality: torch.Tensor, split_at_modality_switch: bool = True
                      ) -> torch.Tensor:
    """(B, T) bool: the boundaries every policy keeps, p = 1: document starts and, when splitting at
    modality switches, the last token of each modality run whose successor (same document, same
    span) is of the other modality. A boundary there closes the run's content (merge.py), so the
    next concept starts with the new modality: no concept mixes text and image and no token's
    content is left out. It is known causally: an image block (<img_start>, its tokens, <img_end>) is
    laid out whole before any of it is scored, and every span holds whole blocks."""
    forced = starts.clone()
    if split_at_modality_switch:
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
        if self.training and self.cfg.sample_boundaries:
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

    def step(self, h: torch.Tensor, forced: torch.Tensor, state: ChunkState,
             active: torch.Tensor | None = None) -> Boundaries:
        """One token per row: h (B, d), forced (B,); rows with active False (B,) keep their state.
        Returns Boundaries of shape (B,)."""
        q = F.normalize(self.q_proj(h), dim=-1)
        k = F.normalize(self.k_proj(h), dim=-1)
        p = ((1 - (q * state.last_key).sum(-1)) / 2).clamp(0, 1)  # (B,)
        state.last_key = k if active is None else torch.where(active[:, None], k, state.last_key)
        return self._decide(p, forced)

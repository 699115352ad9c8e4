"""Collapse of the learned chunking, watched over a window of training steps (docs/design.md §3).

Single batches swing, so compression is judged on windows: training pools each token set's tokens and
boundaries over the last 20 steps and warns when the pooled ratio falls below 1.05 (nearly every token a
boundary) or rises above 4 × target (almost none left).
"""
from __future__ import annotations

import warnings
from collections import deque

from ..model.compression import ModalityStats


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

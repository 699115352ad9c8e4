"""Dechunk module: EMA over concept outputs, plugged back into tokens (docs/design.md §4).

    c̄_1 = ĉ_1,   c̄_m = P_m · ĉ_m + (1 − P_m) · c̄_{m−1}    (reset at every document start)

A boundary with P = 1 (forced) also resets: c̄_m = ĉ_m exactly, not with P clamped to 1 − 1e−4.
Each token then takes the c̄ of its latest concept (`plug_back`).

This is the linear recurrence y_m = a_m y_{m−1} + u_m with a = 1 − P (0 at a reset), u = P·ĉ.
`ema_scan` solves it as a blocked scan: the M concepts are cut into blocks of Q; the Q positions
of a block are stepped through with elementwise ops applied to all M/Q blocks at once, the
block-end states (which obey the same recurrence) are chained by calling the scan on them
recursively, and each block then adds its incoming state times the decay from its start (a
cumulative product of a ∈ [0, 1]: no exp(−cumsum), nothing overflows). Work is O(M·D) in
O(Q·log_Q M) vectorised steps. The backward pass is the same recurrence run in reverse.

Decoding state (`DechunkState`): each row's latest c̄. `forward` smooths a packed batch,
`extend` the new concepts of cached rows, `step` at most one new concept per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .merge import Concepts


def _scan(u: torch.Tensor, a: torch.Tensor, block: int) -> torch.Tensor:
    """y_m = a_m y_{m−1} + u_m (y_0 = 0). u (B, M, D), a (B, M) -> y (B, M, D); no autograd."""
    B, M, D = u.shape
    Q = max(1, min(block, M))
    nb = -(-M // Q)
    pad = nb * Q - M
    u = torch.nn.functional.pad(u, (0, 0, 0, pad)).view(B, nb, Q, D)
    a = torch.nn.functional.pad(a, (0, pad), value=1.0).view(B, nb, Q)
    y = torch.empty_like(u)
    acc = y[:, :, 0] = u[:, :, 0]
    for i in range(1, Q):  # Q steps, each over all nb blocks
        acc = y[:, :, i] = torch.addcmul(u[:, :, i], a[:, :, i, None], acc)
    if nb > 1:
        decay = a.cumprod(-1)  # (B, nb, Q): decay from the block's start through position i
        states = _scan(y[:, :, -1], decay[..., -1], block)  # (B, nb, D) state at each block's end
        prev = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
        y = torch.addcmul(y, decay[..., None], prev[:, :, None])
    return y.reshape(B, nb * Q, D)[:, :M]


class _EMAScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, a: torch.Tensor, block: int) -> torch.Tensor:
        y = _scan(u, a, block)
        ctx.save_for_backward(a, y)
        ctx.block = block
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, y = ctx.saved_tensors
        # G_m = dL/dy_m in total = g_m + a_{m+1} G_{m+1}: the recurrence, reversed.
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        G = _scan(g.flip(1), a_next.flip(1), ctx.block).flip(1)
        y_prev = torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)
        return G, (G * y_prev).sum(-1), None


def ema_scan(u: torch.Tensor, a: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Solve y_m = a_m · y_{m−1} + u_m (y_0 = 0) for all m. u (B, M, D); a (B, M) in [0, 1]
    (0 resets the recurrence). Returns y (B, M, D) in u's dtype, computed in fp32 (fp64 for fp64)."""
    if u.shape[1] == 0:
        return u
    work = torch.promote_types(u.dtype, torch.float32)
    return _EMAScan.apply(u.to(work), a.to(work), block).to(u.dtype)


@dataclass
class DechunkState:
    c_bar: torch.Tensor  # (B, d) each row's latest smoothed concept

    def select(self, rows: torch.Tensor) -> None:
        self.c_bar = self.c_bar[rows]


class DechunkModule(nn.Module):
    """Smooths concept outputs with their boundary confidence and plugs them back into tokens."""

    def __init__(self, p_clamp: float = 1e-4, block: int = 16):
        super().__init__()
        self.p_clamp, self.block = p_clamp, block

    def ema(self, c_hat: torch.Tensor, p: torch.Tensor, reset: torch.Tensor,
            init: torch.Tensor | None = None) -> torch.Tensor:
        """c_hat (B, M, d) concept-model outputs; p (B, M) boundary probability of each concept's
        boundary token; reset (B, M) bool, concept starts a document; init (B, d) the previous
        c̄ when continuing from a cache. Returns c̄ (B, M, d)."""
        out_dtype = c_hat.dtype
        u, a = self._coefficients(c_hat, p, reset)
        if init is not None:  # prepend the carried state as concept 0 (a reset)
            u = torch.cat([init[:, None].to(u.dtype), u], dim=1)
            a = torch.cat([a.new_zeros(a.shape[0], 1), a], dim=1)
            return ema_scan(u, a, self.block)[:, 1:].to(out_dtype)
        return ema_scan(u, a, self.block).to(out_dtype)

    @staticmethod
    def resets(concepts: Concepts) -> torch.Tensor:
        """(B, M) bool: the EMA restarts at a document start and at a forced boundary (P = 1)."""
        return concepts.layout.starts | (concepts.p >= 1)

    def forward(self, c_hat: torch.Tensor, concepts: Concepts) -> torch.Tensor:
        """c_hat (B, M, d) for the concepts of a packed batch -> each token's c̄ (B, T, d)."""
        return plug_back(self.ema(c_hat, concepts.p, self.resets(concepts)), concepts.token_index)

    def new_state(self, batch_size: int, dim: int, device: torch.device, dtype: torch.dtype) -> DechunkState:
        return DechunkState(torch.zeros(batch_size, dim, device=device, dtype=dtype))

    def extend(self, c_hat: torch.Tensor, concepts: Concepts, state: DechunkState) -> torch.Tensor:
        """The new concepts of cached rows (row r: the first counts[r]) -> each new token's c̄ (B, T, d);
        tokens before their row's first new concept take the c̄ carried in."""
        c_bar = self.ema(c_hat, concepts.p, self.resets(concepts), init=state.c_bar)
        c_bar = torch.cat([state.c_bar[:, None], c_bar], dim=1)  # index 0 = the concept carried in
        state.c_bar = c_bar.gather(1, concepts.counts[:, None, None].expand(-1, 1, c_bar.shape[-1]))[:, 0]
        return plug_back(c_bar, concepts.token_index + 1)

    def step(self, c_hat: torch.Tensor, p: torch.Tensor, closes: torch.Tensor, state: DechunkState) -> torch.Tensor:
        """At most one new concept per row: c_hat (B, d) and p (B,) for the rows where `closes` (B,);
        the others keep their c̄. -> c̄ (B, d). The same arithmetic as `ema` with init and M = 1."""
        u, a = self._coefficients(c_hat, p, p >= 1)
        c_bar = torch.addcmul(u, a[..., None], state.c_bar.to(u.dtype)).to(c_hat.dtype)
        state.c_bar = torch.where(closes[:, None], c_bar, state.c_bar)
        return state.c_bar

    def _coefficients(self, c_hat: torch.Tensor, p: torch.Tensor, reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrence's u = P·ĉ and a = 1 − P (ĉ and 0 at a reset), in fp32 (fp64 for fp64)."""
        work = torch.promote_types(c_hat.dtype, torch.float32)
        p = p.to(work).clamp(self.p_clamp, 1 - self.p_clamp)
        c_hat = c_hat.to(work)
        u = torch.where(reset[..., None], c_hat, p[..., None] * c_hat)
        a = torch.where(reset, torch.zeros_like(p), 1 - p)
        return u, a


def plug_back(c_bar: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """c_bar (B, M, d), token_index (B, T) index of each token's latest concept -> (B, T, d)."""
    return c_bar.gather(1, token_index[..., None].expand(-1, -1, c_bar.shape[-1]))


def straight_through_one(c: torch.Tensor) -> torch.Tensor:
    """STE(c): 1 in the forward pass, gradient passed to c unchanged in the backward pass."""
    return 1.0 + (c - c.detach())  # c - c.detach() is exactly 0

"""Dechunk module: EMA over concept outputs, scattered back to tokens (spec §4).

    c̄_1 = ĉ_1,   c̄_m = P_m · ĉ_m + (1 − P_m) · c̄_{m−1}    (reset at every document start)

This is the linear recurrence y_m = a_m y_{m−1} + u_m with a = 1 − P, u = P·ĉ. `ema_scan`
computes it in parallel: blocks of Q concepts are solved with a Q×Q matrix of decays built from
segment sums of log a (no global exp(−cumsum), which overflows), and the block-end states, which
follow the same recurrence, are chained by calling the scan on them recursively.
"""
from __future__ import annotations

import torch
from torch import nn


def _segsum(log_a: torch.Tensor) -> torch.Tensor:
    """log_a (..., L) -> (..., L, L) with out[i, j] = Σ_{k=j+1..i} log_a[k] for j <= i, −inf above.

    Built by a masked cumsum rather than a difference of cumsums, so −inf entries (resets) give
    exact zeros after exp and no inf − inf.
    """
    L = log_a.shape[-1]
    x = log_a[..., None].expand(*log_a.shape, L)  # x[..., i, j] = log_a[i]
    strict = torch.ones(L, L, dtype=torch.bool, device=log_a.device).tril(-1)
    x = x.masked_fill(~strict, 0.0).cumsum(dim=-2)
    return x.masked_fill(~strict.logical_or(torch.eye(L, dtype=torch.bool, device=log_a.device)), float("-inf"))


def ema_scan(u: torch.Tensor, log_a: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Solve y_m = a_m · y_{m−1} + u_m (y_0 = 0) for all m in parallel.

    u (B, M, D); log_a (B, M) with log_a = −inf where the recurrence resets. Returns y (B, M, D)
    in u's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    B, M, D = u.shape
    dtype = u.dtype
    if M == 0:
        return u
    work = torch.promote_types(dtype, torch.float32)
    Q = min(block, max(M, 1))
    nb = -(-M // Q)
    pad = nb * Q - M
    u = torch.nn.functional.pad(u.to(work), (0, 0, 0, pad)).view(B, nb, Q, D)
    log_a = torch.nn.functional.pad(log_a.to(work), (0, pad)).view(B, nb, Q)

    # Within each block, from a zero state: y_i = Σ_{j<=i} exp(Σ_{k=j+1..i} log a_k) u_j.
    y = torch.exp(_segsum(log_a)) @ u  # (B, nb, Q, D)
    if nb > 1:
        # The block-end states obey the same recurrence, s_c = exp(Σ_{k in c} log a_k) s_{c−1} + y_c[last]:
        # solve it recursively (O(M) overall), then add each block's incoming state, decayed.
        decay_in = log_a.cumsum(-1)  # (B, nb, Q): log of the decay from block start through i
        states = ema_scan(y[:, :, -1], decay_in[..., -1], block)  # (B, nb, D)
        prev = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
        y = torch.addcmul(y, torch.exp(decay_in)[..., None], prev[:, :, None])
    return y.reshape(B, nb * Q, D)[:, :M].to(dtype)


class DechunkModule(nn.Module):
    """Smooths concept outputs with their boundary confidence and plugs them back into tokens."""

    def __init__(self, p_clamp: float = 1e-4, block: int = 32):
        super().__init__()
        self.p_clamp, self.block = p_clamp, block

    def forward(self, c_hat: torch.Tensor, p: torch.Tensor, reset: torch.Tensor,
                init: torch.Tensor | None = None) -> torch.Tensor:
        """c_hat (B, M, d) concept-model outputs; p (B, M) boundary probability of each concept's
        boundary token; reset (B, M) bool, concept starts a document; init (B, d) the previous
        c̄ when continuing from a cache. Returns c̄ (B, M, d)."""
        out_dtype, work = c_hat.dtype, torch.promote_types(c_hat.dtype, torch.float32)
        p = p.to(work).clamp(self.p_clamp, 1 - self.p_clamp)
        c_hat = c_hat.to(work)
        u = torch.where(reset[..., None], c_hat, p[..., None] * c_hat)
        log_a = torch.where(reset, torch.full_like(p, float("-inf")), torch.log1p(-p))
        if init is not None:  # prepend the carried state as concept 0 (a reset)
            u = torch.cat([init[:, None].to(work), u], dim=1)
            log_a = torch.cat([log_a.new_full((log_a.shape[0], 1), float("-inf")), log_a], dim=1)
            return ema_scan(u, log_a, self.block)[:, 1:].to(out_dtype)
        return ema_scan(u, log_a, self.block).to(out_dtype)


def plug_back(c_bar: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """c_bar (B, M, d), token_index (B, T) index of each token's latest concept -> (B, T, d)."""
    return c_bar.gather(1, token_index[..., None].expand(-1, -1, c_bar.shape[-1]))


def straight_through_one(c: torch.Tensor) -> torch.Tensor:
    """STE(c): 1 in the forward pass, gradient passed to c unchanged in the backward pass."""
    return 1.0 + (c - c.detach())  # c - c.detach() is exactly 0

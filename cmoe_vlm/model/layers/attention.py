"""Causal self-attention: RoPE, GQA, document-causal masking, a KV cache per row.

Two ways in. `Attention.forward` runs a whole packed batch (training, scoring): who may attend to
whom is an `AttentionLayout` (layers/document_attention.py: document-causal kernels with no (T, T)
mask), built once per forward and level (tokens, concepts) from the batch's `DocumentLayout` and
shared by every layer. `Attention.extend` continues rows from a `KVCache`
(prefill, decoding): each row holds one document, so causality inside the cache is all it needs.
Joint decoding (docs/design.md §5) enters as `extra_qkv`, added to the layer's own Q/K/V projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .document_attention import AttentionLayout
from .norm import RMSNorm
from .rope import apply_rope

__all__ = ["Attention", "AttentionConfig", "AttentionLayout", "KVCache"]


@dataclass
class AttentionConfig:
    """One attention layer's shape and options. head_dim is its own field (HF families set it apart
    from dim/heads). The options default to the plain layer; imported families set them:
    q/k/v bias (Qwen2-MoE), output bias too (Qwen3-MoE, OLMoE), q/k RMSNorm before RoPE, per head
    over head_dim ("head", Qwen3-MoE) or over the whole q and k projections ("full", OLMoE), and
    q/k/v clipped to ±clip_qkv after it (OLMoE)."""
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"
    clip_qkv: float | None = None
    norm_eps: float = 1e-6  # of the q/k norms, and of the block's pre-norms

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim


class KVCache:
    """Keys/values of one attention layer for a batch, with a separate length per row.

    Stored as (B, H_kv, capacity, Dh), the layout attention reads: a prefix [:, :, :L] keeps unit
    stride within each head, so decoding attends to it in place (the (B, L, H, Dh) layout made the
    CPU attention kernel 2x slower at 16K keys). Grows by doubling. Rows are written at their own
    length, so a batch whose rows advance at different rates (the concept model, where only rows
    that hit a boundary take a step) shares one cache. While every row has the same length, that
    length is also kept as a Python int (`common_length`): a decode step then writes and masks
    without reading the lengths tensor (each read or small op costs µs, per layer, per token).
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, device, dtype, capacity: int = 256):
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.common_length: int | None = 0  # every row's length when they are equal, else None

    def _grow(self, needed: int) -> None:
        cap = self.k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        pad = (0, 0, 0, new_cap - cap)
        self.k = F.pad(self.k, pad)
        self.v = F.pad(self.v, pad)

    def append(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """Write k, v (b, H, S, Dh) for `rows` (b,) at their current lengths (lengths do not advance:
        call `advance`). Returns the rows' keys and values up to their new ends, (b, H, L, Dh), and
        the rows' start offsets: an int when all rows of the cache are written at one offset, else
        (b,). `rows` must be distinct and increasing; None = all rows."""
        S = k.shape[2]
        all_rows = rows is None or rows.numel() == self.k.shape[0]  # distinct and increasing: == arange(B)
        if all_rows and self.common_length is not None:  # a slice write, no lengths read
            start = self.common_length
            end = start + S
            self._grow(end)
            self.k[:, :, start:end] = k if k.dtype == self.k.dtype else k.to(self.k.dtype)
            self.v[:, :, start:end] = v if v.dtype == self.v.dtype else v.to(self.v.dtype)
            return self.k[:, :, :end], self.v[:, :, :end], start  # views (decode reads them every step)
        start_b = self.lengths if all_rows else self.lengths[rows]  # (b,)
        end = int(start_b.max()) + S
        self._grow(end)
        pos = start_b[:, None] + torch.arange(S, device=k.device)  # (b, S)
        r = torch.arange(self.k.shape[0], device=k.device)[:, None] if all_rows else rows[:, None]
        # advanced indices (b, S) around the head slice put their dims first: write (b, S, H, Dh)
        self.k[r, :, pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[r, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        if all_rows:
            return self.k[:, :, :end], self.v[:, :, :end], start_b.clone()
        return self.k[rows, :, :end], self.v[rows, :, :end], start_b

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (b,), in that order (drop finished rows of a batch)."""
        self.k, self.v = self.k[rows], self.v[rows]
        self.set_lengths(self.lengths[rows])

    def advance(self, n: torch.Tensor | int, rows: torch.Tensor | None = None) -> None:
        """lengths[rows] += n (rows None = all); n an int or a tensor per row."""
        if rows is None and isinstance(n, int):
            self.lengths += n
            if self.common_length is not None:
                self.common_length += n
            return
        if rows is None:
            self.lengths += n
        else:
            self.lengths[rows] += n
        self.set_lengths(self.lengths)

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Set every row's length (e.g. rewind to an earlier point; entries past it are overwritten later)."""
        self.lengths = lengths
        first = int(lengths.min()) if lengths.numel() else 0
        self.common_length = first if lengths.numel() == 0 or int(lengths.max()) == first else None

    def bytes(self) -> int:
        """Bytes held by the valid entries of all rows."""
        per_entry = self.k.shape[1] * self.k.shape[3] * self.k.element_size() * 2
        return int(self.lengths.sum()) * per_entry


# From this many keys a decode step attends by `one_query_attention`; below, the fused kernel was as fast
# or faster (2-core CPU, GQA 8/4, Dh 32, load 12, median µs fused vs matmuls: 512 keys 73 vs 122 at batch
# 1, 303 vs 331 at batch 8; 4K: 274 vs 282, 4035 vs 2933; 16K: 2500 vs 2084, 98817 vs 51182).
ONE_QUERY_MIN_KEYS = 2048


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per row over all of its keys (a decode step): q (B, H, 1, Dh), k and v (B, H_kv, L, Dh)
    -> (B, H, 1, Dh). The G = H / H_kv query heads of a KV head are one (G, Dh) @ (Dh, L) matmul, so
    each cached key and value is read once per KV head (the fused CPU kernel reads them once per query
    head), and two small matmuls fork no thread team on CPU: the fused kernel's did at every layer of
    every step, and on a busy machine waiting for the second thread cost more than the step.
    Scores and softmax in fp32."""
    B, H, _, Dh = q.shape
    H_kv = k.shape[1]
    q_g = q.reshape(B, H_kv, H // H_kv, Dh)
    scores = torch.matmul(q_g, k.transpose(-1, -2)).float() * Dh ** -0.5  # (B, H_kv, G, L)
    y = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (B, H_kv, G, Dh)
    return y.reshape(B, H, 1, Dh)


class Attention(nn.Module):
    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, cfg.qkv_dim, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.q_dim, cfg.dim, bias=cfg.out_bias)
        norm_widths = {"none": None, "head": (cfg.head_dim, cfg.head_dim), "full": (cfg.q_dim, cfg.kv_dim)}[cfg.qk_norm]
        self.q_norm = RMSNorm(norm_widths[0], cfg.norm_eps) if norm_widths else None
        self.k_norm = RMSNorm(norm_widths[1], cfg.norm_eps) if norm_widths else None

    def _normalise(self, qkv: torch.Tensor) -> torch.Tensor:
        """q/k norm, then clipping, on the projection (B, T, qkv_dim), before RoPE (as the families do)."""
        c = self.cfg
        q, k, v = qkv.split((c.q_dim, c.kv_dim, c.kv_dim), dim=-1)
        if c.qk_norm == "head":
            q = self.q_norm(q.unflatten(-1, (c.num_heads, c.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (c.num_kv_heads, c.head_dim))).flatten(-2)
        elif c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        qkv = torch.cat([q, k, v], dim=-1)
        return qkv if c.clip_qkv is None else qkv.clamp(-c.clip_qkv, c.clip_qkv)

    def _project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 extra_qkv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> q (B, H, T, Dh), k and v (B, H_kv, T, Dh), RoPE applied to q and k."""
        c = self.cfg
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if extra_qkv is not None:
            qkv = qkv + extra_qkv
        if c.qk_norm != "none" or c.clip_qkv is not None:
            qkv = self._normalise(qkv)
        qk, v = qkv.split((c.q_dim + c.kv_dim, c.kv_dim), dim=-1)
        qk = apply_rope(qk.view(B, T, c.num_heads + c.num_kv_heads, c.head_dim), *rope)  # q and k heads at once
        q, k = qk.transpose(1, 2).split((c.num_heads, c.num_kv_heads), dim=1)  # (B, H, T, Dh)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return q, k, v

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    @property
    def gqa(self) -> bool:
        return self.cfg.num_kv_heads != self.cfg.num_heads

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: AttentionLayout,
                extra_qkv: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); rope = `rope_angles` of the positions, cos and sin (B, T, 1, Dh); extra_qkv
        (B, T, qkv_dim) added to the Q/K/V projection (joint decoding). -> (B, T, dim)."""
        q, k, v = self._project(x, rope, extra_qkv)
        return self._output(layout.attend(q, k, v, self.gqa))

    def extend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache,
               rows: torch.Tensor | None = None, extra_qkv: torch.Tensor | None = None) -> torch.Tensor:
        """The next T tokens (T = 1 when decoding) of `rows` (default all rows) of `cache`, one
        document per row: their keys and values are written to the cache (which does not advance:
        its owner calls `advance`) and they attend to the cached prefix and causally among themselves."""
        B, T, _ = x.shape
        q, k, v = self._project(x, rope, extra_qkv)
        k, v, start = cache.append(k, v, rows)  # (B, H_kv, L, Dh); start int or (B,)
        L = k.shape[2]
        if isinstance(start, int):  # every row starts at the same length
            if start == 0:  # prefill: plain causal, no dense (T, T) mask
                mask, is_causal = None, True
            elif T == 1:  # one new token per row: all keys valid
                mask, is_causal = None, False
            else:
                q_pos = start + torch.arange(T, device=x.device)  # (T,) index in cache
                mask, is_causal = torch.arange(L, device=x.device) <= q_pos[:, None], False  # (T, L)
        elif int(start.max()) == 0:  # prefill of some rows, all empty
            mask, is_causal = None, True
        elif T == 1 and int(start.min()) == int(start.max()):  # rows of equal length: all keys valid
            mask, is_causal = None, False
        else:
            q_pos = start[:, None] + torch.arange(T, device=x.device)  # (B, T) index in cache
            mask = (torch.arange(L, device=x.device)[None, None, :] <= q_pos[:, :, None])[:, None]
            is_causal = False
        if T == 1 and mask is None and not is_causal and L >= ONE_QUERY_MIN_KEYS:
            return self._output(one_query_attention(q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.gqa)
        return self._output(y)

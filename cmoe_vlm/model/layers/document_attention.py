"""Document-causal attention over packed rows, with no (L, L) tensor (docs/design.md §10).

A packed row holds documents back to back, then padding; a position attends causally within its
own document (padding counts as one more document). `AttentionLayout.of(documents)` turns a level's
`DocumentLayout` (tokens, or concepts) into the plan every layer of that level shares, built once
per forward from the host-side document lengths, and `attend` runs it:

    causal   every row holds one document: plain `is_causal` SDPA over whole rows
    buckets  (CPU) the rows' segments (documents and padding runs) grouped by padded length; each
             bucket is one `is_causal` SDPA over (segments, H, length, Dh), gathered from and
             scattered back to the rows by indices computed here. Padding at the end of a
             segment only adds queries whose outputs are dropped: causal attention keeps every
             real query off it.
    flex     (CUDA) FlexAttention with a BlockMask built from the document ids: tiles inside one
             document are full, tiles on a document edge are masked per element, the rest skipped.

Memory is linear in L for each: no score-sized mask. Why buckets on CPU (FlexAttention has no CPU
backward; a Python loop over documents per layer costs a call per document) is measured in
docs/design.md §10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cmoe_base import DocumentLayout

Kernel = Literal["auto", "causal", "buckets", "flex"]
SHORT_SEGMENT = 256     # segments up to this length share power-of-two buckets (few SDPA calls)
LONG_STEPS = 8          # longer ones: 8 padded lengths per octave (≤ 12.5% padding)
FLEX_BLOCK = 128        # FlexAttention's tile size


def bucket_length(n: int) -> int:
    """The padded length of a segment of n positions: the next power of two up to SHORT_SEGMENT
    (short segments are many; each bucket is one kernel call), else the next of LONG_STEPS lengths
    per octave (long segments are few; padding costs quadratically)."""
    p = 1 << max(0, (n - 1).bit_length())
    if n <= SHORT_SEGMENT:
        return p
    step = p // (2 * LONG_STEPS)
    return -(-n // step) * step


@dataclass
class SegmentBuckets:
    """Where each segment of B rows of L positions sits in the buckets, as flat indices into B·L.

    Bucket i holds `counts[i]` segments of padded length `lengths[i]`; `gather[i]` (counts[i]·lengths[i],)
    picks their positions (padding slots repeat the segment's first position); `scatter` (B·L,)
    takes every position back from the buckets' concatenated outputs."""
    lengths: list[int]
    counts: list[int]
    gather: list[torch.Tensor]
    scatter: torch.Tensor

    @classmethod
    def of(cls, documents: DocumentLayout) -> SegmentBuckets:
        B, L = documents.shape
        starts, sizes = [], []
        for r, docs in enumerate(documents.lengths):
            offset = r * L
            for n in (*docs, L - sum(docs)):  # the row's documents, then its padding run
                if n:
                    starts.append(offset)
                    sizes.append(n)
                offset += n
        start_S, size_S = torch.tensor(starts), torch.tensor(sizes)
        padded_S = torch.tensor([bucket_length(n) for n in sizes])
        lengths, counts, gather, pieces = [], [], [], []
        base = 0
        for length in sorted(set(padded_S.tolist())):
            members = (padded_S == length).nonzero().squeeze(1)
            ar = torch.arange(length)
            real = ar < size_S[members, None]  # (n, length)
            pos = start_S[members, None] + ar
            lengths.append(length)
            counts.append(len(members))
            gather.append(torch.where(real, pos, start_S[members, None]).reshape(-1))
            slot = base + torch.arange(len(members) * length).view(len(members), length)
            pieces.append((pos[real], slot[real]))
            base += len(members) * length
        scatter = torch.empty(B * L, dtype=torch.long)
        for pos, slot in pieces:
            scatter[pos] = slot
        device = documents.doc_ids.device
        return cls(lengths, counts, [g.to(device) for g in gather], scatter.to(device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        """q (B, H, L, Dh), k/v (B, H_kv, L, Dh) -> (B, H, L, Dh)."""
        B, H, L, Dh = q.shape
        flat = [t.transpose(1, 2).reshape(B * L, t.shape[1], Dh) for t in (q, k, v)]  # (B·L, heads, Dh)
        outs = []
        for length, count, index in zip(self.lengths, self.counts, self.gather):
            q_b, k_b, v_b = (t.index_select(0, index).view(count, length, -1, Dh).transpose(1, 2) for t in flat)
            y = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, enable_gqa=enable_gqa)
            outs.append(y.transpose(1, 2).reshape(count * length, H, Dh))
        y = torch.cat(outs).index_select(0, self.scatter)
        return y.view(B, L, H, Dh).transpose(1, 2)


def document_block_mask(doc_ids: torch.Tensor):
    """doc_ids (B, L), padding −1 -> a FlexAttention BlockMask, causal within documents (padding one
    more document). Built from per-tile document ranges, (B, L/128, L/128) small ints: no (L, L) mask."""
    from torch.nn.attention.flex_attention import BlockMask

    B, L = doc_ids.shape
    nb = -(-L // FLEX_BLOCK)
    ids = torch.where(doc_ids >= 0, doc_ids, L)  # padding after every document: still increasing
    ids = F.pad(ids, (0, nb * FLEX_BLOCK - L), value=L + 1)  # past the end: one more
    tiles = ids.view(B, nb, FLEX_BLOCK)
    first, last = tiles[..., 0], tiles[..., -1]  # (B, nb) documents at each tile's ends
    i = torch.arange(nb, device=ids.device)
    below = i[None, :] <= i[:, None]  # (q tile, kv tile): kv tile at or before the q tile
    touches = below & (last[:, None, :] >= first[:, :, None])  # some document spans both tiles
    full = (i[None, :] < i[:, None]) & (first[:, None, :] == last[:, :, None])  # one document covers both
    partial = touches & ~full

    def blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = m.sum(-1, dtype=torch.int32)[:, None]
        index = m.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
        return num, index

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (q_idx >= kv_idx)

    (kv_num, kv_index), (full_num, full_index) = blocks(partial), blocks(full)
    return BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(L, L))


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled on CUDA (its fused kernel; eager flex materialises the scores) and eager
    elsewhere (CPU: forward only, for tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex)
        flex = _compiled_flex
    return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@dataclass
class AttentionLayout:
    """Who may attend to whom in a packed forward, shared by every layer of one level (tokens,
    concepts). Built by `of` from the level's DocumentLayout without reading the device."""
    documents: DocumentLayout
    kernel: Kernel
    buckets: SegmentBuckets | None = None
    block_mask: object | None = None  # flex: a torch BlockMask

    @classmethod
    def of(cls, documents: DocumentLayout, kernel: Kernel = "auto") -> AttentionLayout:
        """kernel "auto": "causal" when every row holds one document, else "flex" on CUDA and
        "buckets" elsewhere. Asking for "causal" with packed rows is an error (it would attend
        across documents)."""
        if kernel == "auto":
            kernel = ("causal" if documents.single_document
                      else "flex" if documents.doc_ids.is_cuda else "buckets")
        if kernel == "causal":
            if not documents.single_document:
                raise ValueError("kernel 'causal' attends across documents: the rows are packed")
            return cls(documents, kernel)
        if kernel == "buckets":
            return cls(documents, kernel, buckets=SegmentBuckets.of(documents))
        if kernel == "flex":
            return cls(documents, kernel, block_mask=document_block_mask(documents.doc_ids))
        raise ValueError(f"attention kernel {kernel!r}: expected 'auto', 'causal', 'buckets' or 'flex'")

    @torch.compiler.disable  # host-built plans (Python ints per bucket) would specialise a compiled graph
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        """q (B, H, L, Dh), k/v (B, H_kv, L, Dh) -> (B, H, L, Dh)."""
        if self.kernel == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        if self.kernel == "buckets":
            return self.buckets.attend(q, k, v, enable_gqa)
        return flex_attention(q, k, v, self.block_mask, enable_gqa)

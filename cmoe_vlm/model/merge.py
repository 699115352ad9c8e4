"""Concepts from boundaries (docs/design.md §2): what each concept holds, where it sits, and the
concept-level document layout.

The m-th boundary φ(m) closes concept m, whose content is the tokens (φ(m−1), φ(m)] of the same
document; concept m is at the position of its boundary token (RoPE, §6) and carries
that token's boundary probability (the dechunk EMA's weight). A merge rule says what a concept's
input vector is:

    sum   Σ h_n over its content (scatter_add; the default from scratch)
    last  h_{φ(m)}, its boundary token (converted models; the official demo's only mode)

`ConceptMerger` does the bookkeeping every rule shares, including the one host read of a forward:
the number of concepts per document (M, the padded concept count, and the concept-level layout's
lengths come from it). A new rule subclasses it with `content` (a span) and `step_content` (one
token) and is listed in MERGE_RULES.

Concepts never mix text and image because every modality run ends in a forced boundary
(chunk.forced_boundaries), which closes the run's content; nothing here needs the modality.

Decoding state (`MergeState`): the content since each row's last boundary (`carry`, sum merge).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cmoe_base import DocumentLayout

from .chunk import Boundaries


@dataclass
class Concepts:
    """The concept sequence of a batch, padded to the longest row (M concepts)."""
    x: torch.Tensor            # (B, M, d) concept inputs
    layout: DocumentLayout     # (B, M): documents (−1 on padding slots), host lengths = concepts per
                               # document; starts = the concept starts a document (EMA reset);
                               # positions = its boundary token's position
    p: torch.Tensor            # (B, M) boundary probability of the boundary token (for the EMA)
    counts: torch.Tensor       # (B,) concepts per row
    token_index: torch.Tensor  # (B, T) each token's latest concept, −1 if none in this span
    tail: torch.Tensor         # (B, d) content after the row's last boundary (the sum merge's carry)


@dataclass
class MergeState:
    carry: torch.Tensor     # (B, d) content since the last boundary, not yet in a concept

    def select(self, rows: torch.Tensor) -> None:
        self.carry = self.carry[rows]


@dataclass
class Slots:
    """Where each token's concept is: the bookkeeping shared by every merge rule."""
    closed: torch.Tensor   # (B, T) boundaries at or before each token
    content: torch.Tensor  # (B, T) the concept whose content holds each token (counts: none yet)
    counts: torch.Tensor   # (B,) concepts per row
    M: int                 # concepts of the longest row (host)
    bpos: torch.Tensor     # (B, M) position in T of each concept's boundary token (0 on padding slots)
    valid: torch.Tensor    # (B, M) bool, a real concept
    per_doc: list[list[int]]  # host: concepts per document of each row


class ConceptMerger:
    rule = ""

    def slots(self, b: torch.Tensor, tokens: DocumentLayout) -> Slots:
        """b (B, T) boundaries of rows laid out as `tokens`. Reads the concepts per document to the host
        (one read: M and the concept-level layout both come from it)."""
        B, T = b.shape
        closed = b.long().cumsum(1)
        counts = closed[:, -1] if T else closed.new_zeros(B)
        docs = max((len(row) for row in tokens.lengths), default=0)
        segment = torch.where(tokens.doc_ids >= 0, tokens.doc_ids, docs)  # padding: one more segment
        per_segment = torch.zeros(B, docs + 1, dtype=torch.long, device=b.device).scatter_add_(1, segment, b.long())
        host = per_segment.tolist()
        M = max((sum(row) for row in host), default=0)
        slot = torch.where(b, closed - 1, M)  # boundary token -> its concept, others -> spare slot M
        token_pos = torch.arange(T, device=b.device).expand(B, T)
        bpos = torch.zeros(B, M + 1, dtype=torch.long, device=b.device).scatter_(1, slot, token_pos)
        valid = torch.arange(M, device=b.device)[None] < counts[:, None]
        per_doc = [host[r][:len(tokens.lengths[r])] for r in range(B)]
        return Slots(closed, closed - b.long(), counts, M, bpos[:, :M], valid, per_doc)

    def content(self, h: torch.Tensor, slots: Slots, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concept inputs (B, M, d) and the content after each row's last boundary (B, d)."""
        raise NotImplementedError

    def step_content(self, h: torch.Tensor, b: torch.Tensor, state: MergeState) -> torch.Tensor:
        """One token per row, h (B, d) (zero on inactive rows, whose b is False): the input of the
        concept its token closes (rows with b), and the carry updated. -> (B, d)."""
        raise NotImplementedError

    def join_carry(self, x: torch.Tensor, tail: torch.Tensor, slots: Slots,
                   state: MergeState) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the content carried in from before a span to the span's first concept (or its tail)."""
        return x, tail

    def _concepts(self, x: torch.Tensor, tail: torch.Tensor, slots: Slots, bnd: Boundaries,
                  tokens: DocumentLayout) -> Concepts:
        bpos, valid = slots.bpos, slots.valid
        layout = DocumentLayout(
            doc_ids=torch.where(valid, tokens.doc_ids.gather(1, bpos), -1),
            lengths=tuple(tuple(row) for row in slots.per_doc),
            starts=tokens.starts.gather(1, bpos) & valid,
            positions=tokens.positions.gather(1, bpos))
        return Concepts(x=x, layout=layout, p=bnd.p.gather(1, bpos), counts=slots.counts,
                        token_index=slots.closed - 1, tail=tail)

    def __call__(self, h: torch.Tensor, bnd: Boundaries, tokens: DocumentLayout) -> Concepts:
        """Group the tokens of a packed batch into concepts. h (B, T, d); bnd, tokens (B, T)."""
        slots = self.slots(bnd.b, tokens)
        x, tail = self.content(h, slots, tokens.doc_ids)
        return self._concepts(x, tail, slots, bnd, tokens)

    def new_state(self, batch_size: int, dim: int, device: torch.device, dtype: torch.dtype) -> MergeState:
        return MergeState(torch.zeros(batch_size, dim, device=device, dtype=dtype))

    def extend(self, h: torch.Tensor, bnd: Boundaries, tokens: DocumentLayout, state: MergeState) -> Concepts:
        """The next tokens of cached rows (one document per row; row r's first lengths[r] tokens,
        h zero and b False after them): their concepts, with the content carried in from before."""
        slots = self.slots(bnd.b, tokens)
        x, tail = self.content(h, slots, tokens.doc_ids)
        x, tail = self.join_carry(x, tail, slots, state)
        state.carry = tail
        return self._concepts(x, tail, slots, bnd, tokens)

    def step(self, h: torch.Tensor, b: torch.Tensor, state: MergeState) -> torch.Tensor:
        """One token per row (see `step_content`); inactive rows (h zero, b False) keep their carry."""
        return self.step_content(h, b, state)


class SumMerge(ConceptMerger):
    """c_m = Σ h_n over the tokens of (φ(m−1), φ(m)] that share the boundary token's document (the
    unclosed tail of a previous document joins no concept)."""
    rule = "sum"

    def content(self, h, slots, doc_ids):
        B, T, d = h.shape
        M, counts, bpos = slots.M, slots.counts, slots.bpos
        content = slots.content
        doc_M = doc_ids.gather(1, bpos)
        doc_ext = torch.cat([doc_M, doc_M.new_full((B, 1), -2)], dim=1)  # (B, M+1)
        inside = (content < counts[:, None]) & (doc_ext.gather(1, content) == doc_ids)
        target = torch.where(inside, content, M)
        x = torch.zeros(B, M + 1, d, dtype=h.dtype, device=h.device)
        x = x.scatter_add(1, target[..., None].expand(B, T, d), h)[:, :M]
        tail = (h * (content == counts[:, None])[..., None]).sum(1)
        return x, tail

    def join_carry(self, x, tail, slots, state):
        has = slots.counts > 0
        if slots.M:  # the carry joins the span's first concept
            x = torch.cat([x[:, :1] + state.carry[:, None] * has[:, None, None], x[:, 1:]], dim=1)
        return x, tail + state.carry * (~has)[:, None]

    def step_content(self, h, b, state):
        x = h + state.carry
        state.carry = torch.where(b[:, None], torch.zeros_like(h), state.carry + h)
        return x


class LastMerge(ConceptMerger):
    """c_m = h_{φ(m)}: a concept is its boundary token's encoder output."""
    rule = "last"

    def content(self, h, slots, doc_ids):
        B, M, d = h.shape[0], slots.M, h.shape[-1]
        return h.gather(1, slots.bpos[..., None].expand(B, M, d)), torch.zeros_like(h[:, 0])

    def step_content(self, h, b, state):
        return h


MERGE_RULES: dict[str, type[ConceptMerger]] = {"sum": SumMerge, "last": LastMerge}

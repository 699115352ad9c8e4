"""An inference session: a model with the decoding state of a batch of rows (docs/design.md §9).

    session = InferenceSession(model)        # a ConceptMoEVLM, or a bare ConceptMoE for text
    logits = session.prefill(batch)          # (B, V): each row's last prompt token
    logits = session.step(next_ids)          # (B, V): one token per row
    session.select(keep)                     # drop rows that finished

Prefill is one cached forward over the prompts (the concept model runs on the compressed
sequence). Each step feeds one token per row: the encoder and decoder caches grow by one, the
concept caches only for rows whose token is a boundary. Generation (`cmoe_vlm.inference.generation`), the
`ModelRunner` (evaluation, inspection) and the transformers wrapper all decode through it.

The state's tensors are made under `torch.inference_mode` (cheaper per op than no_grad, which
counts at ~6 µs per small op on CPU): continue a session through its methods, or inside
`torch.inference_mode()`, since writing to them outside it raises.
"""
from __future__ import annotations

import torch
from torch import nn

from cmoe_base import Batch

from ..model.boundaries import BoundaryPolicy
from ..model.conceptmoe import DecodingState, ModelOutput


def last_token_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, T, V) -> the logits at each row's last token (B, V) (rows laid out one document each)."""
    lengths = torch.tensor([sum(docs) for docs in batch.layout.lengths], device=logits.device)
    idx = (lengths - 1).clamp_min(0)
    return logits.gather(1, idx[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]


class InferenceSession:
    """`model` (eval mode is the caller's choice) and the decoding state of its rows. `boundaries`
    is the boundary policy of every call (None: the model's own, cmoe_vlm/model/boundaries.py)."""

    def __init__(self, model: nn.Module, boundaries: BoundaryPolicy | None = None):
        self.model = model
        self.boundaries = boundaries
        self.state: DecodingState | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def prefill(self, batch: Batch) -> torch.Tensor:
        """Start a new state with the prompts of `batch` (one per row, padding at row ends).
        Returns the logits of each row's last prompt token (B, V)."""
        self.state = self.model.new_state(batch.shape[0])
        return self.model.extend(batch, self.state, boundaries=self.boundaries, last_only=True).logits[:, 0]

    @torch.inference_mode()
    def extend(self, batch: Batch) -> ModelOutput:
        """Feed the next tokens of every row (a row may have none): logits (B, T, V) and boundaries."""
        if self.state is None:
            self.state = self.model.new_state(batch.shape[0])
        return self.model.extend(batch, self.state, boundaries=self.boundaries)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """One text token per row (B,); rows with active False do not advance. Returns (B, V)."""
        if self.state is None:
            raise RuntimeError("InferenceSession.step before prefill")
        return self.model.step(input_ids, self.state, active, self.boundaries)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (b,), in that order."""
        self.state.select(rows)

    @property
    def num_tokens(self) -> torch.Tensor:
        """(B,) tokens fed per row."""
        return self.state.num_tokens

    def cache_bytes(self) -> dict[str, int]:
        return self.state.cache_bytes()

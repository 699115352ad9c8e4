"""Held-out evaluation at the end of a run (and in benchmarks): LM loss, bits per token, per-modality
compression with the evaluation threshold, and the trackers' histograms."""
from __future__ import annotations

import math
from typing import Any

import torch

from cmoe_base import IGNORE_INDEX
from data_pipelines.loader import StreamingLoader

from ..model.boundaries import BoundaryPolicy
from ..model.vlm import ConceptMoEVLM
from ..objective import lm_loss
from .metrics import compression_histograms


@torch.no_grad()
def evaluate(model: ConceptMoEVLM, loader: StreamingLoader, max_batches: int,
             histograms: dict[str, torch.Tensor] | None = None, boundaries: BoundaryPolicy | None = None
             ) -> dict[str, Any]:
    """Held-out LM loss, bits per byte-token, and per-modality compression with the eval threshold
    (or the boundaries of the policy `boundaries`). Without a single predicted token there is no
    loss to report: only `predicted_tokens` = 0. A given `histograms` dict receives the per-modality
    boundary probabilities and chunk lengths (trackers)."""
    was_training = model.training
    model.eval()
    nll = n_tok = 0.0
    totals: dict[str, list[float]] = {}
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        out = model(batch, boundaries=boundaries)
        mask = batch.labels != IGNORE_INDEX
        nll += float(lm_loss(out.logits, batch.labels)) * int(mask.sum())
        n_tok += int(mask.sum())
        if histograms is not None:
            for k, v in compression_histograms(out.boundary_probs, out.boundaries, batch.modality,
                                               batch.layout.starts, batch.layout.valid).items():
                histograms[k] = torch.cat([histograms[k], v]) if k in histograms else v
        for name, s in out.compression.items():
            acc = totals.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += float(s.tokens)
            acc[1] += float(s.concepts)
            acc[2] += float(s.p_sum)
    model.train(was_training)
    if not n_tok:
        return {"predicted_tokens": 0}
    loss = nll / n_tok
    compression = {name: {"tokens": int(t), "concepts": int(c), "ratio": t / max(c, 1), "mean_p": p / max(t, 1)}
                   for name, (t, c, p) in totals.items() if t}
    return {"lm_loss": loss, "bits_per_token": loss / math.log(2), "predicted_tokens": int(n_tok),
            "compression": compression}

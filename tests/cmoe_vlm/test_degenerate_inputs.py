"""Inputs at the edge: an empty sequence is a clear error; a batch without LM targets adds no LM loss."""
import dataclasses

import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm.model.vlm import ConceptMoEVLM
from cmoe_vlm.objective import Objective, lm_loss

from .test_vlm import batch_of, image, vlm_config


def test_zero_length_input_is_a_clear_error():
    model = ConceptMoEVLM(vlm_config())
    with pytest.raises(ValueError, match="no tokens"):
        model(Batch.of(torch.zeros(1, 0, dtype=torch.long)))  # was: max(): Expected reduction dim to be specified


def test_batch_without_lm_targets_has_zero_lm_loss_and_finite_gradients():
    torch.manual_seed(0)
    model = ConceptMoEVLM(vlm_config()).train()
    batch = batch_of([[image(0)], [image(1), image(2)]], model.cfg)
    batch = dataclasses.replace(batch, labels=torch.full_like(batch.labels, -100))  # images only: nothing to predict
    losses = Objective(model.cfg.model)(model(batch), batch)
    assert losses.lm.item() == 0.0 and torch.isfinite(losses.total)  # was NaN (0/0), then a skipped step
    losses.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with_targets = batch_of([["a caption", image(0)]], model.cfg)
    out = model(with_targets)  # with targets: the same mean as before
    reference = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), with_targets.labels.flatten(),
                                                  ignore_index=-100)
    assert torch.equal(lm_loss(out.logits, with_targets.labels), reference)

"""The ratio-loss options beside the paper's pooled loss: a per-image statistic and a margin term on
image p (cmoe_vlm/objective.py), each against a slow reference, and how the objective adds them."""
import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm.config import ConfigError
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.compression import image_ids
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.objective import Objective, margin_loss, per_group_ratio_loss, ratio_loss


def test_image_ids_number_each_run_of_image_tokens():
    modality = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 1, 0]])
    assert image_ids(modality).tolist() == [[-1, 0, 0, -1, 1, 1, 1], [2, 2, -1, -1, -1, 3, -1]]


def test_per_group_ratio_loss_is_the_mean_of_each_groups_own_loss():
    torch.manual_seed(0)
    p = torch.rand(2, 12, requires_grad=True)
    b = torch.rand(2, 12) < 0.4
    groups = torch.tensor([[0] * 4 + [1] * 5 + [-1] * 3, [2] * 6 + [-1] * 6])
    got = per_group_ratio_loss(p, b, 3.0, groups)
    want = torch.stack([ratio_loss(p[groups == g], b[groups == g], 3.0) for g in range(3)]).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    one = torch.where(groups >= 0, 0, -1)  # a single group: the pooled loss over its tokens
    assert per_group_ratio_loss(p, b, 3.0, one).item() == pytest.approx(ratio_loss(p, b, 3.0, groups >= 0).item())
    assert per_group_ratio_loss(p, b, 3.0, torch.full_like(groups, -1)).item() == 0.0


def test_per_image_statistic_pulls_each_image_toward_the_target():
    # image 0 all boundaries, image 1 none: pooled F = 1/2 is right at target 2, so the pooled loss
    # leaves p alone (dL/dp = 0); per image, the first image is pushed down and the second up
    p = torch.full((1, 8), 0.5, requires_grad=True)
    b = torch.tensor([[True] * 4 + [False] * 4])
    groups = torch.tensor([[0] * 4 + [1] * 4])
    ratio_loss(p, b, 2.0).backward()
    assert p.grad.abs().max().item() == pytest.approx(0.0, abs=1e-7)
    p.grad = None
    per_group_ratio_loss(p, b, 2.0, groups).backward()
    assert (p.grad[0, :4] > 0).all() and (p.grad[0, 4:] < 0).all()


def test_margin_loss_pushes_p_away_from_the_threshold():
    p = torch.tensor([[0.5, 0.45, 0.7, 0.9, 0.1, 1.0]], requires_grad=True)
    mask = torch.ones_like(p, dtype=torch.bool)
    loss = margin_loss(p, mask, 0.5)
    want = sum(max(0.0, 0.5 - abs(2 * x - 1)) for x in p[0].tolist()) / 6
    assert loss.item() == pytest.approx(want)
    loss.backward()
    g = p.grad[0]
    assert g[1] > 0 and g[2] < 0  # descent lowers p below 0.5 and raises it above
    assert (g[3:] == 0).all()     # outside the margin (and forced p = 1): no force
    assert margin_loss(p, torch.zeros_like(mask), 0.5).item() == 0.0


def test_options_are_validated_by_name():
    with pytest.raises(ConfigError, match="ratio_statistic"):
        ChunkConfig(ratio_statistic="per_image")  # joint mode: one token set, no images of its own
    with pytest.raises(ConfigError, match="image_margin_weight"):
        ChunkConfig(image_margin_weight=-1)
    with pytest.raises(ConfigError, match="image_margin"):
        ChunkConfig(image_margin=0)
    ChunkConfig(ratio_mode="per_modality", ratio_statistic="per_image", image_margin_weight=0.1)


def test_objective_ratio_loss_adds_the_options():
    torch.manual_seed(0)
    base = dict(ratio_mode="per_modality", text_ratio=1.5, image_ratio=3.0)
    def model(**chunk):
        torch.manual_seed(0)
        return ConceptMoE(ModelConfig(dim=32, num_heads=2, encoder_layers=1, concept_layers=1, decoder_layers=1,
                                      moe=MoEConfig(num_experts=2, top_k=1, expert_hidden=32),
                                      chunk=ChunkConfig(**base, **chunk))).eval()

    def ratio(m):
        out = m(batch)
        return out, Objective(m.cfg).ratio_loss(out.own_boundaries, batch)

    ids = torch.randint(0, 256, (2, 24))
    modality = torch.zeros_like(ids)
    modality[:, 4:12] = 1
    modality[1, 14:20] = 1
    batch = Batch.of(ids, modality)
    plain, plain_loss = ratio(model())
    text, image = modality == 0, modality == 1
    p, b = plain.boundary_probs, plain.boundaries
    assert plain_loss.item() == pytest.approx(
        (ratio_loss(p, b, 1.5, text) + ratio_loss(p, b, 3.0, image)).item(), rel=1e-5)
    _, loss = ratio(model(ratio_statistic="per_image", image_margin_weight=0.2, image_margin=0.4))
    want = (ratio_loss(p, b, 1.5, text) + per_group_ratio_loss(p, b, 3.0, torch.where(image, image_ids(modality), -1))
            + 0.2 * margin_loss(p, image, 0.4))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

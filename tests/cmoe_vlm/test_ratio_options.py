"""The ratio-loss option beside the paper's pooled loss: a margin term on image p (cmoe_vlm/objective.py),
against a slow reference, and how the objective adds it; the removed options are config errors that say why."""
import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm.config import ConfigError
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.config import from_dict
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.objective import Objective, margin_loss, ratio_loss


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
    with pytest.raises(ConfigError, match="image_margin_weight"):
        ChunkConfig(image_margin_weight=-1)
    with pytest.raises(ConfigError, match="image_margin"):
        ChunkConfig(image_margin=0)
    ChunkConfig(ratio_mode="per_modality", image_margin_weight=0.1)


@pytest.mark.parametrize("key,old_default,other", [("ratio_statistic", "pooled", "per_image"),
                                                   ("sample_boundaries", True, False),
                                                   ("split_at_modality_switch", True, False)])
def test_removed_options_load_at_their_old_default_and_are_errors_otherwise(key, old_default, other):
    """Configs and exports written before #25 list the removed flags with their defaults: they load; any
    other value is an error saying why the flag went."""
    assert from_dict(ChunkConfig, {key: old_default}, prefix="model.chunk") == ChunkConfig()
    with pytest.raises(ConfigError, match=f"model.chunk.{key} = .*was removed"):
        from_dict(ChunkConfig, {key: other}, prefix="model.chunk")


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
    _, loss = ratio(model(image_margin_weight=0.2, image_margin=0.4))
    want = ratio_loss(p, b, 1.5, text) + ratio_loss(p, b, 3.0, image) + 0.2 * margin_loss(p, image, 0.4)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)

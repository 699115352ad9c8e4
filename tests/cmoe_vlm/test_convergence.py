"""Compression control: a short run reaches a target ratio the model does not start at (docs/design.md §3).

Random chunk projections give p ≈ 0.5, i.e. a ratio near 2 at step 0, so the target here is 4; a
control run without the ratio loss must miss it. Text: CPython's pydoc topics (ships with Python).
"""
import pytest
import torch
from pydoc_data.topics import topics

from cmoe_base import Batch
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig
from cmoe_vlm.objective import Objective

STEPS, WINDOW, TARGET = 200, 20, 4.0


def train(weight: float, seed: int = 0) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    data = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.long)
    cfg = ModelConfig(dim=64, num_heads=4, encoder_layers=1, concept_layers=1, decoder_layers=1,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=128),
                      chunk=ChunkConfig(target_ratio=TARGET, ratio_loss_weight=weight, merge="last"))
    model = ConceptMoE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    tokens = concepts = 0.0
    losses = []
    for step in range(STEPS):
        start = torch.randint(0, len(data) - 257, (8,), generator=gen)
        rows = torch.stack([data[s: s + 257] for s in start])
        batch = Batch.of(rows[:, :-1], labels=rows[:, 1:])
        out = model(batch)
        step_losses = Objective(model.cfg)(out, batch)
        opt.zero_grad()
        step_losses.total.backward()
        opt.step()
        losses.append(step_losses.lm.item())
        if step >= STEPS - WINDOW:
            tokens += float(out.compression["all"].tokens)
            concepts += float(out.compression["all"].concepts)
    return tokens / concepts, sum(losses[:10]) / 10, sum(losses[-10:]) / 10


@pytest.mark.slow
def test_ratio_loss_reaches_target_and_control_misses():
    ratio, first, last = train(weight=1.0)
    assert abs(ratio - TARGET) / TARGET <= 0.10, f"pooled ratio {ratio:.2f} vs target {TARGET}"
    assert last < first - 0.5, f"LM loss did not fall: {first:.2f} -> {last:.2f}"
    control, _, _ = train(weight=0.0)
    assert abs(control - TARGET) / TARGET > 0.10, f"control run reached {control:.2f} without the ratio loss"

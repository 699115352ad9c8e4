"""Projector: shapes, raster order of reduced tokens against a slow reference, errors, step time."""

from pathlib import Path

import pytest
import torch

from cmoe_vlm.config import ConfigError, from_dict
from vision import Projector, ProjectorConfig, VisionConfig, VisionEncoder, image_token_grid, tokens_per_image

TINY = dict(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("reduce", ["pixel_shuffle", "avg_pool"])
@pytest.mark.parametrize("reduction", [1, 2, 4])
def test_shapes(kind, reduce, reduction):
    proj = Projector(ProjectorConfig(kind=kind, reduce=reduce, reduction=reduction), in_dim=96, out_dim=40)
    out = proj(torch.randn(3, 8 * 8, 96), grid=(8, 8))
    assert out.shape == (3, 64 // reduction ** 2, 40)
    assert proj.output_grid((8, 8)) == (8 // reduction, 8 // reduction)


def reference_blocks(x: torch.Tensor, grid: tuple[int, int], r: int) -> list[list[torch.Tensor]]:
    """Slow reference: for each reduced cell in raster order, its r*r patch vectors in raster order."""
    rows, cols = grid
    cells = []
    for out_row in range(rows // r):
        for out_col in range(cols // r):
            cells.append([x[:, (out_row * r + dy) * cols + out_col * r + dx]
                          for dy in range(r) for dx in range(r)])
    return cells


@pytest.mark.parametrize("reduce", ["pixel_shuffle", "avg_pool"])
def test_reduction_matches_slow_reference(reduce):
    torch.manual_seed(0)
    grid, r, d = (4, 6), 2, 5  # non-square, so a rows/cols swap would show
    proj = Projector(ProjectorConfig(kind="linear", reduce=reduce, reduction=r), in_dim=d, out_dim=7)
    x = torch.randn(2, 4 * 6, d)
    cells = reference_blocks(x, grid, r)
    if reduce == "pixel_shuffle":
        merged = torch.stack([torch.cat(cell, dim=-1) for cell in cells], dim=1)  # (2, 6, r*r*d)
    else:
        merged = torch.stack([torch.stack(cell).mean(0) for cell in cells], dim=1)  # (2, 6, d)
    assert torch.allclose(proj(x, grid), proj.proj(merged), atol=1e-6)


def test_bad_reduction_names_the_field():
    with pytest.raises(ConfigError, match=r"^reduction = 4: must divide the patch grid 6x6"):
        Projector(ProjectorConfig(reduction=4), 8, 8)(torch.randn(1, 36, 8), grid=(6, 6))
    with pytest.raises(ConfigError, match=r"^reduction = 0: must be >= 1"):
        ProjectorConfig(reduction=0)
    with pytest.raises(ConfigError, match=r"^projector\.kind = 'conv': must be one of 'mlp', 'linear'"):
        from_dict(ProjectorConfig, {"kind": "conv"}, prefix="projector")
    with pytest.raises(ConfigError, match=r"^projector\.reduce = 'max'"):
        from_dict(ProjectorConfig, {"reduce": "max"}, prefix="projector")
    with pytest.raises(ValueError, match="grid 8x8 has 64"):
        Projector(ProjectorConfig(), 8, 8)(torch.randn(1, 60, 8), grid=(8, 8))


def test_tokens_per_image_matches_model():
    vision_cfg, projector_cfg = VisionConfig(**TINY), ProjectorConfig(reduction=2)
    enc = VisionEncoder(vision_cfg)
    proj = Projector(projector_cfg, enc.embed_dim, 32)
    out = proj(enc(torch.randn(1, 3, 64, 64)), enc.grid_size)
    assert tokens_per_image(vision_cfg, projector_cfg) == out.shape[1] == 16
    assert image_token_grid(vision_cfg, projector_cfg) == (4, 4)
    assert tokens_per_image(VisionConfig(), ProjectorConfig()) == 196  # timm default 224 px / 16
    with pytest.raises(ConfigError, match=r"^reduction = 4: must divide the patch grid 14x14"):
        tokens_per_image(VisionConfig(), ProjectorConfig(reduction=4))


def test_backward_reaches_every_encoder_and_projector_parameter():
    """Timing lives in bench/bench_core.py (vlm_step); here: the trainable path is connected."""
    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(**TINY)).train()
    proj = Projector(ProjectorConfig(reduction=2), enc.embed_dim, 128)
    proj(enc(torch.randn(4, 3, 64, 64)), enc.grid_size).square().mean().backward()
    for name, p in [*enc.named_parameters(), *proj.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_center_removes_each_images_mean_token():
    torch.manual_seed(0)
    x = torch.randn(3, 64, 96) + 5 * torch.randn(3, 1, 96)  # a large component shared by each image's patches
    plain = Projector(ProjectorConfig(reduction=2), 96, 40)
    centred = Projector(ProjectorConfig(reduction=2, center=True), 96, 40)
    centred.load_state_dict(plain.state_dict())
    a, b = plain(x, (8, 8)), centred(x, (8, 8))
    assert torch.allclose(b, a - a.mean(dim=1, keepdim=True), atol=1e-5)
    assert b.mean(dim=1).abs().max() < 1e-5
    assert torch.allclose(centred(x[:1], (8, 8)), b[:1], atol=1e-5)  # per image: other images do not matter


def test_rectangular_blocks_match_slow_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 8 * 8, 5)
    proj = Projector(ProjectorConfig(kind="linear", reduce="avg_pool", reduction=2, reduction_cols=4), 5, 7)
    cells = [torch.stack([x[:, (r * 2 + dy) * 8 + c * 4 + dx] for dy in range(2) for dx in range(4)]).mean(0)
             for r in range(4) for c in range(2)]  # (rows 4 x cols 2), raster order
    assert torch.allclose(proj(x, (8, 8)), proj.proj(torch.stack(cells, dim=1)), atol=1e-6)
    cfg = ProjectorConfig(reduction=2, reduction_cols=4)
    assert image_token_grid(VisionConfig(**TINY), cfg) == (4, 2) and tokens_per_image(VisionConfig(**TINY), cfg) == 8
    with pytest.raises(ConfigError, match=r"^reduction_cols = 3: must divide the patch grid 8x8"):
        tokens_per_image(VisionConfig(**TINY), ProjectorConfig(reduction=2, reduction_cols=3))


def test_keep_tokens_prunes_to_the_most_attended_tokens_in_raster_order():
    torch.manual_seed(0)
    x = torch.randn(3, 64, 96)
    full = Projector(ProjectorConfig(reduction=2), 96, 40)
    pruned = Projector(ProjectorConfig(reduction=2, keep_tokens=5), 96, 40)
    pruned.load_state_dict(full.state_dict())  # no parameters of its own: training-free
    with torch.no_grad():
        tokens, out = full(x, (8, 8)), pruned(x, (8, 8))
    assert out.shape == (3, 5, 40) and pruned.output_grid((8, 8)) == (1, 5)
    for n in range(3):  # slow reference: attention each token receives, by loops
        t = tokens[n]
        att = [[float(torch.softmax(t @ t[j] / 40 ** 0.5, dim=0)[i]) for j in range(16)] for i in range(16)]
        saliency = [sum(row) / 16 for row in att]
        keep = sorted(sorted(range(16), key=lambda i: -saliency[i])[:5])
        assert torch.allclose(out[n], t[keep], atol=1e-6)
    assert tokens_per_image(VisionConfig(**TINY), ProjectorConfig(reduction=2, keep_tokens=5)) == 5
    with pytest.raises(ConfigError, match=r"^keep_tokens = 17: must be <= the 16 tokens"):
        tokens_per_image(VisionConfig(**TINY), ProjectorConfig(reduction=2, keep_tokens=17))


def test_a_pruned_vlm_takes_a_trained_models_weights_and_runs():
    """Training-free: the same weights, evaluated with keep_tokens image tokens per image."""
    from dataclasses import replace

    from cmoe_base import Modality
    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from data_pipelines.packing import sequence_batch
    from data_pipelines.sequence import build_sequence
    from data_pipelines.tokenizer import ByteTokenizer

    root = Path(__file__).resolve().parents[2]
    exp = load_experiment(root / "configs/tiny.yaml", ["model.dim=32", "model.moe.expert_hidden=32", "vision.depth=1"])
    torch.manual_seed(0)
    trained = ConceptMoEVLM(exp.vlm)
    cfg = replace(exp.vlm, projector=replace(exp.projector, keep_tokens=6))
    pruned = ConceptMoEVLM(cfg).eval()
    pruned.load_state_dict(trained.state_dict())
    seq = build_sequence(["Look:", torch.randn(3, 64, 64), "a red circle."], ByteTokenizer(), cfg.tokens_per_image)
    batch = sequence_batch(seq, (3, 64, 64))
    out = pruned(batch)
    assert cfg.tokens_per_image == 6 and int((batch.modality == Modality.IMAGE).sum()) == 6
    assert out.logits.shape[1] == len(seq) and torch.isfinite(out.logits).all()


def test_summary_adds_the_images_max_pooled_tokens_to_its_last_token_only():
    torch.manual_seed(0)
    x = torch.randn(3, 64, 96)
    plain = Projector(ProjectorConfig(reduction=2, center=True), 96, 40)
    summ = Projector(ProjectorConfig(reduction=2, center=True, summary=True), 96, 40)
    summ.load_state_dict(plain.state_dict(), strict=False)
    a = plain(x, (8, 8))
    assert torch.equal(summ(x, (8, 8)), a)  # zero-initialised: starts as no summary
    torch.nn.init.normal_(summ.summary.weight)
    b = summ(x, (8, 8))
    assert torch.equal(b[:, :-1], a[:, :-1])
    expected = a[:, -1] + a.amax(dim=1) @ summ.summary.weight.T + summ.summary.bias  # per image, slow form
    assert torch.allclose(b[:, -1], expected, atol=1e-5)
    assert torch.allclose(summ(x[1:2], (8, 8)), b[1:2], atol=1e-5)  # other images do not matter
    b[:, -1].sum().backward()
    assert summ.summary.weight.grad.abs().sum() > 0

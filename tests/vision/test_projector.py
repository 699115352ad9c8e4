"""Projector: shapes, raster order of reduced tokens against a slow reference, errors, step time."""

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

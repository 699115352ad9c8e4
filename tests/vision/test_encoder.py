"""VisionEncoder: offline timm builds, local checkpoints, prefix-token dropping, freezing, transforms."""
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from cmoe_vlm.config import ConfigError, from_dict
from vision import VisionConfig, VisionEncoder, build_image_transform, image_mean_std, patch_grid

TINY = dict(img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=3)
# name -> prefix tokens: CLS; CLS + 4 registers; CLS + distillation token
VITS = {"vit_tiny_patch16_224": 1, "vit_small_patch14_reg4_dinov2": 5, "deit_tiny_distilled_patch16_224": 2}


@pytest.fixture(scope="module")
def tiny() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(VisionConfig(**TINY)).eval()


@pytest.mark.parametrize("name", VITS)
def test_builds_offline_and_drops_prefix_tokens(name):
    enc = VisionEncoder(VisionConfig(model_name=name, **TINY)).eval()
    assert enc.vit.num_prefix_tokens == VITS[name]
    assert enc.grid_size == (8, 8) and enc.num_patches == 64
    assert enc.embed_dim == 96 and enc.img_size == (64, 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc(images)  # (2, 64, 96)
        full = enc.vit.forward_features(images)
    assert tokens.shape == (2, 8 * 8, 96)
    assert torch.equal(tokens, full[:, VITS[name]:])


def test_tokens_keep_raster_order():
    # With the transformer blocks removed no token mixes with another, so changing the pixels of
    # patch (row 2, col 5) must change exactly output token 2 * cols + 5.
    enc = VisionEncoder(VisionConfig(**TINY)).eval()
    enc.vit.blocks = torch.nn.Sequential()
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[:, :, 2 * 8:3 * 8, 5 * 8:6 * 8] += 1.0
    with torch.no_grad():
        diff = (enc(changed) - enc(images)).abs().sum(-1)[0]  # (64,)
    assert diff.nonzero().flatten().tolist() == [2 * 8 + 5]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_loads_local_checkpoint_with_head(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY).eval()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    enc = VisionEncoder(VisionConfig(pretrained=True, checkpoint_path=str(path), **TINY)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc(images), source.forward_features(images)[:, 1:])


def test_checkpoint_resampled_to_overridden_img_size(tmp_path):
    # A checkpoint saved at 64 px loads into a 32 px model (position embeddings resampled), as a real
    # 224 px timm checkpoint does into the tiny CPU config.
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(VisionEncoder(VisionConfig(**TINY)).vit.state_dict(), path)
    enc = VisionEncoder(VisionConfig(pretrained=True, checkpoint_path=str(path), **{**TINY, "img_size": 32}))
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 16, 96)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(VisionEncoder(VisionConfig(**TINY)).vit.state_dict(), path)
    with pytest.raises(ConfigError, match=r"checkpoint_path = .*missing \(\d+\): blocks\.2\."):
        VisionEncoder(VisionConfig(pretrained=True, checkpoint_path=str(path), **{**TINY, "depth": 3}))
    with pytest.raises(ConfigError, match=r"checkpoint_path = .*shape mismatch"):
        VisionEncoder(VisionConfig(pretrained=True, checkpoint_path=str(path), **{**TINY, "embed_dim": 48}))
    with pytest.raises(ConfigError, match=r"checkpoint_path = .*no such file"):
        VisionEncoder(VisionConfig(pretrained=True, checkpoint_path=str(tmp_path / "absent.pt"), **TINY))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^pretrained = True: needs checkpoint_path .* no network"):
        VisionConfig(pretrained=True)
    with pytest.raises(ConfigError, match=r"^checkpoint_path = 'w.pt': is only loaded with pretrained"):
        VisionConfig(checkpoint_path="w.pt")
    with pytest.raises(ConfigError, match=r"^img_size = 60: must be a multiple of patch_size=8"):
        VisionConfig(img_size=60, patch_size=8)
    with pytest.raises(ConfigError, match=r"^vision\.depth = 0: must be > 0"):
        from_dict(VisionConfig, {"depth": 0}, prefix="vision")
    with pytest.raises(ConfigError, match=r"model_name = 'vit_nonexistent': not a timm model"):
        VisionEncoder(VisionConfig(model_name="vit_nonexistent"))
    with pytest.raises(ConfigError, match=r"model_name = 'resnet18': not a ViT-like timm model"):
        VisionEncoder(VisionConfig(model_name="resnet18"))


def test_freeze_keeps_vit_fixed_and_in_eval():
    enc = VisionEncoder(VisionConfig(freeze=True, drop_path_rate=0.1, **TINY)).train()
    assert not enc.vit.training
    assert not any(p.requires_grad for p in enc.parameters())
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(enc(images), enc(images))  # drop-path off: deterministic
    head = torch.nn.Linear(96, 1)
    head(enc(images)).sum().backward()
    assert all(p.grad is None for p in enc.parameters())
    assert head.weight.grad is not None


def test_dynamic_img_size():
    enc = VisionEncoder(VisionConfig(dynamic_img_size=True, **TINY))
    assert enc.grid_for(48, 80) == (6, 10)
    assert enc(torch.randn(1, 3, 48, 80)).shape == (1, 60, 96)
    fixed = VisionEncoder(VisionConfig(**TINY))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        fixed(torch.randn(1, 3, 48, 80))


def test_patch_grid_without_building():
    assert patch_grid(VisionConfig(**TINY)) == (8, 8)
    assert patch_grid(VisionConfig()) == (14, 14)  # timm defaults: 224 px, patch 16


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_transform_uses_model_size_and_stats(name):
    enc = VisionEncoder(VisionConfig(model_name=name, **TINY))
    mean, std = image_mean_std(enc)
    assert mean == timm.create_model(name, pretrained=False).pretrained_cfg["mean"]  # not a fixed constant
    colour = (200, 30, 90)
    out = build_image_transform(enc, train=False)(Image.new("RGB", (100, 80), colour))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32  # the model's img_size, not 224
    expected = (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(out, expected[:, None, None].expand(3, 64, 64), atol=1e-5)


def test_train_transform_is_deterministic_unless_augment(tiny):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    train, evaluate = build_image_transform(tiny, train=True), build_image_transform(tiny, train=False)
    assert torch.equal(train(image), evaluate(image))
    augmented = VisionEncoder(VisionConfig(augment=True, **TINY))
    names = [type(t).__name__ for t in build_image_transform(augmented, train=True).transforms]
    assert "RandomResizedCropAndInterpolation" in names
    assert not any("Flip" in n or "ColorJitter" in n for n in names)  # captions name sides and colours


def test_crop_pct_override():
    full = VisionEncoder(VisionConfig(crop_pct=1.0, **TINY))
    names = [repr(t) for t in build_image_transform(full, train=False).transforms]
    assert names[0].startswith("Resize(size=64")  # no border cropped away

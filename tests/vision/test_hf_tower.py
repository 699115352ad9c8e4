"""Vision towers from transformers (SigLIP, CLIP) read from local folders, with their own preprocessing."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cmoe_base import ConfigError
from vision import VisionConfig, VisionEncoder, build_image_transform, image_mean_std, input_size, patch_grid

TOWERS = {  # name -> (config class, model class, processor class, processor arguments, prefix tokens)
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", "SiglipImageProcessor",
               dict(size={"height": 32, "width": 32}), 0),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", "CLIPImageProcessor",
             dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), 1),
}


def save_tower(name: str, folder, processor: bool = True):
    import transformers

    config_cls, model_cls, proc_cls, proc_kw, _ = TOWERS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=3, image_size=32, patch_size=8)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(folder)
    if processor:
        getattr(transformers, proc_cls)(**proc_kw).save_pretrained(folder)
    return model


def photo(seed=0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(50, 70, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("processor", [True, False], ids=["own-processor", "family-default"])
@pytest.mark.parametrize("name", TOWERS)
def test_tower_features_and_preprocessing_match_transformers(name, processor, tmp_path):
    import transformers

    model = save_tower(name, tmp_path / "t", processor)
    cfg = VisionConfig(model_name=str(tmp_path / "t"), backend="transformers", pretrained=True)
    assert patch_grid(cfg) == (4, 4) and input_size(cfg) == (32, 32)
    enc = VisionEncoder(cfg).eval()
    assert enc.num_patches == 16 and enc.embed_dim == 48
    if processor:
        reference = transformers.AutoImageProcessor.from_pretrained(tmp_path / "t")
    else:  # the family's default processor at the tower's size
        _, _, proc_cls, proc_kw, _ = TOWERS[name]
        reference = getattr(transformers, proc_cls)(**proc_kw)
    want = reference(photo(), return_tensors="pt").pixel_values[0]
    got = build_image_transform(enc, train=False)(photo())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert image_mean_std(enc) == (tuple(reference.image_mean), tuple(reference.image_std))
    with torch.no_grad():
        features = enc(got[None])
        prefix = TOWERS[name][4]
        torch.testing.assert_close(features, model(pixel_values=got[None]).last_hidden_state[:, prefix:])


def test_tower_config_errors_name_the_field(tmp_path):
    save_tower("siglip", tmp_path / "t")
    with pytest.raises(ConfigError, match=r"^img_size = 64: must be null with backend transformers"):
        VisionConfig(model_name=str(tmp_path / "t"), backend="transformers", img_size=64)
    with pytest.raises(ConfigError, match=r"vision.model_name = .*no config.json"):
        VisionEncoder(VisionConfig(model_name=str(tmp_path / "nope"), backend="transformers"))
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no safetensors"):
        VisionEncoder(VisionConfig(model_name=str(tmp_path / "t"), backend="transformers", pretrained=True))


def test_vlm_with_a_tower_exports_self_contained(tmp_path):
    """The export copies the tower's config and processor into itself: moved, with the tower folder
    gone, it loads (ours and transformers') with the same outputs and preprocessing."""
    from transformers import AutoModelForCausalLM

    import cmoe_vlm.hf  # noqa: F401
    from cmoe_base import Batch, Modality
    from cmoe_vlm.model.chunk import ChunkConfig
    from cmoe_vlm.checkpoints.export import load_pretrained, save_pretrained
    from cmoe_vlm.model.layers.moe import MoEConfig
    from cmoe_vlm.model.conceptmoe import ModelConfig
    from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig

    save_tower("clip", tmp_path / "tower")
    lm = ModelConfig(dim=32, num_heads=2, encoder_layers=1, concept_layers=1, decoder_layers=1,
                     moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32), chunk=ChunkConfig(enabled=False))
    vcfg = VLMConfig(model=lm, vision=VisionConfig(model_name=str(tmp_path / "tower"), backend="transformers",
                                                   pretrained=True))
    model = ConceptMoEVLM(vcfg).eval()
    save_pretrained(model, tmp_path / "a" / "m")
    shutil.move(tmp_path / "a" / "m", tmp_path / "m")
    shutil.rmtree(tmp_path / "tower")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert loaded.cfg.vision.model_name == str(tmp_path / "m" / "vision_tower") and not loaded.cfg.vision.pretrained
    n = loaded.cfg.tokens_per_image
    ids = torch.tensor([[257] + [0] * n + [65, 66]])
    modality = torch.tensor([[Modality.TEXT] + [Modality.IMAGE] * n + [Modality.TEXT] * 2])
    image = build_image_transform(loaded.vision, train=False)(photo())[None]
    batch = Batch.of(ids, modality=modality, images=image)
    with torch.no_grad():
        want = model(batch).logits
        torch.testing.assert_close(loaded(batch).logits, want, rtol=0, atol=0)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        torch.testing.assert_close(hf(ids, modality=modality, images=image).logits, want, rtol=0, atol=0)
    assert dataclasses.replace(loaded.cfg.vision, model_name="x") == dataclasses.replace(
        vcfg.vision, model_name="x", pretrained=False)
    # AutoProcessor applies the tower's own preprocessing, recorded in the export (the tower folder is gone)
    from transformers import AutoProcessor
    pixels = AutoProcessor.from_pretrained(tmp_path / "m").image_processor(photo())["pixel_values"]
    torch.testing.assert_close(pixels, image, rtol=0, atol=1e-6)

"""ConceptMoEVLM: interleaving, no loss on images, forced switches, causality with images, 2D chunking."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cmoe_base import Batch, Modality
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ModelConfig
from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig, above_patch_index, image_run_index
from cmoe_vlm.objective import Objective, lm_loss, margin_loss, ratio_loss
from data_pipelines.packing import Row, collate_rows
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import ByteTokenizer
from vision import ProjectorConfig, VisionConfig

TOK = ByteTokenizer()


def vlm_config(**chunk) -> VLMConfig:
    return VLMConfig(
        model=ModelConfig(dim=48, num_heads=4, encoder_layers=1, concept_layers=1, decoder_layers=1,
                          moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=48), chunk=ChunkConfig(**chunk)),
        vision=VisionConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, crop_pct=1.0),
        projector=ProjectorConfig(reduction=1),  # 4x4 = 16 tokens per image
    )


def batch_of(docs: list[list], cfg: VLMConfig, seq_len: int = 160) -> Batch:
    """Pack each document (text pieces and image tensors) into its own row."""
    rows = []
    for pieces in docs:
        seq = build_sequence(pieces, TOK, cfg.tokens_per_image)
        row = Row()
        row.add(seq, 0, len(seq))
        rows.append(row.pad_to(seq_len, TOK.pad_id))
    return collate_rows(rows, (3, 32, 32))


def image(seed: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))


DOCS = [  # images at the start, in the middle, at the end, and several per sample
    [image(0), "a red square above a blue circle"],
    ["two pictures: ", image(1), " and ", image(2), " side by side"],
    ["the last picture is", image(3)],
]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ConceptMoEVLM(vlm_config()).eval()


def test_image_tokens_are_written_in_order_and_get_no_lm_loss(model):
    batch = batch_of(DOCS, model.cfg)
    assert batch.images.shape[0] == 4 and batch.num_images.tolist() == [1, 2, 1]
    mod = batch.modality
    assert int((mod == 1).sum()) == 4 * 16
    # no label ever asks to predict an image position
    targets_image = torch.zeros_like(mod, dtype=torch.bool)
    targets_image[:, :-1] = mod[:, 1:] == 1
    assert (batch.labels[targets_image] == -100).all()
    # the LM loss is the cross-entropy over text targets only
    out = model(batch)
    mask = batch.labels != -100
    ref = F.cross_entropy(out.logits[mask], batch.labels[mask])
    torch.testing.assert_close(lm_loss(out.logits, batch.labels), ref)
    # the embedding holds the projected patches, image by image, in raster order
    x = model.embed(batch)
    feats = model.projector(model.vision(batch.images), model.vision.grid_size)
    torch.testing.assert_close(x[1][mod[1] == 1].view(2, 16, -1), feats[1:3])
    assert out.compression["image"].tokens == 64 and out.compression["text"].tokens == int(
        ((mod == 0) & (batch.doc_ids >= 0)).sum())


def test_wrong_image_count_is_a_clear_error(model):
    batch = batch_of(DOCS, model.cfg)
    with pytest.raises(ValueError, match="64 image positions but 3 images"):
        model(dataclasses.replace(batch, images=batch.images[:3]))


@pytest.mark.parametrize("training", [False, True])
def test_boundaries_forced_at_the_end_of_every_modality_run(model, training):
    model.train(training)
    batch = batch_of(DOCS, model.cfg)
    out = model(batch)
    mod = batch.modality
    run_end = torch.zeros_like(mod, dtype=torch.bool)
    run_end[:, :-1] = mod[:, 1:] != mod[:, :-1]  # the token before each switch: <img_start>, an image's last token
    assert run_end.sum() == 8
    assert out.boundaries[run_end].all() and (out.boundary_probs[run_end] == 1).all()


@pytest.mark.parametrize("image_chunking", ["raster", "2d"])
def test_causality_with_images(image_chunking):
    torch.manual_seed(0)
    model = ConceptMoEVLM(vlm_config(image_chunking=image_chunking)).eval()
    batch = batch_of([DOCS[1]], model.cfg)
    base = model(batch).logits
    mod = batch.modality[0]
    first_img2 = int((mod == 1).nonzero()[16])  # first patch of the second image
    changed = dataclasses.replace(batch, images=batch.images.clone())
    changed.images[1] = image(99)  # a later image
    later = model(changed).logits
    torch.testing.assert_close(base[:, :first_img2], later[:, :first_img2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base[:, first_img2:], later[:, first_img2:])
    ids = batch.input_ids.clone()
    t = first_img2 + 20  # later text
    ids[0, t] = (ids[0, t] + 1) % 256
    later_text = model(dataclasses.replace(batch, input_ids=ids)).logits
    torch.testing.assert_close(base[:, :t], later_text[:, :t], atol=1e-5, rtol=1e-5)


def test_2d_neighbour_indices():
    mod = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0]])
    assert image_run_index(mod).tolist() == [[-1, -1, 0, 1, 2, 3, 4, 5, -1, 0, 1, 2, 3, 4, 5, -1]]
    above = above_patch_index(mod, grid_cols=3)  # two 2x3 images
    assert above.tolist() == [[-1, -1, -1, -1, -1, 2, 3, 4, -1, -1, -1, -1, 9, 10, 11, -1]]


def test_cached_prefill_with_image_then_text_decoding(model):
    batch = batch_of([DOCS[1]], model.cfg, seq_len=80)
    n = int((batch.doc_ids[0] >= 0).sum())
    ids, mod = batch.input_ids, batch.modality
    with torch.no_grad():
        full = model(Batch.of(ids[:, :n], modality=mod[:, :n], images=batch.images)).logits
        state = model.new_state(1)
        split = 58  # both images (positions 15-32 and 38-55) lie inside the prefill span
        pre = model.extend(Batch.of(ids[:, :split], modality=mod[:, :split], images=batch.images), state).logits
        steps = [model.extend(Batch.of(ids[:, t:t + 1], modality=mod[:, t:t + 1]), state).logits
                 for t in range(split, n)]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), full, atol=1e-4, rtol=1e-4)


def test_save_and_load_pretrained_roundtrip(model, tmp_path):
    import json

    from cmoe_vlm.checkpoints.export import load_pretrained, save_pretrained

    batch = batch_of(DOCS, model.cfg)
    save_pretrained(model, tmp_path / "m")
    loaded, meta = load_pretrained(tmp_path / "m")
    assert loaded.cfg.tokens_per_image == 16 and not loaded.training
    torch.testing.assert_close(loaded(batch).logits, model(batch).logits, rtol=0, atol=0)
    # a config from an older version (a field it did not have yet) still loads, with the default
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    del cfg["vlm"]["model"]["chunk"]["image_chunking"]
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    assert load_pretrained(tmp_path / "m")[0].cfg.model.chunk.image_chunking == "raster"


def test_transformers_auto_classes_load_the_export(model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    import cmoe_vlm.hf  # noqa: F401  registers the Auto classes
    from cmoe_vlm.checkpoints.export import save_pretrained
    from cmoe_vlm.hf import ConceptMoEForCausalLM

    save_pretrained(model, tmp_path / "m")
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "cmoe_vlm"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(hf, ConceptMoEForCausalLM)
    hf.eval()
    batch = batch_of(DOCS, model.cfg)
    ours = model(batch)
    theirs = hf(batch.input_ids, modality=batch.modality, images=batch.images, doc_ids=batch.doc_ids,
                labels=batch.input_ids.masked_fill(batch.doc_ids < 0, -100))
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=0, atol=0)  # custom inits untouched, weights loaded
    # transformers-style (unshifted) labels are shifted onto exactly our targets: same total loss
    torch.testing.assert_close(theirs.loss, Objective(model.cfg.model)(ours, batch).total)
    # greedy generate through GenerationMixin (no cache) on a text prompt
    prompt = torch.tensor([[TOK.bos_id, *TOK.encode("a red")]])
    gen = hf.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    step = prompt
    for _ in range(4):
        nxt = model(Batch.of(step)).logits[:, -1].argmax(-1, keepdim=True)
        step = torch.cat([step, nxt], 1)
    assert torch.equal(gen[:, : step.shape[1]], step)


def test_no_concept_mixes_text_and_image(model):
    """Spec §7: with sum merge, every concept's content is all text or all image."""
    from cmoe_vlm.model.chunk import Boundaries
    from cmoe_vlm.model.merge import SumMerge

    batch = batch_of(DOCS, model.cfg)
    mod = batch.modality
    out = model.train()(batch)  # sampled boundaries: tails before switches are common
    onehot = torch.nn.functional.one_hot(mod, 2).float()  # content "vector" = (text count, image count)
    bnd = Boundaries(out.boundary_probs, out.boundaries, forced=batch.layout.starts)
    cpt = SumMerge()(onehot, bnd, batch.layout)
    valid = cpt.layout.valid
    mixed = (cpt.x[..., 0] > 0) & (cpt.x[..., 1] > 0) & valid
    assert not mixed.any()
    assert (cpt.x[..., 1][valid] > 0).sum() >= 4  # image concepts exist


def test_version_1_exports_load_with_their_old_weight_names():
    """tests/assets/passkey_model was written before the stacks, the concept model and joint decoding
    had their own classes (format version 1): both loaders rename its weights, and nothing is left
    at its initial value."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import cmoe_vlm.hf  # noqa: F401  registers the Auto classes
    from cmoe_vlm.checkpoints.export import load_pretrained
    from cmoe_vlm.model.conceptmoe import LEGACY_KEYS

    folder = Path(__file__).resolve().parents[1] / "assets" / "passkey_model"
    old = load_file(str(folder / "model.safetensors"))
    assert any(k.startswith("lm.concept.0.") for k in old) and any(".attn.concept_qkv." in k for k in old)
    ours, _ = load_pretrained(folder)
    state = ours.state_dict()
    for key, value in old.items():
        new = key[len("lm."):] if key.startswith("lm.") else None
        if new is not None:
            for pattern, repl in LEGACY_KEYS:
                new = __import__("re").sub(pattern, repl, new)
            new = "lm." + new
        torch.testing.assert_close(state[new or key], value.float(), rtol=0, atol=0)
    assert len(state) == len(old)
    theirs = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs(ids).logits, ours(Batch.of(ids)).logits, rtol=0, atol=0)


@pytest.mark.parametrize("detach", [True, False])
def test_boundaries_train_the_chunker_but_not_the_image_features_with_detach_images(detach):
    """chunk.detach_images: the image tokens' ratio and margin losses reach W_q, W_k (and the text before
    each image, which the first image token is scored against), never the vision tower or the projector
    (with it off they do: the trained VLMs learned no image content, docs/design.md §7b)."""
    torch.manual_seed(0)
    model = ConceptMoEVLM(vlm_config(detach_images=detach)).train()
    batch = batch_of(DOCS, model.cfg)
    own = model(batch).own_boundaries
    image = batch.modality == Modality.IMAGE
    (ratio_loss(own.p, own.b, 4.0, image) + margin_loss(own.p, image, 0.5)).backward()
    vision = sum(float(p.grad.abs().sum()) for p in model.vision.parameters() if p.grad is not None)
    projector = sum(float(p.grad.abs().sum()) for p in model.projector.parameters() if p.grad is not None)
    assert float(model.lm.chunk.q_proj.weight.grad.abs().sum()) > 0
    assert (vision == 0 and projector == 0) if detach else (vision > 0 and projector > 0)
    with torch.no_grad():  # the values are the same either way
        model.eval()
        other = ConceptMoEVLM(vlm_config(detach_images=not detach)).eval()
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(batch).logits, model(batch).logits)

"""Conversion of a baseline MoE into ConceptMoE: lossless start, reallocation, CLI, ratio ramp."""
import dataclasses
from pathlib import Path

import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm import flops
from cmoe_vlm.model.boundaries import AllTokens, ConversionRamp
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.checkpoints.conversion import convert, layer_map, overrides_for
from cmoe_vlm.cli.convert import main
from cmoe_vlm.config import apply_overrides, from_dict
from cmoe_vlm.checkpoints.export import load_pretrained, save_pretrained
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ModelConfig
from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig
from cmoe_vlm.objective import Objective


def tiny_baseline(layers=(1, 2, 2)) -> ConceptMoEVLM:
    torch.manual_seed(0)
    e, c, d = layers
    cfg = ModelConfig(dim=32, num_heads=2, encoder_layers=e, concept_layers=c, decoder_layers=d,
                      moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=32), chunk=ChunkConfig(enabled=False))
    vcfg = dataclasses.replace(VLMConfig(model=cfg))
    vcfg = dataclasses.replace(vcfg, vision=dataclasses.replace(vcfg.vision, depth=1, embed_dim=48))
    return ConceptMoEVLM(vcfg).eval()


def batch(T=24) -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, T), generator=g)
    doc_ids = torch.tensor([[0] * 10 + [1] * (T - 10), [0] * (T - 4) + [-1] * 4])
    return Batch.of(ids, doc_ids=doc_ids)


def k_paper(cfg):
    return cfg.concept_moe_cfg.top_k


@pytest.mark.parametrize("split", [(1, 2), (2, 1), (0, 3)])
@pytest.mark.parametrize("merge", ["last", "sum"])
def test_lossless_start_at_r1(split, merge):
    base = tiny_baseline()
    conv, _ = convert(base, *split, strategy="none", target_ratio=2.0, merge=merge)
    with torch.no_grad():
        ref = base(batch()).logits
        out = conv(batch(), boundaries=AllTokens())
    assert bool(out.boundaries[batch().doc_ids >= 0].all())
    assert conv.lm.cfg.num_joint_layers == split[1]
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)


def test_lossless_start_through_cached_decoding():
    base = tiny_baseline()
    conv, _ = convert(base, 1, 2, strategy="none", target_ratio=2.0)
    ids = batch().input_ids[:1, :12]
    with torch.no_grad():
        ref = base(Batch.of(ids)).logits
        state = conv.new_state(1)
        steps = [conv.extend(Batch.of(ids[:, :5]), state, boundaries=AllTokens()).logits]
        steps += [conv.step(ids[:, i], state, boundaries=AllTokens())[:, None] for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=0)


def test_conversion_details_and_reallocation():
    base = tiny_baseline((1, 2, 2))
    mapping = layer_map(base.cfg.model, dataclasses.replace(base.cfg.model, encoder_layers=2, concept_layers=1))
    assert (mapping["lm.encoder.layers.1."] == "lm.concept.layers.0."
            and mapping["lm.concept.layers.0."] == "lm.concept.layers.1.")
    conv, rows = convert(base, 2, 2, strategy="more_experts", target_ratio=2.0)
    cfg = conv.cfg.model
    assert cfg.chunk.enabled and cfg.chunk.init == "identity" and cfg.chunk.merge == "last"
    assert cfg.concept_moe_cfg.top_k > base.cfg.model.moe.top_k
    assert k_paper(cfg) == flops.more_experts_top_k(2, 2.0, 1.42) and rows[1].flops_ratio > 1
    # Whole-model match: the best top_k (one more or one fewer expert would be further off).
    whole, wrows = convert(base, 2, 2, strategy="more_experts", target_ratio=2.0, match="model")
    wcfg = whole.cfg.model
    off = lambda k: abs(flops.account(dataclasses.replace(wcfg, concept_moe=dataclasses.replace(  # noqa: E731
        wcfg.concept_moe_cfg, top_k=k)), 2.0).flops_per_token / wrows[0].cost.flops_per_token - 1)
    k = k_paper(wcfg)
    assert abs(wrows[1].flops_ratio - 1) == pytest.approx(off(k)) and off(k) <= min(off(max(k - 1, 1)), off(k + 1))
    for (k, v), (k0, v0) in zip(conv.lm.concept.layers[0].state_dict().items(),
                                base.lm.concept.layers[1].state_dict().items()):
        assert k == k0 and torch.equal(v, v0)
    looped, lrows = convert(base, 1, 2, strategy="looped", target_ratio=2.0)
    assert looped.cfg.model.loop_layers >= 1
    # flops.py takes the closest (loop, top_k) pair when none is within 2.5%, and refuses beyond 10%.
    assert abs(flops.flops_mismatch("concept", looped.cfg.model, lrows[0].config, 2.0)) <= 0.1
    with pytest.raises(ValueError, match="concept layer"):
        convert(base, 3, 2)


def test_cli_roundtrip_and_overrides(tmp_path, capsys):
    base = tiny_baseline()
    save_pretrained(base, tmp_path / "base")
    assert main(["--baseline", str(tmp_path / "base"), "--out", str(tmp_path / "conv"), "--encoder-layers", "1",
                 "--decoder-layers", "2", "--strategy", "more_experts", "--target-ratio", "2"]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "converted (more_experts)" in printed and "FLOPs/tok" in printed
    conv, meta = load_pretrained(tmp_path / "conv")
    assert meta["converted_from"]["strategy"] == "more_experts"
    # The overrides rebuild the converted model's config from a default experiment.
    lines = (tmp_path / "conv" / "train_overrides.txt").read_text().split()
    data = apply_overrides({}, [x for x in lines if x.startswith("model.")])
    assert from_dict(ModelConfig, data["model"]) == conv.cfg.model
    assert overrides_for(conv.cfg) == lines


def test_forced_boundaries_start_lossless_and_leave_the_ratio_loss_alone():
    """The conversion ramp's forced boundaries: at probability 1 a converted model (strategy none) in
    training mode gives the baseline's logits, whatever its chunker wants; at 0.5 about half the
    non-boundaries become boundaries; the ratio loss is the chunker's own at every probability."""
    base = tiny_baseline()
    conv, _ = convert(base, 1, 2, strategy="none", target_ratio=2.0)
    lm = conv.lm.train()
    ids = Batch.of(torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3)))
    ids.labels = ids.input_ids
    torch.manual_seed(0)
    free = lm(ids)
    assert free.compression["all"].ratio > 1.2  # the converted chunker compresses on its own
    with torch.no_grad():
        ref = base.lm(ids).logits
    ramp = ConversionRamp(ramp_steps=4, step=0)
    assert ramp.probability == 1.0 and ConversionRamp(4, 2).probability == 0.5 and ConversionRamp(4, 9).probability == 0
    torch.manual_seed(0)
    full = lm(ids, boundaries=ramp)
    assert bool(full.boundaries.all())
    torch.testing.assert_close(full.logits, ref, rtol=0, atol=1e-5)
    objective = Objective(lm.cfg)
    # same seed: same sampled chunker boundaries
    torch.testing.assert_close(objective(full, ids).ratio, objective(free, ids).ratio)
    torch.manual_seed(0)
    half = lm(ids, boundaries=ConversionRamp(ramp_steps=4, step=2))
    torch.testing.assert_close(objective(half, ids).ratio, objective(free, ids).ratio)
    added = (half.boundaries & ~free.boundaries).sum() / (~free.boundaries).sum()
    assert 0.3 < float(added) < 0.7
    lm.eval()  # evaluation (no policy passed) never forces
    with torch.no_grad():
        assert not bool(lm(ids).boundaries.all())


CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
TINY = ["model.dim=32", "model.num_heads=2", "model.moe.num_experts=4", "model.moe.expert_hidden=32",
        "model.encoder_layers=1", "model.concept_layers=1", "model.decoder_layers=1", "vision.depth=1",
        "vision.embed_dim=48", "data.seq_len=128", "data.batch_size=2", "data.shuffle_buffer=10", "data.num_workers=0",
        "train.warmup_steps=1", "train.tensorboard=false", "train.heldout_shards=null"]


def test_continual_training_with_ratio_ramp(tmp_path):
    import json

    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.training.loop import train
    from data_pipelines.builtin import write_builtin_dataset

    data = write_builtin_dataset(tmp_path / "data", num_train=40, num_heldout=4, maxcount=20, text_chars=400)
    common = TINY + [f"data.shards={data['train']}"]
    train(load_experiment(CONFIG, common + ["model.chunk.enabled=false", "train.steps=2",
                                                          f"train.out_dir={tmp_path / 'base'}"]))
    assert main(["--baseline", str(tmp_path / "base" / "final"), "--out", str(tmp_path / "conv"),
                 "--encoder-layers", "1", "--decoder-layers", "1", "--strategy", "none", "--target-ratio", "2"]) == 0
    conv_over = (tmp_path / "conv" / "train_overrides.txt").read_text().split()
    exp = load_experiment(CONFIG, common + conv_over + [
        "train.steps=5", "train.ratio_ramp_steps=4", f"train.init_from={tmp_path / 'conv'}",
        f"train.out_dir={tmp_path / 'cont'}"])
    assert exp.model.chunk.target_ratio == 2.0 and exp.model.chunk.dechunk_update
    train(exp)
    rows = [json.loads(x) for x in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert [r["forced_boundary_prob"] for r in rows] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert rows[0]["ratio_all"] == 1.0 and rows[-1]["ratio_all"] > 1.0  # every token a boundary at first
    assert all(r["target_ratio_all"] == 2.0 and r["ratio_loss"] > 0 for r in rows)
    assert exp.model.chunk.target_ratio == 2.0  # the config is not mutated
    with pytest.raises(ValueError, match="model config differs"):
        train(load_experiment(CONFIG, common + [
            "train.steps=1", f"train.init_from={tmp_path / 'conv'}", f"train.out_dir={tmp_path / 'bad'}"]))

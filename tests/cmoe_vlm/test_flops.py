"""FLOPs/params accounting (cmoe_vlm.flops) against the real module and a FLOP counter; the
compute-reallocation proposals; the CLI; a smoke run of bench/bench_core.py."""
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cmoe_base import Batch
from cmoe_vlm import flops
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.config import ConfigError
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig

REPO = Path(__file__).resolve().parents[2]


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=101, dim=64, num_heads=4, encoder_layers=1, concept_layers=2, decoder_layers=2,
                moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32), chunk=ChunkConfig(enabled=True),
                max_seq_len=256)
    base.update(kw)
    return ModelConfig(**base)


OFF = ChunkConfig(enabled=False)
CONFIGS = {
    "baseline": small(chunk=OFF),
    "conceptmoe": small(),
    "looped": small(loop_layers=1, concept_moe=MoEConfig(num_experts=4, top_k=3, expert_hidden=32)),
    "wider": small(concept_dim=96, concept_moe=MoEConfig(num_experts=3, top_k=2, expert_hidden=45)),
    "gqa": small(num_heads=8, num_kv_heads=2),
    "gqa_baseline": small(num_heads=8, num_kv_heads=2, chunk=OFF),
    "shared_expert": small(moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=32, shared_expert_hidden=48)),
    "joint_last_1": small(joint_layers=1),
    "tied": small(tie_embeddings=True, chunk=OFF),
    # the options of imported families: Qwen2-MoE (q/k/v bias, gated shared expert), OLMoE (full q/k
    # norm, all biases), Qwen3-MoE (per-head q/k norm, head_dim apart from dim / heads)
    "qwen2_moe_like": small(attention_bias="qkv", moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32,
                                                                shared_expert_hidden=48, shared_expert_gate=True)),
    "olmoe_like": small(attention_bias="all", qk_norm="full", chunk=OFF),
    "qwen3_moe_like": small(qk_norm="head", head_dim=24, num_kv_heads=2),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_total_params_equal_the_module(name):
    cfg = CONFIGS[name]
    model = ConceptMoE(cfg)
    assert flops.total_params(cfg) == sum(p.numel() for p in model.parameters())
    counts = flops.param_counts(cfg)
    assert counts["chunk"] == (sum(p.numel() for p in model.chunk.parameters()) if model.chunk else 0)
    assert counts["concept"] == sum(p.numel() for p in model.concept.layers.parameters())
    assert counts["concept"] + counts["concept_maps"] == sum(p.numel() for p in model.concept.parameters())
    assert counts["decoder"] == sum(p.numel() for p in model.decoder.parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_activated_params_count_top_k_experts(name):
    cfg = CONFIGS[name]
    model = ConceptMoE(cfg)
    inactive = 0
    for blk in [*model.encoder.layers, *model.concept.layers, *model.decoder.layers]:
        e = blk.moe.experts
        per_expert = (e.w13.numel() + e.w2.numel()) // e.w13.shape[0]
        inactive += (blk.moe.cfg.num_experts - blk.moe.cfg.top_k) * per_expert
    assert flops.activated_params(cfg) == model.num_params() - inactive


def _count(model, x, math_sdpa=False):
    """Forward under FlopCounterMode: (mm + addmm + _grouped_mm FLOPs, bmm FLOPs by module). The experts run
    as _grouped_mm where torch has it (its formula: cmoe_vlm/model/layers/moe.py), as mm otherwise."""
    fc = FlopCounterMode(display=False)
    ctx = sdpa_kernel(SDPBackend.MATH) if math_sdpa else torch.enable_grad()
    with torch.no_grad(), ctx, fc:
        out = model(Batch.of(x))
    counts = {mod: {str(op).split(".")[1]: n for op, n in ops.items()} for mod, ops in fc.get_flop_counts().items()}
    g = counts["Global"]
    unexpected = set(g) - {"mm", "addmm", "bmm", "_grouped_mm"}
    assert not unexpected, f"ops outside the model's matmuls: {unexpected}"
    return out, g.get("mm", 0) + g.get("addmm", 0) + g.get("_grouped_mm", 0), counts


@pytest.mark.parametrize("name", ["baseline", "gqa_baseline", "tied", "shared_expert"])
def test_activated_flops_match_flop_counter_baseline(name):
    """Linear layers and expert matmuls (mm/addmm) of a real forward == flops_per_token · tokens.
    Dropless routing sends every token to exactly top_k experts, so the count is exact whatever the
    router does; the attention map goes through SDPA, which the counter does not see on CPU."""
    cfg = dataclasses.replace(CONFIGS[name], chunk=OFF)
    torch.manual_seed(0)
    model = ConceptMoE(cfg).eval()
    B, T = 2, 96
    _, mm, counts = _count(model, torch.randint(0, cfg.vocab_size, (B, T)))
    assert "bmm" not in counts["Global"]
    assert mm == flops.flops_per_token(cfg) * B * T


@pytest.mark.parametrize("name", ["conceptmoe", "looped", "wider", "gqa", "shared_expert", "joint_last_1"])
def test_activated_flops_match_flop_counter_conceptmoe(name):
    """Same with chunking: the concept layers ran on M concepts (one row: no padding), so the
    prediction at the achieved ratio T/M is exact."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = ConceptMoE(cfg).eval()
    T = 128
    out, mm, counts = _count(model, torch.randint(0, cfg.vocab_size, (1, T)))
    M = int(out.compression["all"].concepts)
    assert 1 < M < T
    predicted = flops.flops_per_token(cfg, ratio=T / M) * T
    assert mm == pytest.approx(predicted, rel=1e-9)
    # the dechunk scan is elementwise: no matmul outside the counted ones
    assert counts["Global"].get("bmm", 0) == 0


@pytest.mark.parametrize("name", ["baseline", "conceptmoe", "looped", "wider", "gqa"])
def test_attention_map_flops_match_math_sdpa(name):
    """With the math SDPA backend the counter sees QK^T and AV as bmm: dense T² (and M²) counts."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = ConceptMoE(cfg).eval()
    T = 96
    out, _, counts = _count(model, torch.randint(0, cfg.vocab_size, (1, T)), math_sdpa=True)
    attn_bmm = counts["Global"].get("bmm", 0) - counts.get("ConceptMoE.dechunk", {}).get("bmm", 0)
    M = int(out.compression["all"].concepts)
    assert attn_bmm == pytest.approx(flops.attention_map_flops(cfg, T, ratio=T / M), rel=1e-9)
    assert flops.attention_map_flops(cfg, T, ratio=T / M, causal=True) == attn_bmm / 2


@pytest.mark.parametrize("name", ["baseline", "conceptmoe", "looped", "wider", "gqa"])
def test_kv_bytes_match_a_prefilled_cache(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = ConceptMoE(cfg).eval()
    T = 80
    state = model.new_state(1)
    with torch.no_grad():
        model.extend(Batch.of(torch.randint(0, cfg.vocab_size, (1, T))), state)
    ratio = T / int(state.num_concepts[0]) if cfg.chunk.enabled else None
    held = sum(state.cache_bytes().values())
    assert held == pytest.approx(T * flops.kv_cache_bytes_per_token(cfg, ratio, bytes_per_value=4), rel=1e-9)


def test_concept_work_scales_with_ratio():
    cfg = CONFIGS["looped"]
    f1, f2 = flops.flops_breakdown(cfg, 1.0), flops.flops_breakdown(cfg, 2.0)
    assert f2["concept"] == f1["concept"] / 2 and f2["encoder"] == f1["encoder"]
    # looping runs the first concept layer again: 3 layer executions
    one_layer = sum(flops.layer_flops(cfg, cfg.dim, cfg.concept_moe_cfg).values())
    assert f1["concept"] == 3 * one_layer
    assert flops.flops_breakdown(CONFIGS["baseline"], 3.0) == flops.flops_breakdown(CONFIGS["baseline"])


# ---------------------------------------------------------------------------------------------
# Compute reallocation
def a_over_e_8() -> ModelConfig:
    """A/e = 8 exactly, router included: (8·768² + 2·768·96) / (6·768·132) = 8."""
    return ModelConfig(vocab_size=1000, dim=768, num_heads=12, encoder_layers=2, concept_layers=8,
                       decoder_layers=2, moe=MoEConfig(num_experts=96, top_k=8, expert_hidden=132), chunk=OFF)


def paper_scale() -> ModelConfig:
    """MoE-A2.5B-60B-shaped (our guess at the shape): 4/19/4 layers, d=2048, 256 experts top-8."""
    return ModelConfig(vocab_size=151936, dim=2048, num_heads=16, encoder_layers=4, concept_layers=19,
                       decoder_layers=4, moe=MoEConfig(num_experts=256, top_k=8, expert_hidden=1408),
                       chunk=OFF, max_seq_len=4096)


def test_strategy1_rule_of_thumb():
    assert flops.more_experts_top_k(8, 2.0, 8.0) == 24
    assert flops.more_experts_top_k(8, 1.5, 8.0) == 16
    cfg = a_over_e_8()
    moe = cfg.concept_moe_cfg
    assert flops.fixed_layer_flops(cfg, cfg.dim, moe) == 8 * flops.expert_flops(cfg.dim, moe)
    for R, k in ((2.0, 24), (1.5, 16)):
        p = flops.propose_more_experts(cfg, R)
        assert p.config.concept_moe.top_k == k and p.config.moe.top_k == 8
        assert p.config.chunk.enabled and p.config.chunk.target_ratio == R
        # with A/e integral the concept layers match exactly: (A + k'e)/R == A + ke
        assert p.cost.flops["concept"] == pytest.approx(flops.flops_breakdown(cfg)["concept"])


def test_looping_reports_when_it_does_not_fit():
    """Two concept layers at R = 1.5: one looped layer with one more expert is already 20% over."""
    p = flops.propose_looped(tiny_cpu(), 1.5, match="model")
    assert p.config is None and "does not fit" in p.note and "top3-loop1" in p.note


def test_strategy1_reports_when_it_does_not_fit():
    cfg = dataclasses.replace(a_over_e_8(), moe=MoEConfig(num_experts=20, top_k=8, expert_hidden=132))
    p = flops.propose_more_experts(cfg, 2.0)
    assert p.config is None and "does not fit" in p.note and "num_experts = 20" in p.note


def small_cpu() -> ModelConfig:
    return small(dim=128, encoder_layers=1, concept_layers=4, decoder_layers=1, chunk=OFF,
                 moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=128))


def tiny_cpu() -> ModelConfig:
    return ModelConfig(vocab_size=262, dim=128, num_heads=4, encoder_layers=2, concept_layers=2, decoder_layers=2,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=256), chunk=OFF)


# (baseline, R, match). "concept" = the paper's equations: the chunk module and joint decoding come
# on top, ~2% at paper scale but ~10% on tiny CPU models, which therefore use match="model".
MATCH_CASES = [("paper", paper_scale, 2.0, "concept"), ("paper", paper_scale, 1.5, "concept"),
               ("ae8", a_over_e_8, 2.0, "concept"), ("ae8", a_over_e_8, 1.5, "concept"),
               ("paper", paper_scale, 2.0, "model"), ("small_cpu", small_cpu, 2.0, "model"),
               ("tiny_cpu", tiny_cpu, 2.0, "model")]


@pytest.mark.parametrize("name,make,R,match", MATCH_CASES, ids=[f"{n}-R{r}-{m}" for n, _, r, m in MATCH_CASES])
def test_every_proposal_matches_baseline_flops(name, make, R, match):
    base = make()
    rows = flops.propose(base, R, seq_len=4096, match=match)
    assert [r.strategy for r in rows] == ["baseline", "efficiency", "more_experts", "looped", "wider"]
    eff = rows[1]
    assert eff.flops_ratio < 1 and eff.attn_map_ratio < 1 and eff.kv_ratio < 1
    for r in rows[2:]:
        assert r.config is not None, r.note
        assert 0.9 <= r.flops_ratio <= 1.1, (r.strategy, r.flops_ratio)
        assert abs(r.params_diff_pct) < 5, (r.strategy, r.params_diff_pct)
        # the record is what account() says about the proposed config
        assert r.cost.flops_per_token == flops.flops_per_token(r.config, R)
        assert r.config.chunk.enabled and r.config.chunk.target_ratio == R
    if match == "model":  # top_k and expert_hidden are free enough to land within a few %
        assert abs(rows[2].flops_ratio - 1) < 0.05 and abs(rows[4].flops_ratio - 1) < 0.02
    looped = rows[3].config
    assert looped.loop_layers >= 1 and looped.concept_moe_cfg.top_k > base.moe.top_k
    wider = rows[4].config
    assert wider.concept_width > base.dim and wider.concept_width % (2 * base.num_heads) == 0
    assert wider.concept_moe_cfg.num_experts < base.moe.num_experts


def test_small_proposals_build_and_count_exactly():
    for r in flops.propose(small_cpu(), 2.0, seq_len=512) + flops.propose(small_cpu(), 2.0, match="model"):
        model = ConceptMoE(r.config)
        assert r.cost.total_params == sum(p.numel() for p in model.parameters()), r.strategy


def test_looped_with_a_fixed_loop():
    p = flops.propose_looped(paper_scale(), 2.0, loop_layers=8)
    assert p.config.loop_layers == 8 and 0.95 < p.flops_ratio < 1.05
    with pytest.raises(ValueError, match="loop_layers"):
        flops.propose_looped(paper_scale(), 2.0, loop_layers=40)


def test_proposals_need_a_baseline_without_chunking():
    with pytest.raises(ValueError, match="chunking off"):
        flops.propose(small(), 2.0)


# ---------------------------------------------------------------------------------------------
# CLI
TINY_MODEL = dict(vocab_size=262, dim=128, num_heads=4, encoder_layers=2, concept_layers=2, decoder_layers=2,
                  moe=dict(num_experts=8, top_k=2, expert_hidden=256), chunk=dict(enabled=False), max_seq_len=1024)


def test_cli_on_a_model_section(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": {"steps": 10}}))
    assert flops.main([str(path), "--ratio", "2", "--seq-len", "512"]) == 0
    out = capsys.readouterr().out
    for row in ("baseline", "efficiency", "more_experts", "looped", "wider"):
        assert f"\n{row} " in out
    assert "attn map/tok@512" in out


def test_cli_on_a_bare_mapping_with_chunking_on_and_json(tmp_path, capsys):
    path = tmp_path / "cm.yaml"
    path.write_text(yaml.safe_dump({**TINY_MODEL, "chunk": {"enabled": True, "target_ratio": 1.5}}))
    assert flops.main([str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == ["baseline", "given", "efficiency", "more_experts", "looped", "wider"]
    assert all(r["ratio"] in (1.0, 1.5) for r in rows if r["fits"])
    assert rows[1]["flops_ratio"] == pytest.approx(rows[2]["flops_ratio"])  # given == efficiency here


def test_cli_rejects_unknown_keys_by_name(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "num_layers": 3}}))
    assert flops.main([str(path)]) == 2
    assert "model.num_layers" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="num_layers"):
        flops.load_model_config(path)


def test_cli_module_entry_point(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_MODEL}))
    r = subprocess.run([sys.executable, "-m", "cmoe_vlm.flops", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "more_experts" in r.stdout


# ---------------------------------------------------------------------------------------------
def test_bench_core_quick_smoke(tmp_path):
    out = tmp_path / "core.json"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench_core.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    data = json.loads(out.read_text())
    assert {"meta", "moe", "dechunk", "train_step", "targets"} <= set(data)
    assert {"loop", "grouped"} <= {row["impl"] for row in data["moe"]}
    assert all(row["moe_over_dense"] > 0 for row in data["moe"])
    assert {row["concepts"] for row in data["dechunk"]}
    assert all(row["speedup_fwd"] > 0 for row in data["dechunk"])
    assert data["train_step"]["proposal"]["strategy"] == "more_experts"
    for row in data["train_step"]["rows"]:
        assert row["conceptmoe_over_baseline"] > 0 and row["achieved_ratio"] > 1
    assert set(data["targets"]) == {"moe_over_dense", "dechunk_speedup_8k", "dechunk_speedup_8k_fwdbwd",
                                    "train_step_ratio_4k"}
    assert all(isinstance(t["pass"], bool) for t in data["targets"].values())


def test_flops_matched_takes_the_first_strategy_that_fits():
    for base, R in ((small_cpu(), 2.0), (small(chunk=OFF, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32)), 2.0),
                    (small(chunk=OFF, moe=MoEConfig(num_experts=2, top_k=2, expert_hidden=32)), 4.0)):
        tried = [f(base, R) for f in (flops.propose_more_experts, flops.propose_looped, flops.propose_wider)]
        first = next((p for p in tried if p.config is not None), None)
        got = flops.propose_flops_matched(base, R)
        if first is None:
            assert got.config is None and all(p.note in got.note for p in tried)
        else:
            assert (got.strategy, got.config) == (first.strategy, first.config)


@pytest.mark.parametrize("name", ["baseline", "conceptmoe", "looped", "wider"])
def test_realized_flops_count_what_the_forward_ran(name):
    """Packed documents in one row (no padding at either level): the linear part equals the matmuls
    the FLOP counter saw, with the concept count the merger made; the attention part is each
    document's own causal map at both levels (one document: `attention_map_flops(causal=True)`)."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = ConceptMoE(cfg).eval()
    T = 120
    doc = torch.tensor([[0] * 50 + [1] * 7 + [2] * 63])
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        out = model(Batch.of(torch.randint(0, cfg.vocab_size, (1, T)), doc_ids=doc))
    g = {str(op).split(".")[1]: n for op, n in fc.get_flop_counts()["Global"].items()}
    tokens = ((50, 7, 63),)
    assert (out.concept_lengths is None) == (not cfg.chunk.enabled)
    got = flops.realized_flops(cfg, tokens, out.concept_lengths)
    assert got["linear"] == g["mm"] + g.get("addmm", 0) + g.get("_grouped_mm", 0)
    concepts = out.concept_lengths or tokens
    assert len(concepts[0]) == 3 and sum(concepts[0]) <= T
    per_doc = [flops.realized_flops(cfg, ((n,),), ((m,),) if cfg.chunk.enabled else None)["attention"]
               for n, m in zip(tokens[0], concepts[0])]
    assert got["attention"] == pytest.approx(sum(per_doc), rel=1e-12)
    n, m = tokens[0][0], concepts[0][0]
    assert per_doc[0] == pytest.approx(flops.attention_map_flops(cfg, n, ratio=n / m, causal=True), rel=1e-12)
    if cfg.chunk.enabled:
        with pytest.raises(ValueError, match="concept counts"):
            flops.realized_flops(cfg, tokens)

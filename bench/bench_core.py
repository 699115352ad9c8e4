"""Core benchmarks of issue 3, on CPU (2 threads): writes JSON and prints a table.

(a) MoE layer fwd+bwd throughput vs a dense SwiGLU with the same activated FLOPs
    (dense hidden = top_k · expert_hidden), for the `loop` and `grouped` expert impls;
(b) dechunk `ema_scan` vs a per-token Python loop reference at 1K and 8K concepts (fwd, fwd+bwd);
(c) training step (fwd + bwd + AdamW) of ConceptMoE at R = 2 vs its FLOPs-matched baseline at 2K and
    4K tokens in one row: the ConceptMoE is `cmoe_vlm.flops.propose_more_experts` (strategy 1,
    more active experts in the concept layers) applied to the baseline. Its boundaries are sampled
    from an untrained chunk module (p ≈ 0.5), which gives R ≈ 2; the achieved ratio is reported.

Arms are interleaved (A B A B ...) after a warm-up and the medians are compared, because the
machine is shared and noisy. OMP_WAIT_POLICY defaults to PASSIVE here: on a 2-core machine where
another process holds a core, OpenMP's default spin-waiting made every 2-thread op wait for a
descheduled thread (MoE fwd+bwd 2.3 s instead of 0.2-0.5 s), which penalises many-small-op code
(the MoE loop, the chunk/dechunk glue) far more than one big matmul. Set it in the environment to
override. The load average before and after is recorded. Usage:

    python bench/bench_core.py [--out bench/results/core.json] [--quick]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the docstring

import argparse
import resource
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch

from cmoe_base import Batch
from cmoe_vlm import flops
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.dechunk import ema_scan
from cmoe_vlm.model.layers.moe import MoE, MoEConfig, SwiGLU
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig
from cmoe_vlm.objective import Objective

TARGETS = {"moe_over_dense": 0.5, "dechunk_speedup_8k": 20.0, "train_step_ratio_4k": 1.0}


def interleaved(arms: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each zero-argument callable `reps` times, alternating arms; seconds per call."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    times = {name: [] for name in arms}
    for _ in range(reps):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------
# (a) MoE vs dense SwiGLU
def bench_moe(tokens: int, dim: int, experts: int, top_k: int, hidden: int, reps: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, dim)
    g = torch.randn(tokens, dim)
    dense = SwiGLU(dim, top_k * hidden)
    moes = {impl: MoE(dim, MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden, impl=impl))
            for impl in ("loop", "grouped")}
    for m in moes.values():  # same weights for both impls
        m.load_state_dict(moes["loop"].state_dict())

    def step(module, is_moe):
        def run():
            xi = x.detach().requires_grad_()
            y = module(xi)[0] if is_moe else module(xi)
            y.backward(g)
            module.zero_grad(set_to_none=True)
        return run

    arms = {"dense": step(dense, False), **{impl: step(m, True) for impl, m in moes.items()}}
    times = interleaved(arms, reps)
    # activated matmul FLOPs per token, forward (router included on the MoE side)
    moe_flops = top_k * 6 * dim * hidden + 2 * dim * experts
    dense_flops = 6 * dim * top_k * hidden
    rows = []
    for impl in moes:
        rows.append({
            "impl": impl, "tokens": tokens, "dim": dim, "experts": experts, "top_k": top_k, "expert_hidden": hidden,
            "dense_hidden": top_k * hidden, "moe_ms": 1e3 * med(times[impl]), "dense_ms": 1e3 * med(times["dense"]),
            "moe_tokens_per_s": tokens / med(times[impl]), "dense_tokens_per_s": tokens / med(times["dense"]),
            "moe_over_dense": med(times["dense"]) / med(times[impl]),
            "moe_flops_over_dense": moe_flops / dense_flops,
            "moe_gflops_per_s_fwdbwd": 3 * moe_flops * tokens / med(times[impl]) / 1e9,
            "dense_gflops_per_s_fwdbwd": 3 * dense_flops * tokens / med(times["dense"]) / 1e9,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# (b) dechunk scan vs loop
def ema_loop(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Reference: y_m = a_m · y_{m−1} + u_m, one concept at a time (a = 0 resets), batched over rows.

    `unbind` rather than `u[:, m]`: indexing would make the backward O(M²) (each select's backward
    writes a full-size zero gradient), 33 s instead of ~0.5 s at 8K; this is the fast loop."""
    y = torch.zeros_like(u[:, 0])
    out = []
    for u_m, a_m in zip(u.unbind(1), a.unbind(1)):
        y = a_m[:, None] * y + u_m
        out.append(y)
    return torch.stack(out, dim=1)


def bench_dechunk(concepts: int, dim: int, reps_scan: int, reps_loop: int) -> dict:
    torch.manual_seed(0)
    p = torch.rand(1, concepts).clamp(1e-4, 1 - 1e-4)
    reset = torch.rand(1, concepts) < 0.01
    reset[:, 0] = True
    c_hat = torch.randn(1, concepts, dim)
    u = torch.where(reset[..., None], c_hat, p[..., None] * c_hat)
    a = torch.where(reset, torch.zeros_like(p), 1 - p)  # the decay a (0 = reset)
    g = torch.randn_like(u)
    err = (ema_scan(u, a) - ema_loop(u, a)).abs().max().item()

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(u, a)
        return run

    def fwdbwd(fn):
        def run():
            ui = u.detach().requires_grad_()
            fn(ui, a).backward(g)
        return run

    # the loop is slow: time it fewer times, but still interleaved with the scan
    t_fwd = interleaved({"scan": fwd(ema_scan), "loop": fwd(ema_loop)}, reps_loop)
    t_fwd["scan"] += interleaved({"scan": fwd(ema_scan)}, reps_scan, warmup=0)["scan"]
    t_bwd = interleaved({"scan": fwdbwd(ema_scan), "loop": fwdbwd(ema_loop)}, reps_loop)
    t_bwd["scan"] += interleaved({"scan": fwdbwd(ema_scan)}, reps_scan, warmup=0)["scan"]
    return {
        "concepts": concepts, "dim": dim, "max_abs_err": err,
        "scan_fwd_ms": 1e3 * med(t_fwd["scan"]), "loop_fwd_ms": 1e3 * med(t_fwd["loop"]),
        "speedup_fwd": med(t_fwd["loop"]) / med(t_fwd["scan"]),
        "scan_fwdbwd_ms": 1e3 * med(t_bwd["scan"]), "loop_fwdbwd_ms": 1e3 * med(t_bwd["loop"]),
        "speedup_fwdbwd": med(t_bwd["loop"]) / med(t_bwd["scan"]),
    }


# ---------------------------------------------------------------------------------------------
# (c) training step, ConceptMoE R=2 vs FLOPs-matched baseline
def bench_baseline_config(quick: bool) -> ModelConfig:
    """A small MoE whose concept layers are the bulk of the compute (as in the paper, 4/19/4)."""
    if quick:
        return ModelConfig(vocab_size=262, dim=64, num_heads=4, encoder_layers=1, concept_layers=2,
                           decoder_layers=1, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=64),
                           chunk=ChunkConfig(enabled=False), max_seq_len=4096)
    return ModelConfig(vocab_size=262, dim=192, num_heads=6, encoder_layers=1, concept_layers=4, decoder_layers=1,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=192),
                       chunk=ChunkConfig(enabled=False), max_seq_len=4096)


def bench_train_step(baseline: ModelConfig, ratio: float, token_counts: list[int], reps: int, match: str) -> dict:
    prop = flops.propose_more_experts(baseline, ratio, match=match)
    if prop.config is None:
        raise SystemExit(f"strategy 1 does not fit the bench baseline: {prop.note}")
    cfgs = {"baseline": baseline, "conceptmoe": prop.config}
    rows = []
    for T in token_counts:
        torch.manual_seed(0)
        ids = torch.randint(0, baseline.vocab_size, (1, T + 1))
        xy = Batch.of(ids[:, :-1], labels=ids[:, 1:])
        models, opts, ratios = {}, {}, []
        for name, cfg in cfgs.items():
            torch.manual_seed(1)
            models[name] = ConceptMoE(cfg).train()
            opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-5)

        def step(name):
            def run():
                out = models[name](xy)
                Objective(cfgs[name])(out, xy).total.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                if name == "conceptmoe":
                    ratios.append(out.compression["all"].ratio)
            return run

        times = interleaved({n: step(n) for n in cfgs}, reps)
        tb, tc = med(times["baseline"]), med(times["conceptmoe"])
        achieved = statistics.mean(ratios)
        rows.append({
            "tokens": T, "baseline_ms": 1e3 * tb, "conceptmoe_ms": 1e3 * tc, "conceptmoe_over_baseline": tc / tb,
            "achieved_ratio": achieved, "reps": reps,
            "flops_ratio_at_target": prop.flops_ratio,
            "flops_ratio_at_achieved": flops.flops_per_token(prop.config, achieved) / flops.flops_per_token(baseline),
            "attn_map_share_baseline": (flops.attention_map_flops(baseline, T) / T)
            / (flops.attention_map_flops(baseline, T) / T + flops.flops_per_token(baseline)),
            "attn_map_ratio_at_achieved": flops.attention_map_flops(prop.config, T, achieved)
            / flops.attention_map_flops(baseline, T),
            "baseline_all_ms": [1e3 * t for t in times["baseline"]],
            "conceptmoe_all_ms": [1e3 * t for t in times["conceptmoe"]],
        })
    return {"rows": rows, "proposal": prop.summary(), "baseline_config": dataclasses.asdict(baseline),
            "conceptmoe_config": dataclasses.asdict(prop.config), "match": match}


def bench_vlm_step(batch: int, seq_len: int, images_per_row: int, reps: int) -> dict:
    """Tiny VLM (configs/tiny.yaml): ViT + projector + ConceptMoE forward+backward on interleaved rows."""
    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.model.vlm import ConceptMoEVLM

    exp = load_experiment(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")
    torch.manual_seed(0)
    model = ConceptMoEVLM(exp.vlm).train()
    P = exp.vlm.tokens_per_image
    ids = torch.randint(0, 256, (batch, seq_len))
    modality = torch.zeros(batch, seq_len, dtype=torch.long)
    for k in range(images_per_row):  # images spread over each row, wrapped by marker tokens
        start = 1 + k * seq_len // images_per_row
        modality[:, start:start + P] = 1
    images = torch.randn(batch * images_per_row, 3, exp.vision.img_size, exp.vision.img_size)
    labels = ids.masked_fill(modality == 1, -100)
    batch_ = Batch.of(ids, modality=modality, labels=labels, images=images)

    def step():
        model.zero_grad(set_to_none=True)
        Objective(exp.model)(model(batch_), batch_).total.backward()

    times = interleaved({"vlm": step}, reps)["vlm"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    return {"batch": batch, "seq_len": seq_len, "images_per_row": images_per_row, "tokens_per_image": P,
            "params": sum(p.numel() for p in model.parameters()), "fwd_bwd_ms": 1e3 * med(times),
            "tokens_per_s": batch * seq_len / med(times), "peak_rss_mib": rss}


# ---------------------------------------------------------------------------------------------
def print_tables(res: dict) -> None:
    print("\n(a) MoE fwd+bwd vs dense SwiGLU at equal activated FLOPs")
    print(f"{'impl':8} {'tokens':>6} {'moe ms':>8} {'dense ms':>8} {'moe tok/s':>10} {'dense tok/s':>11} {'moe/dense':>9}")
    for r in res["moe"]:
        print(f"{r['impl']:8} {r['tokens']:>6} {r['moe_ms']:>8.1f} {r['dense_ms']:>8.1f} {r['moe_tokens_per_s']:>10.0f} "
              f"{r['dense_tokens_per_s']:>11.0f} {r['moe_over_dense']:>9.2f}")
    print("\n(b) dechunk ema_scan vs per-token loop")
    print(f"{'concepts':>8} {'scan fwd ms':>11} {'loop fwd ms':>11} {'speedup':>7} {'scan f+b ms':>11} "
          f"{'loop f+b ms':>11} {'speedup':>7} {'max err':>8}")
    for r in res["dechunk"]:
        print(f"{r['concepts']:>8} {r['scan_fwd_ms']:>11.2f} {r['loop_fwd_ms']:>11.1f} {r['speedup_fwd']:>7.0f} "
              f"{r['scan_fwdbwd_ms']:>11.2f} {r['loop_fwdbwd_ms']:>11.1f} {r['speedup_fwdbwd']:>7.0f} "
              f"{r['max_abs_err']:>8.1e}")
    ts = res["train_step"]
    p = ts["proposal"]
    print(f"\n(c) training step (fwd+bwd+AdamW), batch 1: ConceptMoE R=2 (concept top{p['concept_top_k']}, "
          f"match={ts['match']}) vs baseline")
    print(f"{'tokens':>6} {'base ms':>8} {'cmoe ms':>8} {'cmoe/base':>9} {'ratio R':>7} {'FLOPs×':>6} {'attn×':>6}")
    for r in ts["rows"]:
        print(f"{r['tokens']:>6} {r['baseline_ms']:>8.0f} {r['conceptmoe_ms']:>8.0f} {r['conceptmoe_over_baseline']:>9.3f} "
              f"{r['achieved_ratio']:>7.2f} {r['flops_ratio_at_achieved']:>6.3f} {r['attn_map_ratio_at_achieved']:>6.3f}")
    v = res["vlm_step"]
    print(f"\n(d) tiny VLM fwd+bwd, {v['batch']}x{v['seq_len']} tokens, {v['images_per_row']} images/row: "
          f"{v['fwd_bwd_ms']:.0f} ms ({v['tokens_per_s']:.0f} tokens/s), peak RSS {v['peak_rss_mib']:.0f} MiB")
    print("\ntargets")
    for name, t in res["targets"].items():
        print(f"  {name}: {t['value']:.3f} (target {t['op']} {t['target']}) -> {'PASS' if t['pass'] else 'MISS'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/core.json")
    ap.add_argument("--quick", action="store_true", help="a ~30-second smoke version (small sizes, few reps)")
    ap.add_argument("--match", choices=("model", "concept"), default="model",
                    help="FLOPs matching of the ConceptMoE proposal: whole model (default) or the paper's "
                         "concept-layer equation")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    t_start = time.perf_counter()
    res = {"meta": {
        "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "threads": torch.get_num_threads(), "quick": q, "device": "cpu", "dtype": "float32",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
    }}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, load {os.getloadavg()[0]:.1f}, {'quick' if q else 'full'} run", flush=True)
    res["moe"] = bench_moe(tokens=1024 if q else 4096, dim=256, experts=8, top_k=2, hidden=256, reps=3 if q else 10)
    print("moe done", flush=True)
    res["dechunk"] = [bench_dechunk(n, 256, reps_scan=5 if q else 20, reps_loop=1 if q else 3)
                      for n in ([1024] if q else [1024, 8192])]
    print("dechunk done", flush=True)
    res["train_step"] = bench_train_step(bench_baseline_config(q), 2.0, [512, 1024] if q else [2048, 4096],
                                         reps=2 if q else 6, match=args.match)
    res["vlm_step"] = bench_vlm_step(batch=2 if q else 8, seq_len=256 if q else 512, images_per_row=2,
                                     reps=2 if q else 5)
    print("vlm step done", flush=True)
    res["meta"]["wall_s"] = time.perf_counter() - t_start
    res["meta"]["loadavg_end"] = os.getloadavg()

    best_moe = max(res["moe"], key=lambda r: r["moe_over_dense"])
    d8 = res["dechunk"][-1]
    t_last = res["train_step"]["rows"][-1]
    res["targets"] = {
        "moe_over_dense": {"value": best_moe["moe_over_dense"], "target": TARGETS["moe_over_dense"], "op": ">=",
                           "impl": best_moe["impl"], "tokens": best_moe["tokens"],
                           "pass": best_moe["moe_over_dense"] >= TARGETS["moe_over_dense"]},
        "dechunk_speedup_8k": {"value": d8["speedup_fwd"], "target": TARGETS["dechunk_speedup_8k"], "op": ">=",
                               "concepts": d8["concepts"], "pass": d8["speedup_fwd"] >= TARGETS["dechunk_speedup_8k"]},
        "dechunk_speedup_8k_fwdbwd": {"value": d8["speedup_fwdbwd"], "target": TARGETS["dechunk_speedup_8k"],
                                      "op": ">=", "concepts": d8["concepts"],
                                      "pass": d8["speedup_fwdbwd"] >= TARGETS["dechunk_speedup_8k"]},
        "train_step_ratio_4k": {"value": t_last["conceptmoe_over_baseline"], "target": TARGETS["train_step_ratio_4k"],
                                "op": "<=", "tokens": t_last["tokens"],
                                "pass": t_last["conceptmoe_over_baseline"] <= TARGETS["train_step_ratio_4k"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print_tables(res)
    print(f"\nwrote {out} ({res['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

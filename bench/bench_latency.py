"""Inference latency of ConceptMoE vs the baseline MoE (issue 8), on CPU, beside the FLOPs model.

Measures, for the baseline MoE and ConceptMoE at R = 1.5, 2, 4, both same-depth (efficiency-oriented:
chunking on, nothing reallocated; `flops.propose_efficiency`) and FLOPs-matched (quality-oriented:
`flops.propose_more_experts`, falling back to looping, then a wider concept model, when the extra
experts do not fit):

- prefill time of one sequence of N tokens (one cached forward, `InferenceSession.prefill`), N = 1K..32K;
- per-token decode time at KV length L (`InferenceSession.step`, batch 1; `--decode-batch B`
  decodes B copies of the sequence together), L = the same lengths,
  continuing from the state the prefill at L left;
- KV-cache bytes per token, measured from `InferenceSession.cache_bytes()` after the prefill;

and shows each measured speedup over the baseline beside the one the FLOPs model predicts
(`cmoe_vlm.flops`): prefill time ∝ activated FLOPs·N + causal attention-map FLOPs; decode time per
token ∝ activated FLOPs per token + attention FLOPs of one new query against L keys (concept
layers: L/R keys on 1/R of the steps). At batch 1 in fp32 with plain multi-head attention each
weight and each cached value is read once per 2 FLOPs, so this is also the bytes-moved model.

**Boundaries are set, not learned (benchmark only).** An untrained chunk module puts boundaries
at p ≈ 0.5 (R ≈ 2, at random places). To run each config at its R exactly, its sessions use the
boundary policy `FixedStride(R)` (cmoe_vlm/model/boundaries.py): the chunk module still computes p (the
projections cost what they cost), and the boundaries are "token n is a boundary iff
⌊n/R⌋ > ⌊(n−1)/R⌋" (n = position; token 0 always), so exactly ⌈N/R⌉ of N tokens are
boundaries and decode meets a boundary on every R-th step on average. Output says so.

Model: dim 64, 1 encoder + 6 concept + 1 decoder layers (the concept model is the bulk, as in the
paper), 16 experts top-2. The dim is small because this CPU gives ~20 GFLOP/s on 2 threads: the
baseline's 32K-token prefill at dim 256 would alone take ~4 minutes. Speedups depend on the
FLOPs split, which the prediction follows; `--dim` changes it (`--dim 256 --lengths 1024,4096,16384`:
~3 minutes). At batch 1 the decode step's fixed part (the small ops' call overhead, ~6-8 µs per op
on a 2-core CPU; ConceptMoE adds the chunk/dechunk/joint-decoding ops) is not in the FLOPs model, so
batch-1 decode lands at ~80% of the prediction at 16K; `--decode-batch 8` amortises it (90-95%).

Timing: torch.set_num_threads(2), OMP_WAIT_POLICY=PASSIVE (see bench_core.py), a warm-up, then
repetitions interleaved across configs (the order rotates every repetition) and medians; the load
average before and after is recorded. The full run takes ~6-10 minutes; `--quick` (N = 256..1K)
under a minute. Writes latency.json, latency.md (paper-style tables) and latency.png to --out.

    python bench/bench_latency.py [--out bench/results/latency] [--quick]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_core.py

import argparse
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
from cmoe_vlm.model.boundaries import FixedStride
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ConceptMoE, DecodingState, ModelConfig
from cmoe_vlm.inference.session import InferenceSession

RATIOS = (1.5, 2.0, 4.0)
TARGETS = {"prefill_16k_r2": 1.8, "decode_16k_r2": 1.5, "fraction_of_prediction_16k_up": 0.85}


# ---------------------------------------------------------------------------------------------
# Configs
def baseline_config(dim: int, max_len: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=262, dim=dim, num_heads=max(1, dim // 64), encoder_layers=1, concept_layers=6, decoder_layers=1,
        moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=2 * dim), chunk=ChunkConfig(enabled=False),
        max_seq_len=max_len)


def bench_configs(base: ModelConfig) -> list[dict]:
    """[{name, kind, ratio, config, note}] for the baseline and the six ConceptMoE configs."""
    rows = [{"name": "baseline", "kind": "baseline", "ratio": 1.0, "config": base, "note": "chunking off"}]
    for R in RATIOS:
        p = flops.propose_efficiency(base, R)
        rows.append({"name": f"same-depth R={R:g}", "kind": "same-depth", "ratio": R, "config": p.config,
                     "note": p.note})
    for R in RATIOS:
        p = flops.propose_flops_matched(base, R)
        if p.config is None:
            raise SystemExit(f"no FLOPs-matched ConceptMoE fits the benchmark baseline at R={R}: {p.note}")
        rows.append({"name": f"FLOPs-matched R={R:g}", "kind": "flops-matched", "ratio": R, "config": p.config,
                     "note": f"{p.strategy}: {p.note}"})
    return rows


# ---------------------------------------------------------------------------------------------
# Models and their sessions (boundaries every R-th token: benchmark only)
def build_model(entry: dict, seed: int = 0) -> ConceptMoE:
    torch.manual_seed(seed)
    return ConceptMoE(entry["config"]).eval()


def new_session(model: ConceptMoE, entry: dict) -> InferenceSession:
    return InferenceSession(model, boundaries=FixedStride(entry["ratio"]) if model.chunk is not None else None)


# ---------------------------------------------------------------------------------------------
# Predictions (FLOPs model)
def predicted_prefill_flops(cfg: ModelConfig, ratio: float, n: int) -> float:
    R = ratio if cfg.chunk.enabled else None
    return flops.flops_per_token(cfg, R) * n + flops.attention_map_flops(cfg, n, R, causal=True)


def predicted_decode_flops(cfg: ModelConfig, ratio: float, kv_len: int) -> float:
    """One new token at KV length L: dense attention-map FLOPs over L, divided by L, is 4·L·width per
    token-level layer and 4·(L/R)·width/R per concept layer (run on 1/R of the steps)."""
    R = ratio if cfg.chunk.enabled else None
    return flops.flops_per_token(cfg, R) + flops.attention_map_flops(cfg, kv_len, R, causal=False) / kv_len


# ---------------------------------------------------------------------------------------------
# Measurement
def loadavg() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def text_batch(n: int, seed: int = 0) -> Batch:
    return Batch.of(torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed)))


def snapshot(state: DecodingState) -> dict:
    caches = state.encoder + state.concept + state.decoder
    return {"lengths": [c.lengths.clone() for c in caches], "num_tokens": state.num_tokens.clone()}


def restore(state: DecodingState, snap: dict) -> None:
    """Back to the KV length the prefill left (the entries written since are overwritten next time)."""
    for c, n in zip(state.encoder + state.concept + state.decoder, snap["lengths"]):
        c.set_lengths(n.clone())
    state.num_tokens = snap["num_tokens"].clone()


def run_length(sessions: dict[str, InferenceSession], n: int, prefill_reps: int, decode_reps: int, steps: int,
               decode_batch: int = 1) -> dict:
    """Interleaved prefill and decode timings of every model's session at length n. Decode runs
    `decode_batch` rows, copies of the prefilled one (per-step costs that do not grow with rows are
    shared)."""
    names = list(sessions)
    batch = text_batch(n)
    prefill_t = {k: [] for k in names}
    for rep in range(prefill_reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for k in order:
            t0 = time.perf_counter()
            sessions[k].prefill(batch)
            prefill_t[k].append(time.perf_counter() - t0)
    kv = {k: {part: b / n for part, b in sessions[k].cache_bytes().items()} for k in names}
    concepts = {k: int(sessions[k].state.num_concepts[0]) for k in names}
    for k in names:
        sessions[k].select(torch.zeros(decode_batch, dtype=torch.long))
    tok = torch.full((decode_batch,), 65)
    snaps = {}
    for k in names:  # warm-up: the first step grows the caches (one-time copy), then rewind
        snaps[k] = snapshot(sessions[k].state)
        for _ in range(2):
            sessions[k].step(tok)
        restore(sessions[k].state, snaps[k])
    decode_t = {k: [] for k in names}
    for rep in range(decode_reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                sessions[k].step(tok)
            decode_t[k].append((time.perf_counter() - t0) / steps)
            restore(sessions[k].state, snaps[k])
    return {"prefill": prefill_t, "decode": decode_t, "kv": kv, "concepts": concepts}


def warmup(sessions: dict[str, InferenceSession]) -> None:
    batch = text_batch(256, seed=1)
    for s in sessions.values():
        logits = s.prefill(batch)
        for _ in range(3):
            s.step(logits.argmax(-1))


def context_increments(decode_rows: list[dict]) -> list[dict]:
    """Split a decode step into a fixed part and the part the context adds: for each L above the
    shortest length L0, the step time added from L0 to L, Δ(L) = t(L) − t(L0), and the speedup of
    that increment over the baseline's, beside the FLOPs model's ratio of the same increments. The
    increment is attention over the extra keys, the work ConceptMoE divides by ~R^2 in the concept
    layers; the fixed part is the per-step cost of the layers' small ops (at dim 64 and batch 1 on
    CPU, hundreds of ~5-10 µs op calls), which the FLOPs model does not see."""
    lengths = sorted({r["length"] for r in decode_rows})
    if len(lengths) < 2:
        return []
    by = {(r["config"], r["length"]): r for r in decode_rows}
    l0, out = lengths[0], []
    for n in lengths[1:]:
        base, base0 = by[("baseline", n)], by[("baseline", l0)]
        for name in dict.fromkeys(r["config"] for r in decode_rows):
            if name == "baseline":
                continue
            r, r0 = by[(name, n)], by[(name, l0)]
            added = r["median_s"] - r0["median_s"]
            speed = (base["median_s"] - base0["median_s"]) / added if added > 0 else None
            pred = (base["predicted_flops"] - base0["predicted_flops"]) / (r["predicted_flops"] - r0["predicted_flops"])
            out.append({"config": name, "from": l0, "length": n, "added_s": added, "speedup": speed,
                        "predicted_speedup": pred, "fraction_of_prediction": speed / pred if speed else None,
                        "fixed_speedup": base0["median_s"] / r0["median_s"],
                        "fixed_predicted_speedup": r0["predicted_speedup"]})
    return out


# ---------------------------------------------------------------------------------------------
# Reporting
def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def pct(x: float) -> str:
    return f"{100 * (x - 1):+.0f}%"


def markdown(result: dict) -> str:
    cfgs = [c["name"] for c in result["configs"]]
    others = cfgs[1:]
    out = [f"# ConceptMoE inference latency (CPU, {result['meta']['threads']} threads)", "",
           result["meta"]["boundaries"], "",
           "Cells: measured speedup over the baseline (paper-style % gain) · FLOPs-model prediction · "
           "measured / predicted.", ""]
    for phase, title, unit in (("prefill", "Prefill (one sequence of N tokens)", "ms"),
                               ("decode", f"Decode (per step, batch {result['meta']['decode_batch']}, KV length L)", "ms/step")):
        rows = [r for r in result[phase]]
        lengths = sorted({r["length"] for r in rows})
        out += [f"## {title}", "", "| " + " | ".join(["N" if phase == "prefill" else "L", f"baseline {unit}"] + others)
                + " |", "|" + "---|" * (2 + len(others))]
        for n in lengths:
            by = {r["config"]: r for r in rows if r["length"] == n}
            cells = [f"{n // 1024}K" if n >= 1024 else str(n), f"{1e3 * by['baseline']['median_s']:.1f}"]
            for c in others:
                r = by[c]
                cells.append(f"{fmt_x(r['speedup'])} ({pct(r['speedup'])}) · pred {fmt_x(r['predicted_speedup'])}"
                             f" · {100 * r['fraction_of_prediction']:.0f}%")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    inc = result.get("decode_context_added") or []
    if inc:
        l0 = inc[0]["from"]
        out += [f"## Decode: the time the context adds (from L = {l0 // 1024 if l0 >= 1024 else l0}"
                f"{'K' if l0 >= 1024 else ''} to L)", "",
                "Each step split into what it costs at the shortest length (fixed per-step work: at this "
                "size mostly the small ops' call overhead) and what the longer context adds (attention over "
                "more keys). Cells: speedup of the added time over the baseline's · FLOPs model · measured / "
                "predicted. Row 'at L0': the fixed part's speedup · FLOPs model at L0.", "",
                "| L | " + " | ".join(others) + " |", "|" + "---|" * (1 + len(others))]
        first = {r["config"]: r for r in inc if r["length"] == inc[0]["length"]}
        out.append("| at L0 | " + " | ".join(
            f"{fmt_x(first[c]['fixed_speedup'])} · pred {fmt_x(first[c]['fixed_predicted_speedup'])}" for c in others) + " |")
        for n in sorted({r["length"] for r in inc}):
            by = {r["config"]: r for r in inc if r["length"] == n}
            out.append(f"| {n // 1024}K | " + " | ".join(
                f"{fmt_x(by[c]['speedup'])} · pred {fmt_x(by[c]['predicted_speedup'])}"
                + (f" · {100 * by[c]['fraction_of_prediction']:.0f}%" if by[c]["fraction_of_prediction"] else "")
                for c in others) + " |")
        out.append("")
    out += ["## KV-cache bytes per token (fp32, measured from InferenceSession.cache_bytes() after the prefill "
            f"at {result['kv_length']} tokens)", "",
            "| config | encoder | concept | decoder | total | concept / baseline's | 1/R | total / baseline's "
            "| FLOPs-model total |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["kv_bytes_per_token"]:
        out.append(f"| {r['config']} | {r['encoder']:.0f} | {r['concept']:.0f} | {r['decoder']:.0f} | {r['total']:.0f} "
                   f"| {r['concept_vs_baseline']:.3f} | {1 / r['ratio']:.3f} | {r['total_vs_baseline']:.3f} "
                   f"| {r['predicted_total']:.0f} |")
    out += ["", "## Configs", "", "| config | R | concept top_k | experts | loop | concept dim | total params "
            "| FLOPs/token (attn map excl.) | note |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        out.append(f"| {c['name']} | {c['ratio']:g} | {c['concept_top_k']} | {c['concept_experts']} | {c['loop_layers']} "
                   f"| {c['concept_dim']} | {c['total_params'] / 1e6:.2f}M | {c['flops_per_token'] / 1e6:.2f}M "
                   f"| {c['note']} |")
    t = result["targets"]
    out += ["", "## Targets", ""] + [f"- {k}: {v}" for k, v in t.items()]
    m = result["meta"]
    out += ["", f"Load average before {m['loadavg_before']}, after {m['loadavg_after']}; "
            f"wall time {m['wall_s']:.0f} s; torch {m['torch']}; {m['platform']}."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    names = [c["name"] for c in result["configs"]][1:]
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for ax, phase in zip(axes[:2], ("prefill", "decode")):
        for n in names:
            rows = sorted((r for r in result[phase] if r["config"] == n), key=lambda r: r["length"])
            x = [r["length"] for r in rows]
            style = "-" if n.startswith("same") else "-."
            ax.plot(x, [r["speedup"] for r in rows], style, marker="o", color=colors[n], label=f"{n} measured")
            ax.plot(x, [r["predicted_speedup"] for r in rows], ":", color=colors[n], alpha=0.7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (prefill N)" if phase == "prefill" else "KV length L")
        ax.set_ylabel("speedup over baseline (dotted: FLOPs model)")
        ax.set_title(f"{phase}: measured vs predicted")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    kv = result["kv_bytes_per_token"]
    ax.bar(range(len(kv)), [r["encoder"] + r["decoder"] for r in kv], label="encoder + decoder")
    ax.bar(range(len(kv)), [r["concept"] for r in kv], bottom=[r["encoder"] + r["decoder"] for r in kv],
           label="concept model")
    ax.set_xticks(range(len(kv)), [r["config"].replace(" R=", "\nR=") for r in kv], fontsize=7)
    ax.set_ylabel("KV-cache bytes per token (fp32)")
    ax.set_title("memory")
    ax.legend(fontsize=8)
    fig.suptitle("ConceptMoE latency vs baseline MoE on CPU (boundaries set every R-th token, benchmark only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/latency", help="output folder")
    ap.add_argument("--quick", action="store_true", help="smoke run: lengths 256..1K, few repetitions (<60 s)")
    ap.add_argument("--dim", type=int, default=64, help="model width (heads of 64 dims)")
    ap.add_argument("--lengths", type=str, default=None, help="comma-separated lengths (default 1K..32K)")
    ap.add_argument("--steps", type=int, default=12, help="decode steps per timed repetition (12: whole periods "
                                                          "of the R = 1.5, 2, 4 boundary patterns)")
    ap.add_argument("--configs", type=str, default=None,
                    help="comma-separated config names to run besides the baseline, e.g. 'same-depth R=2' "
                         "(default: all seven)")
    ap.add_argument("--decode-batch", type=int, default=1,
                    help="rows decoded together (copies of the prefilled sequence); times are per step")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_start = time.time()
    lengths = [256, 512, 1024] if args.quick else [1024 * 2 ** i for i in range(6)]
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    # repetitions per length: long prefills are the budget (the 32K baseline alone is ~half a minute)
    def reps(n: int) -> tuple[int, int]:
        if args.quick:
            return 2, 3
        return (5, 5) if n <= 4096 else (3, 5) if n <= 8192 else (2, 5) if n <= 16384 else (1, 5)

    base = baseline_config(args.dim, max(lengths) + 1024)
    entries = bench_configs(base)
    if args.configs:
        wanted = {x.strip() for x in args.configs.split(",")}
        unknown = wanted - {e["name"] for e in entries}
        if unknown:
            raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {[e['name'] for e in entries[1:]]}")
        entries = [e for e in entries if e["kind"] == "baseline" or e["name"] in wanted]
    sessions = {e["name"]: new_session(build_model(e), e) for e in entries}
    load_before = loadavg()
    print(f"{len(entries)} configs, lengths {lengths}; boundaries forced every R-th token (benchmark only)", flush=True)
    warmup(sessions)

    prefill_rows, decode_rows, kv_rows = [], [], []
    base_cfg = entries[0]["config"]
    for n in lengths:
        t0 = time.time()
        pr, dr = reps(n)
        res = run_length(sessions, n, pr, dr, 1 if args.quick else args.steps, args.decode_batch)
        for phase, rows, pred in (("prefill", prefill_rows, predicted_prefill_flops),
                                  ("decode", decode_rows, predicted_decode_flops)):
            base_med = statistics.median(res[phase]["baseline"])
            base_pred = pred(base_cfg, 1.0, n)
            for e in entries:
                times = res[phase][e["name"]]
                med = statistics.median(times)
                speed = base_med / med
                p = base_pred / pred(e["config"], e["ratio"], n)
                rows.append({"config": e["name"], "length": n, "times_s": times, "median_s": med,
                             "speedup": speed, "predicted_speedup": p, "fraction_of_prediction": speed / p,
                             "predicted_flops": pred(e["config"], e["ratio"], n),
                             "concepts": res["concepts"][e["name"]]})
        if n == max(lengths):
            kv_base = res["kv"]["baseline"]
            for e in entries:
                kv = res["kv"][e["name"]]
                kv_rows.append({
                    "config": e["name"], "ratio": e["ratio"], **kv, "total": sum(kv.values()),
                    "concept_vs_baseline": kv["concept"] / kv_base["concept"],
                    "total_vs_baseline": sum(kv.values()) / sum(kv_base.values()),
                    "predicted_total": flops.kv_cache_bytes_per_token(
                        e["config"], e["ratio"] if e["config"].chunk.enabled else None, bytes_per_value=4),
                    "achieved_ratio": n / res["concepts"][e["name"]]})
        line = "  ".join(f"{r['config']}: {r['speedup']:.2f}x/{r['predicted_speedup']:.2f}x"
                         for r in prefill_rows if r["length"] == n and r["config"] != "baseline")
        dline = "  ".join(f"{r['config']}: {r['speedup']:.2f}x/{r['predicted_speedup']:.2f}x"
                          for r in decode_rows if r["length"] == n and r["config"] != "baseline")
        print(f"N={n} ({time.time() - t0:.0f}s)\n  prefill {line}\n  decode  {dline}", flush=True)

    context_rows = context_increments(decode_rows)

    def pick(rows, name, n):
        return next((r for r in rows if r["config"] == name and r["length"] == n), None)

    targets = {}
    n16 = 16384 if 16384 in lengths else max(lengths)
    r2p, r2d = pick(prefill_rows, "same-depth R=2", n16), pick(decode_rows, "same-depth R=2", n16)
    if r2p:  # (not when --configs leaves it out)
        targets[f"prefill speedup at {n16}, same-depth R=2 (target >= {TARGETS['prefill_16k_r2']})"] = \
            round(r2p["speedup"], 3)
        targets[f"decode speedup at KV {n16}, same-depth R=2 (target >= {TARGETS['decode_16k_r2']})"] = \
            round(r2d["speedup"], 3)
    long = [r for r in prefill_rows + decode_rows if r["length"] >= n16 and r["config"] != "baseline"]
    fr = {f"{'prefill' if r in prefill_rows else 'decode'} {r['config']} @{r['length']}": round(r["fraction_of_prediction"], 3)
          for r in long}
    targets[f"measured / predicted at >= {n16} (target >= {TARGETS['fraction_of_prediction_16k_up']})"] = fr
    targets["concept KV bytes / baseline's concept KV bytes (target ~1/R)"] = {
        r["config"]: round(r["concept_vs_baseline"], 3) for r in kv_rows if r["config"] != "baseline"}

    result = {
        "meta": {
            "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "python": sys.version.split()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "quick": args.quick, "loadavg_before": load_before, "loadavg_after": loadavg(),
            "wall_s": time.time() - t_start, "decode_steps_per_rep": 1 if args.quick else args.steps,
            "decode_batch": args.decode_batch,
            "boundaries": "Boundaries are set deterministically for this benchmark (every R-th token by absolute "
                          "position, token 0 always; the chunk module still computes p): a latency benchmark "
                          "must run at the R it reports, which an untrained chunker (R ~ 2 at random places) "
                          "does not give. Medians of interleaved repetitions.",
            "prediction": "FLOPs model (cmoe_vlm.flops): prefill ∝ activated FLOPs·N + causal attention-map FLOPs; "
                          "decode ∝ activated FLOPs/token + one query's attention over L keys (concept layers: "
                          "L/R keys, 1/R of steps); at batch 1, fp32, MHA this is proportional to bytes moved.",
        },
        "configs": [{"name": e["name"], "kind": e["kind"], "ratio": e["ratio"], "note": e["note"],
                     **{k: v for k, v in flops.Proposal("x", e["config"], flops.account(
                         e["config"], e["ratio"] if e["config"].chunk.enabled else None,
                         max(lengths))).summary().items() if k in (
                         "concept_top_k", "concept_experts", "loop_layers", "concept_dim", "total_params",
                         "flops_per_token")},
                     "model_config": dataclasses.asdict(e["config"])} for e in entries],
        "kv_length": max(lengths),
        "prefill": prefill_rows, "decode": decode_rows, "decode_context_added": context_rows,
        "kv_bytes_per_token": kv_rows, "targets": targets,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(result, indent=1))
    (out / "latency.md").write_text(markdown(result))
    plot(result, out / "latency.png")
    print(markdown(result))
    print(f"wrote {out}/latency.json, latency.md, latency.png in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The scale path on CPU (docs/design.md §17): long packed rows, MFU, activation checkpointing, bf16,
compile. Writes OUT/scale.json and OUT/scale.png and prints a table. Sections (`--sections`):

  scale      training step (fwd + bwd + AdamW) of the LM over T = 1K ... 32K tokens in one row, tiny and
             small configs, one document vs 8 packed documents of unequal lengths, ConceptMoE and its
             baseline (the same config without chunking or reallocation): step time, tokens/s, peak RSS,
             MFU. The small config's single-document rows stop at 16K (a 32K step is ~6 min here).
  ac         activation checkpointing off / concept / blocks: peak RSS and step time (tiny, 16K, one doc)
  long       128K tokens, one document, tiny, checkpointing every block: peak RSS (~45 min; not in `all`)
  precision  fp32 vs bf16 autocast: tokens/s and the loss curve, tiny VLM on built-in data (images too)
  compile    eager vs compiled (inductor): compile time, steady step time, graphs built over 200 steps
             whose concept count M changes every step (tiny, 4 rows of 512 packed tokens)
  mfu        the small config at its training shape (8 rows × 1024): MFU in fp32 and bf16, and a
             torch.profiler breakdown of where a step's time goes

Every point runs in its own process (peak RSS is the process's), one after another. MFU divides the
realized FLOPs (cmoe_vlm/training/mfu.py) by the CPU matmul peak measured in the point's own process just
before and after its steps (the run's peaks at its start and end are recorded too): on a machine whose
load changes, the fairest denominator. The machine this was written on is shared: compare ratios
measured side by side in one run; the load average is recorded, and the figure says "preliminary".
Sections run by separate invocations accumulate in OUT/scale.json, with their run records (NAME_runs).

    python bench/bench_scale.py [--out bench/results/scale] [--sections all|scale,ac,...] [--quick]

`--quick` runs a few tiny points of every section but `long` in this process (seconds; memory figures
are then not per point): the test suite's smoke test.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see bench/bench_core.py)

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmoe_base import Batch, DocumentLayout  # noqa: E402
from cmoe_vlm.flops.cli import strip_reallocation  # noqa: E402
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig  # noqa: E402
from cmoe_vlm.objective import Objective  # noqa: E402
from cmoe_vlm.training import mfu, prepare  # noqa: E402
from cmoe_vlm.training.config import TrainConfig, load_experiment  # noqa: E402
from cmoe_vlm.training.optim import build_optimizer  # noqa: E402

SECTIONS = ("scale", "ac", "long", "precision", "compile", "mfu")
DEFAULT = ("scale", "ac", "precision", "compile", "mfu")
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
ONE_STEP_AFTER = 20.0  # seconds: a first step longer than this is the measurement (no repeats)


# ------------------------------------------------------------------------------------------------ helpers
def load() -> float:
    return os.getloadavg()[0]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def model_config(name: str, chunking: bool, max_len: int) -> ModelConfig:
    """configs/{name}.yaml's model; without chunking its baseline (chunking off, no reallocation)."""
    cfg = load_experiment(REPO / "configs" / f"{name}.yaml").model
    cfg = cfg if chunking else strip_reallocation(cfg)
    return dataclasses.replace(cfg, max_seq_len=max(max_len, cfg.max_seq_len))


def packed_lengths(T: int, docs: int, seed: int = 0) -> list[int]:
    """`docs` unequal document lengths filling T (random cut points, each document at least T/(4·docs))."""
    if docs == 1:
        return [T]
    g = torch.Generator().manual_seed(seed)
    floor = max(1, T // (4 * docs))
    extra = torch.rand(docs, generator=g)
    lengths = (floor + (T - docs * floor) * extra / extra.sum()).long().tolist()
    lengths[-1] += T - sum(lengths)
    return lengths


def random_batch(cfg: ModelConfig, rows: int, T: int, docs: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
    layout = DocumentLayout.from_lengths([packed_lengths(T, docs, seed + r) for r in range(rows)], T)
    return Batch(x, torch.zeros_like(x), layout, labels=x.roll(-1, 1))


def train_steps(model: torch.nn.Module, batches, update, bf16: bool, device: torch.device, steps: int,
                min_steps: int = 1, after=lambda i, out: None) -> tuple[list[float], list, list[float]]:
    """Up to `steps` training steps (forward under autocast, backward, `update()`), stopping after
    `min_steps` once a step has taken over ONE_STEP_AFTER seconds; `after(i, out)` runs after each
    step, untimed. Returns (seconds per step, outputs, losses)."""
    times, outs, losses = [], [], []
    objective = Objective(getattr(model, "lm", model).cfg)  # a ConceptMoE, or the VLM around one
    for i in range(steps):
        batch = batches(i)
        t0 = time.perf_counter()
        with prepare.autocast(device, bf16):
            out = model(batch)
            loss = objective(out, batch).total
        loss.backward()
        update()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        outs.append(out)
        after(i, out)
        if i + 1 >= min_steps and times[0] > ONE_STEP_AFTER:
            break
    return times, outs, losses


def adamw(model: torch.nn.Module, lr: float = 1e-4):
    """Our AdamW (param groups) without warm-up, as an update callable for `train_steps`."""
    opt, _ = build_optimizer(model, TrainConfig(lr=lr, warmup_steps=0))

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return update


def steady(times: list[float]) -> float:
    """The median step time after the first (warm-up); the first when it is the only one."""
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


# --------------------------------------------------------------------------------------------- one point
def run_point(p: dict) -> dict:
    """One training measurement in this process. p: config, T, docs, chunking, ac, dtype, steps, min_steps,
    rows. MFU is over the matmul peak measured in this process right before and after the steps (on a
    shared machine, the fairest denominator for this point)."""
    torch.manual_seed(0)
    cfg = model_config(p["config"], p["chunking"], p["T"])
    model = ConceptMoE(cfg).train()
    prepare.apply_activation_checkpointing(model, p.get("ac", "off"))
    rows = p.get("rows", 1)
    batch = random_batch(cfg, rows, p["T"], p["docs"])
    bf16 = p.get("dtype", "fp32") == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak_before = mfu.measure_matmul_peak(dtype).flops
    rss_before = rss_gib()
    times, outs, _ = train_steps(model, lambda i: batch, adamw(model), bf16, torch.device("cpu"), p.get("steps", 3),
                                 p.get("min_steps", 1))
    step_s = steady(times)
    flops = mfu.step_flops(model, batch, outs[-1])
    tokens = batch.num_tokens()
    concepts = sum(map(sum, outs[-1].concept_lengths)) if outs[-1].concept_lengths else tokens
    peak = (peak_before + mfu.measure_matmul_peak(dtype).flops) / 2
    return {**p, "steps_run": len(times), "step_s": step_s, "peak_gflops": peak / 1e9,
            "first_step_s": times[0], "tokens_per_s": rows * p["T"] / step_s, "ratio": tokens / concepts,
            "flops_per_token": flops / tokens, "tflops": flops / step_s / 1e12, "mfu": flops / step_s / peak,
            "peak_rss_gib": peak_rss_gib(), "rss_before_step_gib": rss_before, "load": load()}


def run_points(points: list[dict], in_process: bool) -> list[dict]:
    results = []
    for p in points:
        t0 = time.perf_counter()
        if in_process:
            r = run_point(p)
        else:
            proc = subprocess.run([sys.executable, __file__, "--point", json.dumps(p)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                r = {**p, "error": proc.stderr.strip().splitlines()[-1:]}
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t0
        print(row(r), flush=True)
        results.append(r)
    return results


def row(r: dict) -> str:
    what = (f"{r.get('config', ''):5s} T={r.get('T', 0):6d} docs={r.get('docs', 0)} "
            f"{'cmoe' if r.get('chunking', True) else 'base'} ac={r.get('ac', 'off'):7s} {r.get('dtype', 'fp32')}")
    if "error" in r:
        return f"{what}  ERROR {r['error']}"
    return (f"{what}  step {r['step_s']:8.2f}s  {r['tokens_per_s']:8.0f} tok/s  peak RSS {r['peak_rss_gib']:5.2f} GiB  "
            f"MFU {r['mfu']:6.1%}  R {r['ratio']:.2f}  load {r['load']:.1f}")


# -------------------------------------------------------------------------------------------- sections
def section_scale(quick: bool, configs: tuple[str, ...] = ("tiny", "small"),
                  lengths: tuple[int, ...] = LENGTHS) -> list[dict]:
    if quick:
        grid = [("tiny", 256, docs, chunk) for docs in (1, 8) for chunk in (True, False)]
    else:
        grid = [(name, T, docs, chunk) for name in configs for T in lengths for docs in (1, 8)
                for chunk in (True, False) if not (name == "small" and docs == 1 and T > 16384)]
    points = [dict(config=n, T=T, docs=d, chunking=c, ac="off", dtype="fp32", steps=2 if quick else 3) for n, T, d, c in grid]
    return run_points(points, in_process=quick)


def section_ac(quick: bool) -> list[dict]:
    T = 256 if quick else 16384
    points = [dict(config="tiny", T=T, docs=1, chunking=True, ac=mode, dtype="fp32", steps=2)
              for mode in ("off", "concept", "blocks")]
    return run_points(points, in_process=quick)


def section_long(quick: bool) -> list[dict]:
    point = dict(config="tiny", T=131072, docs=1, chunking=True, ac="blocks", dtype="fp32", steps=1)
    return run_points([point], in_process=False)


def precision_run(dtype: str, steps: int, rows: int, seq_len: int, data_dir: str) -> dict:
    """The tiny VLM on built-in data (as tests/training/test_golden_loss.py, with autocast): losses, tokens/s."""
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from data_pipelines.loader import StreamingLoader
    from vision import build_image_transform

    exp = load_experiment(REPO / "configs" / "tiny.yaml", [
        f"data.batch_size={rows}", f"data.seq_len={seq_len}", "data.num_workers=0", "data.shuffle_buffer=0",
        "train.tensorboard=false", "train.heldout_shards=null", f"data.shards={data_dir}"])
    torch.manual_seed(exp.train.seed)
    model = ConceptMoEVLM(exp.vlm).train()
    opt, sched = build_optimizer(model, exp.train)
    loader = StreamingLoader(exp.data, image_transform=build_image_transform(model.vision, train=True))
    epochs = (batch for _ in range(steps) for batch in loader)  # as many epochs as it takes
    batches = [next(epochs) for _ in range(steps)]

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), exp.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    times, _, losses = train_steps(model, batches.__getitem__, update, dtype == "bf16", torch.device("cpu"), steps,
                                   min_steps=steps)
    tokens = sum(b.num_tokens() for b in batches[1:])
    return {"dtype": dtype, "steps": steps, "rows": rows, "seq_len": seq_len, "losses": losses,
            "tokens_per_s": tokens / max(sum(times[1:]), 1e-9), "step_s": steady(times),
            "mean_loss_last_10": statistics.mean(losses[-10:]), "load": load()}


def section_precision(quick: bool) -> dict:
    from data_pipelines.builtin import write_builtin_dataset

    steps, rows, seq_len = (2, 2, 128) if quick else (100, 4, 512)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_builtin_dataset(tmp, num_train=8 if quick else 400, num_heldout=1, maxcount=1000, text_chars=600)
        out = {}
        for dtype in ("fp32", "bf16"):
            if quick:
                out[dtype] = precision_run(dtype, steps, rows, seq_len, str(data["train"]))
            else:
                args = json.dumps({"dtype": dtype, "steps": steps, "rows": rows, "seq_len": seq_len,
                                   "data_dir": str(data["train"])})
                proc = subprocess.run([sys.executable, __file__, "--precision", args], capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})
                out[dtype] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                              else {"error": proc.stderr.strip().splitlines()[-1:]})
            r = out[dtype]
            if "error" not in r:
                print(f"precision {dtype}: {r['tokens_per_s']:.0f} tok/s, loss {r['losses'][0]:.3f} -> "
                      f"{r['mean_loss_last_10']:.3f} (mean of the last 10), load {r['load']:.1f}", flush=True)
    if "error" not in out["fp32"] and "error" not in out["bf16"]:
        out["bf16_speedup"] = out["bf16"]["tokens_per_s"] / out["fp32"]["tokens_per_s"]
        out["max_loss_gap"] = max(abs(a - b) / abs(b) for a, b in zip(out["bf16"]["losses"], out["fp32"]["losses"]))
    return out


def compile_run(compiled: bool, steps: int, backend: str, rows: int = 4, T: int = 512) -> dict:
    """Tiny LM, packed rows whose documents change every step (so does M)."""
    torch.manual_seed(0)
    cfg = model_config("tiny", True, T)
    model = ConceptMoE(cfg).train()
    if compiled:
        prepare.apply_compile(model, backend=backend)
    graphs, concepts = {}, []

    def after(i: int, out) -> None:
        concepts.append(sum(map(sum, out.concept_lengths)))
        if compiled and i + 1 in (1, 2, 5, 20, 50, 100, 200, steps):
            graphs[i + 1] = prepare.compiled_graphs()

    times, _, losses = train_steps(model, lambda i: random_batch(cfg, rows, T, docs=1 + i % 5, seed=i),
                                   adamw(model, 1e-3), False, torch.device("cpu"), steps, min_steps=steps, after=after)
    later = times[5:] or times[-1:]
    return {"compiled": compiled, "backend": backend if compiled else None, "steps": steps,
            "first_step_s": times[0], "second_step_s": times[1] if steps > 1 else None,
            "steady_step_s": statistics.median(later), "graphs": graphs, "distinct_M": len(set(concepts)),
            "losses": losses, "load": load()}


def section_compile(quick: bool) -> dict:
    runs = {}
    for compiled, steps in ((False, 2 if quick else 40), (True, 2 if quick else 200)):
        if quick:
            runs["compiled" if compiled else "eager"] = compile_run(compiled, steps, "eager", rows=2, T=128)
            continue
        args = json.dumps({"compiled": compiled, "steps": steps, "backend": "inductor"})
        proc = subprocess.run([sys.executable, __file__, "--compile-run", args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        runs["compiled" if compiled else "eager"] = (json.loads(proc.stdout.strip().splitlines()[-1])
                                                     if proc.returncode == 0 else
                                                     {"error": proc.stderr.strip().splitlines()[-1:]})
    e, c = runs["eager"], runs["compiled"]
    if "error" not in e and "error" not in c:
        n = min(len(e["losses"]), len(c["losses"]))
        runs["speedup"] = e["steady_step_s"] / c["steady_step_s"]
        runs["compile_s"] = c["first_step_s"] + (c["second_step_s"] or 0) - 2 * c["steady_step_s"]
        runs["max_loss_gap"] = max(abs(a - b) / abs(b) for a, b in zip(c["losses"][:n], e["losses"][:n]))
        print(f"compile: eager {e['steady_step_s']:.3f}s, compiled {c['steady_step_s']:.3f}s per step "
              f"({runs['speedup']:.2f}x), compile time ~{runs['compile_s']:.0f}s, graphs {c['graphs']}, "
              f"{c['distinct_M']} distinct M, loss gap {runs['max_loss_gap']:.1e}", flush=True)
    return runs


def profile_point(p: dict) -> dict:
    """One step of `p` under torch.profiler: self CPU time by category and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cfg = model_config(p["config"], True, p["T"])
    model = ConceptMoE(cfg).train()
    update = adamw(model)
    batch = random_batch(cfg, p["rows"], p["T"], p["docs"])
    bf16 = p["dtype"] == "bf16"
    train_steps(model, lambda i: batch, update, bf16, torch.device("cpu"), 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_steps(model, lambda i: batch, update, bf16, torch.device("cpu"), 1)
    ops = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    total = sum(t for _, t in ops)

    def category(name: str) -> str:
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm"):
            return "matmul"
        if "scaled_dot_product" in name or "flash_attention" in name:
            return "attention"
        if name in ("aten::copy_", "aten::cat", "aten::index_select", "aten::index", "aten::index_add_",
                    "aten::_index_put_impl_", "aten::scatter_add_", "aten::gather", "aten::fill_", "aten::zero_",
                    "aten::_to_copy", "aten::clone", "aten::split", "aten::empty", "aten::empty_strided"):
            return "data movement"
        return "elementwise and other"

    cats: dict[str, float] = {}
    for name, t in ops:
        cats[category(name)] = cats.get(category(name), 0.0) + t
    top = sorted(ops, key=lambda x: -x[1])[:12]
    return {"total_s": total, "share": {k: v / total for k, v in sorted(cats.items(), key=lambda x: -x[1])},
            "top_ops": [{"op": k, "s": t, "share": t / total} for k, t in top]}


def section_mfu(quick: bool) -> dict:
    shape = dict(config="tiny", T=128, rows=2) if quick else dict(config="small", T=1024, rows=8)
    out = {}
    for dtype in ("fp32", "bf16"):
        p = dict(**shape, docs=1, chunking=True, ac="off", dtype=dtype, steps=2 if quick else 4, min_steps=2 if quick else 3)
        out[dtype] = run_points([p], in_process=quick)[0]
        if quick:
            out[dtype]["profile"] = profile_point(p)
        else:
            proc = subprocess.run([sys.executable, __file__, "--profile", json.dumps(p)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            out[dtype]["profile"] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                                     else {"error": proc.stderr.strip().splitlines()[-1:]})
        prof = out[dtype]["profile"]
        if "share" in prof:
            print(f"  {dtype} time by kind: " + ", ".join(f"{k} {v:.0%}" for k, v in prof["share"].items()), flush=True)
    return out


# --------------------------------------------------------------------------------------------- outputs
def targets(res: dict) -> dict:
    """The issue's CPU targets, from this run's figures."""
    out = {}
    pts = {(r["config"], r["T"], r["docs"], r["chunking"], r.get("ac", "off")): r
           for r in res.get("scale", []) if "error" not in r}
    one, packed = pts.get(("tiny", 32768, 1, True, "off")), pts.get(("tiny", 32768, 8, True, "off"))
    if one and packed:
        out["packed_32k_memory_ratio"] = {"value": packed["peak_rss_gib"] / one["peak_rss_gib"], "target": "<= 1.5"}
        out["packed_32k_time_ratio"] = {"value": packed["step_s"] / one["step_s"], "target": "<= 1.3"}
    for r in res.get("long", []):
        if "error" not in r:
            out["long_128k_peak_rss_gib"] = {"value": r["peak_rss_gib"], "target": "fits in 24 GiB"}
    m = res.get("mfu", {}).get("fp32")
    if m and "error" not in m:
        out["mfu_small_fp32"] = {"value": m["mfu"], "target": ">= 0.30"}
    if "speedup" in res.get("compile", {}):
        out["compiled_over_eager_cpu"] = {"value": res["compile"]["speedup"], "target": "reported"}
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in res.get("scale", []) if "error" not in r]
    prec = {d: res.get("precision", {}).get(d, {}) for d in ("fp32", "bf16")}
    curves = all("losses" in r for r in prec.values())
    fig, axes = plt.subplots(1, 4 if curves else 3, figsize=(21 if curves else 16, 4.6))
    for (name, docs, chunk) in sorted({(r["config"], r["docs"], r["chunking"]) for r in pts}):
        sel = sorted((r for r in pts if (r["config"], r["docs"], r["chunking"]) == (name, docs, chunk)),
                     key=lambda r: r["T"])
        label = f"{name} {'ConceptMoE' if chunk else 'baseline'}, {docs} doc{'s' if docs > 1 else ''}"
        style = dict(marker="o" if chunk else "s", linestyle="-" if docs > 1 else "--",
                     color={"tiny": "tab:blue", "small": "tab:red"}.get(name, "k"), alpha=1.0 if chunk else 0.55)
        Ts = [r["T"] for r in sel]
        axes[0].plot(Ts, [r["step_s"] for r in sel], label=label, **style)
        axes[1].plot(Ts, [r["peak_rss_gib"] for r in sel], label=label, **style)
        # MFU only over a peak measured in the point's own process (bench/results/scale has two 32K points from
        # before that: their denominator was the run's start peak, measured at a moment of heavy load)
        own = [r for r in sel if r.get("peak_measured_here", True)]
        axes[2].plot([r["T"] for r in own], [100 * r["mfu"] for r in own], label=label, **style)
    for ax, title in zip(axes, ("training step (s)", "peak RSS (GiB)", "MFU (% of measured fp32 matmul peak)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in the row (T)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    if curves:  # the precision section: the tiny VLM's loss curve, fp32 vs bf16 autocast
        for d, r in prec.items():
            axes[3].plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{d}: {r['tokens_per_s']:.0f} tok/s")
        axes[3].set_xlabel("step")
        axes[3].set_title("tiny VLM training loss, fp32 vs bf16 autocast")
        axes[3].grid(alpha=0.3)
        axes[3].legend(fontsize=7)
    fig.suptitle(f"PRELIMINARY: shared {os.cpu_count()}-core CPU under load (each point's load in scale.json); "
                 f"scale section from {res['scale_runs'][0]['uptime_start']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale"))
    ap.add_argument("--sections", default="all", help=f"comma-separated of {', '.join(SECTIONS)}; all = "
                                                      f"{','.join(DEFAULT)}")
    ap.add_argument("--quick", action="store_true", help="a few tiny points in this process (smoke test)")
    ap.add_argument("--configs", default="tiny,small", help="the scale section's configs")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="the scale section's row lengths T")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--compile-run", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag, fn in ((args.point, run_point), (args.precision, lambda a: precision_run(**a)),
                     (args.compile_run, lambda a: compile_run(**a)), (args.profile, profile_point)):
        if flag:  # a child process: one measurement, its JSON on the last line
            print(json.dumps(fn(json.loads(flag))))
            return {}
    sections = DEFAULT if args.sections == "all" else tuple(args.sections.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.quick and "long" in sections:
        ap.error("--quick does not run the long section")
    out = Path(args.out)
    # sections run by separate invocations accumulate in one scale.json (each with its own run record)
    res = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() and not args.quick else {}
    res.update({"machine": {"cpu": mfu.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "python": platform.python_version()}, "preliminary": True, "quick": args.quick})
    run = {"sections": list(sections), "uptime_start": uptime()}
    peaks = {"fp32": mfu.measure_matmul_peak(torch.float32).flops, "bf16": mfu.measure_matmul_peak(torch.bfloat16).flops}
    run["peak_flops_start"] = peaks
    print(f"{run['uptime_start']}\nmatmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    t0 = time.perf_counter()
    scale_grid = dict(configs=tuple(args.configs.split(",")), lengths=tuple(int(t) for t in args.lengths.split(",")))
    for name in sections:
        print(f"== {name}", flush=True)
        got = globals()[f"section_{name}"](args.quick, **(scale_grid if name == "scale" else {}))
        if isinstance(got, list):  # points: an earlier run's points at other settings are kept
            key = lambda r: (r["config"], r["T"], r["docs"], r["chunking"], r["ac"], r["dtype"])  # noqa: E731
            got = [r for r in res.get(name, []) if key(r) not in {key(g) for g in got}] + got
            got.sort(key=lambda r: (r["config"], r["T"]))
        res[name] = got
        res[name + "_runs"] = [*res.get(name + "_runs", []), run] if isinstance(got, list) else [run]
    run["peak_flops_end"] = {"fp32": mfu.measure_matmul_peak(torch.float32).flops,
                             "bf16": mfu.measure_matmul_peak(torch.bfloat16).flops}
    run["uptime_end"], run["wall_s"] = uptime(), time.perf_counter() - t0
    res["targets"] = targets(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(res, indent=1))
    if res.get("scale"):
        plot(res, out / "scale.png")  # from every section in scale.json, this run's and earlier ones
    print(f"targets: {json.dumps(res['targets'])}\n{run['uptime_end']}; {run['wall_s']:.0f}s; wrote {out}/scale.json")
    return res


if __name__ == "__main__":
    main()

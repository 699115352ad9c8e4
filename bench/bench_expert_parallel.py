"""Expert parallelism on 2 CPU processes (gloo): DeepSpeed's GShard layer against our dropless route.

    python bench/bench_expert_parallel.py --out bench/results/expert_parallel.json [--tokens 3072,5120]

One MoE layer (d 256, 8 experts of hidden 512, top-2; `--dim`, `--experts`, ...), ep_size 2, each rank
holding a different number of tokens (as after chunking). Both dispatches of
`cmoe_vlm.training.expert_parallel.DeepSpeedMoE` start from the same weights:

- capacity: `deepspeed.moe.layer.MoE` with drop_tokens=False: every expert's slot count C is the
  largest per-expert count in the group, the dispatch is a one-hot (S, E, C) einsum and the exchange
  E·C rows per rank; nothing is dropped but the padding is computed, sent and multiplied;
- dropless (what `train.ep_size > 1` uses): exact-split all-to-all of the N·k assignment rows, the
  local experts as one grouped SwiGLU.

Timing: one 2-process launch, fwd+bwd steps of the two alternating (`--reps` each, after a warm-up),
medians; tokens/s counts both ranks' tokens over rank 0's step time. Memory: one launch per dispatch
(ru_maxrss peaks cannot be told apart inside one process): the peak RSS over the steps minus the RSS
before the first step, per rank. Medians and bests (a shared machine's timings are noisy). Also
written: outputs of the two agree (max |diff|), dropped tokens, capacity C, the padded rows' share, and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cmoe_base  # noqa: F401  (before torch)
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmoe_vlm.model.layers.moe import MoE, MoEConfig  # noqa: E402
from cmoe_vlm.training.engine import setup_distributed, shutdown_distributed  # noqa: E402
from cmoe_vlm.training.expert_parallel import DeepSpeedMoE  # noqa: E402

DISPATCHES = ("capacity", "dropless")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def capacity_stats(counts_E: torch.Tensor, group) -> dict[str, int]:
    """What the GShard layer does with these per-expert counts (E,): C = the largest count in the group;
    it sends and computes E·C rows per rank for the N·k real ones, and drops what exceeds C (nothing)."""
    cap = counts_E.max().clone()
    dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=group)
    return {"capacity": int(cap), "rows": counts_E.numel() * int(cap), "real_rows": int(counts_E.sum()),
            "dropped": int((counts_E - cap).clamp_min(0).sum())}


def worker(args: argparse.Namespace) -> None:
    rank, _ = setup_distributed()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_hidden=args.hidden)
    layers = {d: DeepSpeedMoE(MoE(args.dim, cfg), ep_size=2, dispatch=d) for d in args.dispatch.split(",")}
    for layer in layers.values():
        layer.layer.set_deepspeed_parallelism()
        torch.manual_seed(0)
        layer.load_plain(MoE(args.dim, cfg))  # same weights for both
    n = [int(t) for t in args.tokens.split(",")][rank]
    x = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(rank))
    group = next(iter(layers.values())).layer.deepspeed_moe.ep_group

    def step(layer: DeepSpeedMoE) -> tuple[float, torch.Tensor, torch.Tensor]:
        xg = x.clone().requires_grad_()
        dist.barrier()
        t0 = time.perf_counter()
        out, stats = layer(xg)
        out.square().mean().backward()
        dist.barrier()
        layer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, out.detach(), stats.tokens_per_expert

    result: dict = {"rank": rank, "tokens": n, "threads": args.threads}
    rss0 = rss_mib()
    outs = {d: step(layer)[1] for d, layer in layers.items()}  # warm-up
    if len(outs) == 2:
        result["max_abs_diff"] = (outs["capacity"] - outs["dropless"]).abs().max().item()
    times: dict[str, list[float]] = {d: [] for d in layers}
    for _ in range(args.reps):
        for d, layer in layers.items():
            t, _, counts = step(layer)
            times[d].append(t)
    result["step_s"] = {d: statistics.median(ts) for d, ts in times.items()}
    result["best_step_s"] = {d: min(ts) for d, ts in times.items()}
    result["step_s_all"] = times
    result["peak_rss_over_start_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    result["capacity"] = capacity_stats(counts.long(), group)
    (Path(args.worker_out) / f"{args.dispatch}.rank{rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


def launch(args: argparse.Namespace, dispatch: str, reps: int, tmp: Path, port: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, __file__, "--worker-out", str(tmp), "--dispatch", dispatch, "--reps", str(reps),
           *(f"--{k}={getattr(args, k)}" for k in ("tokens", "dim", "hidden", "experts", "top_k", "threads"))]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        log = p.communicate(timeout=1800)[0]
        if p.returncode:
            raise SystemExit(f"{dispatch} run failed:\n{log[-3000:]}")
    return [json.loads((tmp / f"{dispatch}.rank{r}.json").read_text()) for r in (0, 1)]


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (2 ranks)"),
                           (axes[1], "peak_rss_over_start_mib", "peak RSS over start, MiB (rank 0)")):
        ax.bar(DISPATCHES, [summary[d][key] for d in DISPATCHES], color=["tab:gray", "tab:blue"])
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"MoE layer fwd+bwd, ep_size 2, gloo; load {summary['load'][0]:.1f}-{summary['load'][1]:.1f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/expert_parallel.json")
    parser.add_argument("--tokens", default="3072,5120", help="tokens on rank 0,1 (uneven, as after chunking)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (2 ranks on 2 cores)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--dispatch", default=",".join(DISPATCHES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)

    import tempfile
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        timed = launch(args, ",".join(DISPATCHES), args.reps, Path(tmp), 29661)
        memory = {d: launch(args, d, 2, Path(tmp), 29662 + i) for i, d in enumerate(DISPATCHES)}
    load.append(os.getloadavg()[0])
    global_tokens = sum(int(t) for t in args.tokens.split(","))
    summary: dict = {"machine": "shared 2-core AMD EPYC, no GPU, gloo", "load": load, "args": {k: str(v) for k, v in vars(args).items()},
                     "max_abs_diff": max(r["max_abs_diff"] for r in timed)}
    for d in DISPATCHES:
        step = timed[0]["step_s"][d]
        caps = [r["capacity"] for r in timed]
        best = timed[0]["best_step_s"][d]
        summary[d] = {"step_s": step, "best_step_s": best, "tokens_per_s": global_tokens / step,
                      "best_tokens_per_s": global_tokens / best,
                      "peak_rss_over_start_mib": memory[d][0]["peak_rss_over_start_mib"],
                      "peak_rss_over_start_mib_rank1": memory[d][1]["peak_rss_over_start_mib"],
                      "dropped_tokens": 0 if d == "dropless" else sum(c["dropped"] for c in caps),
                      "rows_computed": (sum(c["real_rows"] for c in caps) if d == "dropless"
                                        else sum(c["rows"] for c in caps)),
                      "real_rows": sum(c["real_rows"] for c in caps)}
        summary[d]["padding_share"] = 1 - summary[d]["real_rows"] / summary[d]["rows_computed"]
    summary["capacity_slots_C"] = timed[0]["capacity"]["capacity"]
    summary["dropless_speedup"] = summary["capacity"]["step_s"] / summary["dropless"]["step_s"]
    summary["dropless_speedup_best"] = summary["capacity"]["best_step_s"] / summary["dropless"]["best_step_s"]
    summary["ranks"] = timed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    plot(summary, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "ranks"}, indent=1))


if __name__ == "__main__":
    main()

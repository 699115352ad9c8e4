"""GPU check of the scale path (docs/design.md §17): one table of tokens/s, MFU, memory, compiled vs eager.

    python scripts/gpu_check.py [--out gpu_check.json] [--budget-s 420]    # on a CUDA machine
    python scripts/gpu_check.py --device cpu --quick                      # the CPU smoke test of the same code

Runs without DeepSpeed and without webdataset (the lent GPU machines have neither, and no network):
the model, our AdamW and schedule (as tests/training/test_golden_loss.py), data built in memory.

  env         torch, GPU, bf16, FlexAttention, grouped_mm
  attention   packed document-causal attention (FlexAttention block mask on CUDA, the bucket kernel on
              CPU) against the dense-mask reference: forward and gradients, and fwd+bwd time of each
  train       bf16 training steps (autocast, fp32 master weights) of the small config and of a wider
              variant, packed rows: eager, then compiled; tokens/s, MFU (GPU peak table), peak memory,
              compile time, graphs built
  generate    cached generation (concept cache) == uncached, greedy; decode tokens/s
  ep          2-process NCCL expert parallelism (DeepSpeed MoE, ep_size 2), only with 2+ GPUs and
              DeepSpeed installed; otherwise listed as skipped with the reason

Sized for under 8 minutes on one H100/H200-class GPU; `--budget-s` skips what would start after it.
Each part catches its own failure and reports it in the table, so one broken part costs no figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cmoe_base import Batch, DocumentLayout  # noqa: E402
from cmoe_vlm.flops.cli import load_model_config, strip_reallocation  # noqa: E402
from cmoe_vlm.model.layers.document_attention import AttentionLayout  # noqa: E402
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig  # noqa: E402
from cmoe_vlm.objective import Objective  # noqa: E402
from cmoe_vlm.training import mfu, prepare  # noqa: E402
from cmoe_vlm.training.optim import build_optimizer  # noqa: E402


@dataclasses.dataclass
class OptimConfig:
    """The fields of TrainConfig that build_optimizer reads (TrainConfig's module needs the data pipeline)."""
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 0
    steps: int = 1000
    min_lr_ratio: float = 0.1
    ep_size: int = 1
    lr_scale: dict[str, float] = dataclasses.field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def packed_batch(cfg: ModelConfig, rows: int, T: int, docs: int, device: torch.device, seed: int) -> Batch:
    """Random tokens in `rows` rows of T, each `docs` documents of unequal lengths (varying with seed)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(rows):
        cuts = sorted(torch.randint(1, T, (docs - 1,), generator=g).unique().tolist())
        lengths.append([b - a for a, b in zip([0, *cuts], [*cuts, T])])
    x = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
    return Batch(x, torch.zeros_like(x), DocumentLayout.from_lengths(lengths, T), labels=x.roll(-1, 1)).to(device)


# ----------------------------------------------------------------------------------------------- parts
def part_env(device: torch.device, args) -> dict:
    from torch.nn.attention import flex_attention  # noqa: F401  (raises if missing)
    out = {"torch": torch.__version__, "device": str(device), "grouped_mm": hasattr(torch, "_grouped_mm"),
           "flex_attention": True, "python": sys.version.split()[0]}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                   bf16=torch.cuda.is_bf16_supported(), capability=".".join(map(str, torch.cuda.get_device_capability())))
    return out


def dense_reference(doc_ids, q, k, v, gqa: bool):
    L = doc_ids.shape[1]
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)


def part_attention(device: torch.device, args) -> dict:
    """The packed kernel against the dense mask (errors), then fwd+bwd time of each at a longer row."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    for T, docs, timed in ((300, 5, False), (512 if args.quick else 16384, 8, True)):
        layout = DocumentLayout.from_lengths([[T // docs] * (docs - 1) + [T - (docs - 1) * (T // docs)]], T).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 8, T, 64, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        packed = AttentionLayout.of(layout)
        arms = {packed.kernel: lambda: packed.attend(q, k, v, False),
                "dense": lambda: dense_reference(layout.doc_ids, q, k, v, False)}
        if not timed:
            y, ref = arms[packed.kernel](), arms["dense"]()
            grads = torch.autograd.grad(y.float().square().sum(), (q, k, v))
            ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
            out["kernel"] = packed.kernel
            out["max_abs_err_out"] = float((y.float() - ref.float()).abs().max().detach())
            out["max_rel_err_grad"] = max(float((a - b).float().norm() / b.float().norm()) for a, b in zip(grads, ref_grads))
            continue
        for name, fn in arms.items():
            for rep in range(3):
                sync(device)
                t0 = time.perf_counter()
                fn().float().sum().backward()
                sync(device)
                if rep:
                    out[f"{name}_fwd_bwd_ms_T{T}"] = min(out.get(f"{name}_fwd_bwd_ms_T{T}", 1e18),
                                                         1e3 * (time.perf_counter() - t0))
    return out


def part_train(device: torch.device, args) -> list[dict]:
    """bf16 steps of the small config and a wider variant: eager then compiled (fresh model, same data).
    --quick: the tiny config only."""
    small = load_model_config(REPO / "configs" / ("tiny.yaml" if args.quick else "small.yaml"))
    variants = {"tiny" if args.quick else "small": small}
    if not args.quick:
        variants["small-wide"] = dataclasses.replace(
            small, dim=1024, num_heads=16, moe=dataclasses.replace(small.moe, expert_hidden=2048),
            concept_moe=dataclasses.replace(small.concept_moe, expert_hidden=2048))
    rows, T = (2, 128) if args.quick else (8, 4096)
    steps = 2 if args.quick else 12
    bf16 = device.type == "cuda" or args.bf16
    peak, source = mfu.peak_flops(device, bf16, args.peak_tflops)
    results = []
    for name, base in variants.items():
        for chunking in (True,) if args.quick else (True, False):
            cfg = dataclasses.replace(base if chunking else strip_reallocation(base), max_seq_len=max(T, base.max_seq_len))
            for compiled in (False, True):
                if time.perf_counter() - START > args.budget_s:
                    results.append({"variant": name, "chunking": chunking, "compiled": compiled, "skipped": "budget"})
                    continue
                results.append(train_run(name, cfg, chunking, compiled, rows, T, steps, bf16, device, peak, source, args))
                print(json.dumps(results[-1]), flush=True)
    return results


def train_run(name, cfg, chunking, compiled, rows, T, steps, bf16, device, peak, source, args) -> dict:
    torch._dynamo.reset()
    reset_memory(device)
    torch.manual_seed(0)
    model = ConceptMoE(cfg).to(device).train()
    if compiled:
        prepare.apply_compile(model, backend=args.backend)
    opt, sched = build_optimizer(model, OptimConfig())
    batches = [packed_batch(cfg, rows, T, 8, device, seed=i) for i in range(steps)]
    times, flops, losses = [], [], []
    for i, batch in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        with prepare.autocast(device, bf16):
            out = model(batch)
            loss = Objective(cfg)(out, batch).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync(device)
        times.append(time.perf_counter() - t0)
        flops.append(mfu.step_flops(model, batch, out))
    warm = 3 if steps > 4 else 1
    seconds, work = sum(times[warm:]), sum(flops[warm:])
    tokens = sum(b.num_tokens() for b in batches[warm:])
    return {"variant": name, "chunking": chunking, "compiled": compiled, "rows": rows, "T": T, "bf16": bf16,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "step_ms": 1e3 * seconds / (steps - warm),
            "tokens_per_s": tokens / seconds, "tflops": work / seconds / 1e12, "mfu": work / seconds / peak if peak else None,
            "peak_source": source, "max_memory_gib": max_memory_gib(device), "warmup_s": sum(times[:warm]),
            "graphs": prepare.compiled_graphs() if compiled else 0, "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(map(lambda v: v == v, losses))}


def part_generate(device: torch.device, args) -> dict:
    from cmoe_vlm.inference.generation import generate

    cfg = load_model_config(REPO / "configs" / ("tiny.yaml" if args.quick else "small.yaml"))
    torch.manual_seed(0)
    model = ConceptMoE(cfg).to(device).eval()
    prompt_len, new = (32, 4) if args.quick else (1024, 64)
    prompts = Batch.of(torch.randint(0, cfg.vocab_size, (4, prompt_len))).to(device)
    check = 4 if args.quick else 8
    cached = generate(model, prompts, check)
    uncached = generate(model, prompts, check, use_cache=False)
    sync(device)
    t0 = time.perf_counter()
    generate(model, prompts, new)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"cached_equals_uncached": cached == uncached, "prompt": prompt_len, "new_tokens": new, "rows": 4,
            "prefill_plus_decode_s": seconds, "decode_tokens_per_s": 4 * new / seconds}


def part_ep(device: torch.device, args) -> dict:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 GPUs"}
    try:
        import deepspeed  # noqa: F401
        import webdataset  # noqa: F401  (the training engine's config module imports the data pipeline)
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed (expert parallelism runs through DeepSpeed MoE and "
                           f"the training engine; carry the wheels, see scripts/gpu_check.sh)"}
    runner = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    cmd = [*runner.split(), "--nproc_per_node", "2", str(Path(__file__)), "--ep-worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-3:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ep_worker() -> None:
    """One rank of the 2-process expert-parallel run: the small LM with DeepSpeed MoE (ep_size 2) through
    our DeepSpeed engine, bf16 autocast, 6 steps on in-memory data."""
    from cmoe_vlm.training.config import TrainConfig
    from cmoe_vlm.training.engine import build_engine, setup_distributed, shutdown_distributed
    from cmoe_vlm.training.expert_parallel import swap_in_deepspeed_moe

    rank, world = setup_distributed()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    cfg = load_model_config(REPO / "configs" / "small.yaml")
    torch.manual_seed(0)
    model = ConceptMoE(cfg)
    swap_in_deepspeed_moe(model, 2)
    engine, _, _ = build_engine(model.to(device), TrainConfig(ep_size=2, zero_stage=2, lr=3e-4, warmup_steps=0), 4)
    times = []
    for i in range(6):
        batch = packed_batch(cfg, 4, 1024, 4, device, seed=10 * i + rank)  # ranks feed different data
        sync(device)
        t0 = time.perf_counter()
        with prepare.autocast(device, True):
            loss = Objective(cfg)(engine(batch), batch).total
        engine.backward(loss)
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"ranks": world, "step_ms": 1e3 * sum(times[2:]) / 4, "tokens_per_s": world * 4 * 1024 * 4 / sum(times[2:]),
                          "loss_last": float(loss)}))
    shutdown_distributed()


# ----------------------------------------------------------------------------------------------- table
def table(res: dict) -> str:
    lines = [f"GPU check  {res['env'].get('gpu', res['env'].get('device'))}  torch {res['env'].get('torch')}  "
             f"({res['wall_s']:.0f}s)"]
    att = res.get("attention", {})
    if "error" in att:
        lines.append(f"attention   ERROR {att['error']}")
    elif att:
        timing = ", ".join(f"{k} {v:.1f}" for k, v in att.items() if "_ms_T" in k)
        lines.append(f"attention   {att['kernel']}: max |err| {att['max_abs_err_out']:.1e} out, "
                     f"{att['max_rel_err_grad']:.1e} grad (vs dense); fwd+bwd ms: {timing}")
    lines.append(f"{'train':10s} {'variant':11s} {'arch':5s} {'mode':8s} {'step ms':>9s} {'tok/s':>10s} "
                 f"{'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s} {'warm-up s':>9s} {'graphs':>6s}")
    train = res.get("train", [])
    if isinstance(train, dict):  # the part failed as a whole
        lines.append(f"{'':10s} ERROR {train.get('error')}")
        train = []
    for r in train:
        head = f"{'':10s} {r.get('variant', ''):11s} {'cmoe' if r.get('chunking') else 'base':5s} " \
               f"{'compiled' if r.get('compiled') else 'eager':8s}"
        if "skipped" in r or "error" in r:
            lines.append(f"{head} {r.get('skipped') or r.get('error')}")
            continue
        mfu_s = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"{head} {r['step_ms']:9.1f} {r['tokens_per_s']:10.0f} {r['tflops']:8.2f} {mfu_s:>6s} "
                     f"{r['max_memory_gib']:8.2f} {r['warmup_s']:9.1f} {r['graphs']:6d}")
    for (variant, arch), pair in _pairs(train).items():
        lines.append(f"{'':10s} {variant} {arch}: compiled / eager speed {pair:.2f}x")
    gen = res.get("generate", {})
    if gen:
        lines.append("generate    " + (f"ERROR {gen['error']}" if "error" in gen else
                                       f"cached == uncached: {gen['cached_equals_uncached']}; {gen['rows']} rows, "
                                       f"{gen['prompt']}-token prompts, {gen['new_tokens']} new: "
                                       f"{gen['decode_tokens_per_s']:.0f} tok/s"))
    ep = res.get("ep", {})
    lines.append("ep          " + json.dumps(ep))
    return "\n".join(lines)


def _pairs(runs: list[dict]) -> dict:
    ok = {(r["variant"], "cmoe" if r["chunking"] else "base", r["compiled"]): r for r in runs if "step_ms" in r}
    return {(v, a): ok[(v, a, False)]["step_ms"] / ok[(v, a, True)]["step_ms"]
            for (v, a, c) in ok if c and (v, a, False) in ok}


START = time.perf_counter()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke test)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no training run after this many seconds")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled runs")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, if not in the table")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--ep-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ep_worker:
        ep_worker()
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --device cpu --quick for the CPU smoke test")
    res = {}
    for name, fn in (("env", part_env), ("attention", part_attention), ("train", part_train),
                     ("generate", part_generate), ("ep", part_ep)):
        try:
            res[name] = fn(device, args)
        except Exception as e:  # noqa: BLE001 - report it in the table and go on
            res[name] = {"error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-2000:]}
        print(f"[{time.perf_counter() - START:.0f}s] {name} done", flush=True)
    res["wall_s"] = time.perf_counter() - START
    text = table(res)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({**res, "table": text}, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Peak memory of `python -m cmoe_vlm.cli.hf_import` against the checkpoint's size (docs/design.md §16).

    python bench/import_memory.py [--hidden 512 --layers 8 --experts 8 --expert-hidden 1536] [--out DIR]

Builds a random transformers MixtralForCausalLM of a few hundred MB (fp32), saves it sharded
(`--shard`), imports it in a fresh process and reads that process's peak resident memory (its
rusage from wait4; this script imports no torch itself, and builds in another child, because Linux
carries a parent's peak RSS into a forked child's). The same import of a 1-layer model of the
family gives the process's own footprint (Python, torch, transformers, timm: ~0.75 GiB of it is the
imports, measured), so the result shows both the peak against the checkpoint and what the weights
add. Writes OUT/import_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(folder: Path, hidden: int, layers: int, experts: int, expert_hidden: int, shard: str) -> int:
    """Save a random Mixtral of this shape at `folder`; returns the checkpoint's bytes."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=expert_hidden,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def import_peak(src: Path, dst: Path) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of the import run in a fresh process (its own rusage, from wait4)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cmoe_vlm.cli.hf_import", str(src), "--out", str(dst)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(proc.stderr.read().decode()[-2000:])
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    ap.add_argument("--expert-hidden", type=int, default=1536, help="expert width (default 1536)")
    ap.add_argument("--shard", default="200MB", help="max_shard_size of the saved checkpoint (default 200MB)")
    ap.add_argument("--out", default="bench/results/import_memory", help="working folder and results")
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)  # internal: build one checkpoint
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.build_only:  # in a child: this process never holds a model, so its children's peaks are their own
        print(build(Path(args.build_only), args.hidden, args.layers, args.experts, args.expert_hidden, args.shard))
        return 0
    out.mkdir(parents=True, exist_ok=True)

    def built(folder: Path, *shape: str) -> int:
        cmd = [sys.executable, __file__, "--out", str(out), "--build-only", str(folder), "--shard", args.shard, *shape]
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        return int(done.stdout.split()[-1])

    size = built(out / "src", "--hidden", str(args.hidden), "--layers", str(args.layers), "--experts",
                 str(args.experts), "--expert-hidden", str(args.expert_hidden))
    small = built(out / "src_small", "--hidden", "64", "--layers", "1", "--experts", str(args.experts),
                  "--expert-hidden", "64")
    base, _ = import_peak(out / "src_small", out / "dst_small")  # the first child: its peak is its own
    peak, seconds = import_peak(out / "src", out / "dst")
    mib = 2 ** 20
    result = {"checkpoint_mib": size / mib, "shards": len(list((out / "src").glob("*.safetensors"))),
              "peak_rss_mib": peak / mib, "peak_over_checkpoint": peak / size,
              "process_footprint_mib": base / mib, "added_by_weights_mib": (peak - base) / mib,
              "added_over_checkpoint": (peak - base) / size, "seconds": seconds,
              "small_checkpoint_mib": small / mib, "load": os.getloadavg()}
    (out / "import_memory.json").write_text(json.dumps(result, indent=2))
    print(f"checkpoint {result['checkpoint_mib']:.0f} MiB in {result['shards']} shards: import peak RSS "
          f"{result['peak_rss_mib']:.0f} MiB = {result['peak_over_checkpoint']:.2f}x the checkpoint; the process alone "
          f"(a {result['small_checkpoint_mib']:.1f} MiB import) {result['process_footprint_mib']:.0f} MiB, so the "
          f"weights add {result['added_by_weights_mib']:.0f} MiB = {result['added_over_checkpoint']:.2f}x; "
          f"{seconds:.1f} s; load {result['load'][0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

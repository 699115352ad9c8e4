#!/usr/bin/env python
"""Baseline MoE vs ConceptMoE (R = 2, FLOPs-matched) after the same training budget (issue 7).

    python bench/compare_baseline.py [--steps 300] [--out bench/results/baseline_vs_conceptmoe]

1. builds the baseline from the config with chunking off, and the ConceptMoE model the FLOPs
   calculator proposes for it at R (more active experts in the concept layers, else looping, else
   a wider concept model), so both spend the same activated FLOPs per token;
2. trains both for the same number of steps on the same built-in data (same seed, same packed
   rows per step: the same token budget);
3. evaluates both side by side with `python -m cmoe_vlm.eval` (built-in suite: MC, VQA,
   captioning, bits per byte; long-context passkey / needle probes; per-modality compression);
4. writes OUT/comparison.md (training summary + the evaluation table) and OUT/comparison.json.

Extra `key=value` arguments go to both training runs (e.g. `model.chunk.init=identity`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmoe_vlm import flops  # noqa: E402
from cmoe_vlm.config import to_overrides  # noqa: E402
from cmoe_vlm.cli.eval import main as eval_main  # noqa: E402
from cmoe_vlm.training.config import load_experiment  # noqa: E402
from cmoe_vlm.training.loop import train  # noqa: E402
from data_pipelines.builtin import write_builtin_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--out", default="bench/results/baseline_vs_conceptmoe")
    ap.add_argument("--data", default="data/builtin", help="built-in dataset root (written if missing)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024], help="long-context probe lengths")
    ap.add_argument("--limit", type=int, default=64, help="records per built-in task")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = ap.parse_args(argv)

    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "train" / "manifest.json").exists():
        write_builtin_dataset(data)
    common = [f"data.shards={data / 'train'}", f"train.heldout_shards={data / 'heldout'}", f"train.steps={args.steps}",
              "train.tensorboard=false", "train.resume=false", *args.overrides]
    base = load_experiment(args.config, common + ["model.chunk.enabled=false"]).model
    proposal = flops.propose_flops_matched(base, args.ratio)
    if proposal.config is None:
        raise SystemExit(f"no FLOPs-matched ConceptMoE fits this baseline at R={args.ratio}: {proposal.note}")
    cmoe = [line for line in to_overrides(proposal.config, "model") if not line.startswith("model.chunk.")]
    cmoe += ["model.chunk.enabled=true", "model.chunk.ratio_mode=joint", f"model.chunk.target_ratio={args.ratio}"]
    runs = {"baseline": ["model.chunk.enabled=false"], "conceptmoe": cmoe}
    print(f"== ConceptMoE R={args.ratio}: {proposal.strategy}: {proposal.note}; "
          f"FLOPs/token ×{proposal.flops_ratio:.3f}, params {proposal.params_diff_pct:+.1f}% of the baseline")

    train_res = {}
    for name, extra in runs.items():
        t0 = time.perf_counter()
        summary = train(load_experiment(args.config, common + extra + [f"train.out_dir={out / name}"]))
        if summary.get("interrupted"):
            raise SystemExit(f"{name}: interrupted; stopping the comparison")
        held = summary.get("heldout", {})
        train_res[name] = {"seconds": round(time.perf_counter() - t0, 1), "heldout_lm_loss": held.get("lm_loss"),
                           "heldout_compression": {k: v["ratio"] for k, v in held.get("compression", {}).items()}}
        print(f"== {name}: {train_res[name]}", flush=True)

    eval_dir = out / "eval"
    eval_main([*(x for name in runs for x in ("--model", str(out / name / "final"))), "--suite", "builtin",
               "--out", str(eval_dir), "--limit", str(args.limit), "--lengths", *map(str, args.lengths)])
    table = (eval_dir / "results.md").read_text()
    lines = [f"# Baseline MoE vs ConceptMoE (R = {args.ratio:g}, FLOPs-matched)", "",
             f"config {args.config}, {args.steps} steps each on the same data; overrides: {args.overrides or 'none'}.",
             f"ConceptMoE: {proposal.strategy} ({proposal.note}); activated FLOPs/token ×{proposal.flops_ratio:.3f} "
             f"of the baseline's, total params {proposal.params_diff_pct:+.1f}%.", "",
             "| run | train time (s) | held-out LM loss | held-out ratio (all / text / image) |", "|---|---|---|---|"]
    for name, r in train_res.items():
        c = r["heldout_compression"]
        ratios = " / ".join(f"{c[k]:.2f}" if k in c else "-" for k in ("all", "text", "image"))
        lines.append(f"| {name} | {r['seconds']:.0f} | {r['heldout_lm_loss']:.4f} | {ratios} |")
    lines += ["", "## Evaluation (`python -m cmoe_vlm.eval`)", "", table]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps({"args": vars(args), "flops": proposal.summary(),
                                                     "train": train_res}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

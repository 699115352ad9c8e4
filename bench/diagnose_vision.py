#!/usr/bin/env python
"""Why do trained VLMs ignore their images? Controlled runs: same data, same steps, one change each.

Each variant trains configs/tiny.yaml (plus its overrides) in process with the training loop's math
(bench_image_adaptivity.train_steps: AdamW with the loop's parameter groups, warmup + cosine,
clipping; no DeepSpeed), then scores easy-VQA test questions as 13-way multiple choice per
question type, with the image and with the image removed (the wording-only floor).

    python bench/diagnose_vision.py --out bench/results/diagnose/ --steps 600 \
        --variant base= --variant nocenter=projector.center=false

Writes OUT/<variant>.json (accuracies with/without image, training losses, compression) and
OUT/summary.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_image_adaptivity import parse_variants, train_steps  # noqa: E402
from easyvqa_data import QUESTION_TYPES, write_easyvqa  # noqa: E402


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, paths: dict) -> dict:
    from cmoe_vlm.eval.tasks import load_suite, run_multiple_choice
    from cmoe_vlm.inference.runner import ModelRunner
    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from data_pipelines.tokenizer import load_tokenizer

    exp = load_experiment(args.config, [f"data.shards={paths['train']}", f"train.steps={args.steps}",
                                        f"train.seed={args.seed}", "data.num_workers=0", *overrides])
    torch.manual_seed(exp.train.seed)
    model = ConceptMoEVLM(exp.vlm)
    log: list[dict] = []
    t0 = time.time()

    tasks = {t.name: t for t in load_suite(paths["suite"])}
    tokenizer = load_tokenizer(exp.data.tokenizer)

    def on_step(step: int, out, losses) -> None:
        if step % 25 == 0 or step == exp.train.steps:
            rec = {"step": step, "lm_loss": round(losses.lm.item(), 4)}
            for k, s in out.compression.items():
                if float(s.tokens):
                    rec[f"ratio_{k}"] = round(float(s.ratio), 3)
            if args.eval_every and step % args.eval_every == 0:
                runner = ModelRunner(model, tokenizer, batch_size=64)
                for t in ("colour", "shape"):
                    rec[f"acc_{t}"] = round(run_multiple_choice(runner, tasks[t], args.eval_records)["acc"], 3)
                model.train()
            log.append(rec)
            print(f"[{name}] {rec}", flush=True)

    train_steps(model, exp, on_step)
    train_s = time.time() - t0
    runner = ModelRunner(model, tokenizer, batch_size=64)
    res: dict = {"variant": name, "overrides": overrides, "steps": args.steps, "train_seconds": round(train_s),
                 "log": log}
    for suite in ("suite", "suite_blind"):
        for task in load_suite(paths[suite]):
            r = run_multiple_choice(runner, task, args.limit)
            res.setdefault(suite, {})[task.name] = round(r["acc"], 4)
    res["seconds"] = round(time.time() - t0)
    print(f"[{name}] with image {res['suite']}  blind {res['suite_blind']}", flush=True)
    return res


def plot(rows: list[dict], path: Path) -> None:
    """Colour accuracy with the image during training (the mid-run scores) per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, r in enumerate(sorted(rows, key=lambda r: -r["suite"]["colour"])):
        pts = [(rec["step"], rec["acc_colour"]) for rec in r["log"] if "acc_colour" in rec]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=plt.cm.tab10(i % 10),
                    label=f"{r['variant']} (final {r['suite']['colour']:.2f}, blind {r['suite_blind']['colour']:.2f})")
    ax.axhline(1 / 8, color="gray", ls="--", lw=0.8, label="chance (1/8)")
    ax.set_xlabel("training step")
    ax.set_ylabel("colour questions answered (with the image)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("easy-VQA colour questions during training (mid-run: 50 questions; final: 200)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/diagnose")
    p.add_argument("--data", default="data/easyvqa")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=200, help="test questions per type")
    p.add_argument("--variant", action="append", default=[], help="name=key=value[,key=value] (none: just "
                   "redo the table and plot of OUT)")
    p.add_argument("--eval-every", type=int, default=0, help="score colour and shape questions every N steps")
    p.add_argument("--eval-records", type=int, default=50, help="questions per type in those mid-run scores")
    args = p.parse_args(argv)
    paths = write_easyvqa(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in parse_variants(args.variant).items():
        res = run_variant(name, overrides, args, paths)
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    lines = ["| variant | " + " | ".join(f"{t} img / blind" for t in QUESTION_TYPES) + " | final lm loss | s |",
             "|---" * (len(QUESTION_TYPES) + 3) + "|"]
    for r in rows:
        cells = [f"{r['suite'][t]:.3f} / {r['suite_blind'][t]:.3f}" for t in QUESTION_TYPES]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['log'][-1]['lm_loss']} | {r['seconds']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "colour_during_training.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Learned versus fixed image-token reduction at the same image-token budget, on built-in data or
easy-VQA (`--dataset easyvqa`: images that are mostly white background, where the paper's claim that
images are redundant should hold most).

At R_image = 2, 4 or 8 (16 image tokens per image -> 8, 4 or 2 image concepts), per seed:

    learned      per-modality chunking, image_ratio R, `raster` scoring (the chunker decides where)
    learned_2d   the same with `2d` scoring (left neighbour and the token above)
    projector    fixed: the projector merges blocks of 2x4 (R 2), 4x4 (R 4) or 4x8 (R 8) patches (pixel
                 shuffle), so the image has 16/R tokens, each its own concept (ImageStride(1))
    stride       fixed-stride chunking of the 16 image tokens: a concept every R tokens in raster
                 order (the boundary policy ImageStride(R), in training and evaluation)
    prune        training-free top-k pruning (VisionZip / FastV style): the `full` model below,
                 evaluated with projector.keep_tokens = 16/R (the most-attended tokens), each its
                 own concept

and the reference `full` (R_image 1: 16 image tokens, each its own concept), trained once per seed.
Every variant chunks text with the learned chunker at R_text 1.5 (per-modality mode), so only the
image side differs. The learned variants keep all 16 image tokens in the token-level layers
(encoder, decoder) and compress only what the concept model sees; the fixed ones shorten the whole
sequence. Built-in data: configs/tiny.yaml made smaller (bench_image_adaptivity.SMALL), grounded
text (object positions named in captions and answers), scored on the built-in suite's mc_count,
mc_colour and mc_position (localisation). easy-VQA: configs/easyvqa.yaml as it is, scored on its
test questions per type (yes_no, colour, shape; 13-way multiple choice). Also measured: the held-out
LM loss and the image concepts per image actually used (the learned chunker's evaluation-time ratio
may miss its target). Writes JSON, a Markdown table (.md) and a PNG.

    python bench/bench_image_reduction.py --out bench/results/image_reduction.json --seeds 3
    python bench/bench_image_reduction.py --dataset easyvqa --config configs/easyvqa.yaml --ratios 4 8 \
        --seeds 3 --out bench/results/image_reduction_easyvqa.json

On easy-VQA a tower trained with the LM never learns shape (docs/design.md §7b): `--tower PATH` freezes
a stage-0 tower (the `tower.safetensors` bench/bench_easyvqa.py writes) in every variant, as
bench_easyvqa.py does. Trailing key=value arguments override the config for every variant.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch

from bench_image_adaptivity import SMALL, ensure_builtin_data, merge_reports, train_steps

PER_MODALITY = ["model.chunk.ratio_mode=per_modality", "model.chunk.text_ratio=1.5"]
RATIOS = (2, 4, 8)
PROJECTOR_BLOCKS = {2: ["projector.reduction=2", "projector.reduction_cols=4"], 4: ["projector.reduction=4"],
                    8: ["projector.reduction=4", "projector.reduction_cols=8"]}
TOKENS = 16  # image tokens per image at the base reduction (8x8 patches, 2x2 blocks)
DATASETS = {  # scored tasks and their chance level; the base overrides of the config
    "builtin": {"tasks": {"mc_count": 1 / 8, "mc_colour": 1 / 6, "mc_position": 1 / 16}, "base": SMALL},
    "easyvqa": {"tasks": {"yes_no": 1 / 2, "colour": 1 / 8, "shape": 1 / 3}, "base": []},
}


def tasks_of(report: dict) -> dict[str, float]:
    return DATASETS[report.get("dataset", "builtin")]["tasks"]


def variants(ratios: tuple[int, ...]) -> list[tuple[str, int, list[str], int | None, int]]:
    """(name, R, overrides, ImageStride stride or None for the chunker's own, keep_tokens) in run
    order; `prune` has no training of its own (it is evaluated on `full`)."""
    out = [("full", 1, ["model.chunk.image_ratio=1"], 1, 0)]
    for r in ratios:
        out += [("learned", r, [f"model.chunk.image_ratio={r}"], None, 0),
                ("learned_2d", r, [f"model.chunk.image_ratio={r}", "model.chunk.image_chunking=2d"], None, 0),
                ("projector", r, ["model.chunk.image_ratio=1"] + PROJECTOR_BLOCKS[r], 1, 0),
                ("stride", r, ["model.chunk.image_ratio=1"], r, 0),
                ("prune", r, ["model.chunk.image_ratio=1", f"projector.keep_tokens={TOKENS // r}"], 1, TOKENS // r)]
    return out


def train_model(exp, boundaries=None):
    """A model trained exp.train.steps steps (`train_steps`); returns it and its last 20 LM losses."""
    from cmoe_vlm.model.vlm import ConceptMoEVLM

    torch.manual_seed(exp.train.seed)
    model = ConceptMoEVLM(exp.vlm)
    losses: list[float] = []
    train_steps(model, exp, lambda step, out, step_losses: losses.append(step_losses.lm.item()), boundaries)
    return model, losses[-20:]


def measure(model, exp, boundaries, suite: Path, limit: int, heldout: Path, tasks: dict[str, float]) -> dict:
    """Suite accuracies, held-out LM loss and image concepts per image of a model (eval mode)."""
    from cmoe_vlm.eval.tasks import load_suite, run_multiple_choice
    from cmoe_vlm.inference.runner import ModelRunner
    from cmoe_vlm.training.evaluate import evaluate
    from data_pipelines.loader import StreamingLoader
    from data_pipelines.tokenizer import load_tokenizer
    from vision import build_image_transform

    runner = ModelRunner(model, load_tokenizer(exp.data.tokenizer), batch_size=16, boundaries=boundaries)
    scores = {t.name: run_multiple_choice(runner, t, limit) for t in load_suite(suite) if t.name in tasks}
    held_cfg = replace(exp.data, shards=str(heldout), shuffle_buffer=0, num_workers=0)
    held = evaluate(model, StreamingLoader(held_cfg, image_transform=build_image_transform(model.vision, train=False)),
                    exp.train.eval_batches, boundaries=boundaries)
    comp = held["compression"]
    per_image = model.cfg.tokens_per_image / comp["image"]["ratio"]
    return {"acc": {k: v["acc"] for k, v in scores.items()},
            "answer_logprob": {k: v["answer_logprob"] for k, v in scores.items()},
            "chance_logprob": {k: v["chance_logprob"] for k, v in scores.items()}, "heldout_lm_loss": held["lm_loss"], "image_concepts_per_image": per_image,
            "image_tokens_per_image": model.cfg.tokens_per_image, "eval_ratio_text": comp["text"]["ratio"],
            "eval_ratio_image": comp["image"]["ratio"]}


def summarise(runs: dict, tasks: dict[str, float]) -> dict:
    """(variant, R) -> each metric as mean, std (n − 1) and the seed values."""
    groups: dict[str, list[dict]] = {}
    for run in runs.values():
        groups.setdefault(f"{run['variant']}@R{run['R']}", []).append(run)
    out = {}
    for key, rs in groups.items():
        metrics = {f"acc_{t}": [r["acc"][t] for r in rs] for t in tasks}
        metrics.update({f"logprob_{t}": [r["answer_logprob"][t] for r in rs] for t in tasks})
        metrics.update({k: [r[k] for r in rs] for k in ("heldout_lm_loss", "image_concepts_per_image")})
        out[key] = {m: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
                    for m, v in metrics.items()} | {"seeds": [r["seed"] for r in rs]}
    return out


def markdown_table(summary: dict, tasks: dict[str, float]) -> str:
    """The summary as a Markdown table: mean ± std (n − 1) over seeds per (variant, R)."""
    cols = [f"acc_{t}" for t in tasks] + [f"logprob_{t}" for t in tasks] + ["heldout_lm_loss", "image_concepts_per_image"]
    heads = [c.replace("acc_", "acc ").replace("logprob_", "log P ").replace("mc_", "").replace("heldout_lm_loss", "held-out LM loss")
             .replace("image_concepts_per_image", "image concepts / image") for c in cols]
    rows = ["| variant | R_image | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(cols)]
    order = {"full": 0, "learned": 1, "learned_2d": 2, "projector": 3, "stride": 4, "prune": 5}
    for key in sorted(summary, key=lambda k: (int(k.split("@R")[1]), order[k.split("@")[0]])):
        s = summary[key]
        name, r = key.split("@R")
        rows.append(f"| {name} | {r} | " + " | ".join(f"{s[c]['mean']:.3f} ± {s[c]['std']:.3f}" for c in cols) + " |")
    return "\n".join(rows) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    tasks = tasks_of(report)
    names = ["learned", "learned_2d", "projector", "stride", "prune"]
    panels = ([(f"acc_{t}", t + " accuracy") for t in tasks] + [("heldout_lm_loss", "held-out LM loss")]
              + [(f"logprob_{t}", t + ": log P(answer | choices)") for t in tasks]
              + [("image_concepts_per_image", "image concepts per image (eval)")])
    chance = {f"acc_{t}": c for t, c in tasks.items()} | {f"logprob_{t}": math.log(c) for t, c in tasks.items()}
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    axes = axes.flat
    width = 0.8 / len(names)
    ratios = sorted({int(k.split("@R")[1]) for k in summary if not k.startswith("full")})
    for ax, (metric, title) in zip(axes, panels):
        for i, name in enumerate(names):
            xs, ys, es, pts = [], [], [], []
            for j, r in enumerate(ratios):
                s = summary.get(f"{name}@R{r}")
                if s:
                    x = j + (i - (len(names) - 1) / 2) * width
                    xs.append(x), ys.append(s[metric]["mean"]), es.append(s[metric]["std"])
                    pts += [(x, v) for v in s[metric]["values"]]
            ax.bar(xs, ys, width, yerr=es, color=plt.cm.tab10(i), label=name, alpha=0.8, capsize=2)
            if pts:
                ax.scatter(*zip(*pts), s=6, color="black", zorder=3)
        if "full@R1" in summary:
            ax.axhline(summary["full@R1"][metric]["mean"], color="black", lw=1, ls="-", label="full (R_image 1)")
        if metric in chance:
            ax.axhline(chance[metric], color="gray", lw=0.8, ls="--", label="chance")
        ax.set_xticks(range(len(ratios)), [f"R_image {r}" for r in ratios])
        ax.set_title(title, fontsize=9)
        if metric == "heldout_lm_loss" or metric.startswith("logprob"):
            lo = min([s[metric]["mean"] - s[metric]["std"] for s in summary.values()] + [chance.get(metric, math.inf)])
            hi = max([s[metric]["mean"] + s[metric]["std"] for s in summary.values()] + [chance.get(metric, -math.inf)])
            ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    seeds = max(len(s["seeds"]) for s in summary.values())
    fig.suptitle(f"Image-token reduction at the same budget ({report.get('dataset', 'builtin')}, {seeds} seeds: bars mean ± std, "
                 "dots seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/image_reduction.json")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="builtin")
    ap.add_argument("--data", default=None, help="dataset root, written if missing (default: data/builtin_reduction "
                    "or data/easyvqa)")
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--text-chars", type=int, default=600, help="long text documents (short: images weigh more)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 400 on built-in data, the "
                    "config's on easy-VQA)")
    ap.add_argument("--limit", type=int, default=100, help="records per suite task")
    ap.add_argument("--ratios", type=int, nargs="+", default=[2, 4], choices=RATIOS)
    ap.add_argument("--only", nargs="+", default=None, help="variant names to run (full always runs if prune does)")
    ap.add_argument("--skip", nargs="+", default=[], metavar="NAME@RN", help="leave these out, e.g. learned_2d@R4")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="no training: merge earlier reports")
    ap.add_argument("--tower", default=None, metavar="SAFETENSORS",
                    help="a stage-0 vision tower, frozen in every variant (bench_easyvqa.py's tower.safetensors)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config for every variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tasks = DATASETS[args.dataset]["tasks"]
    if args.merge:
        report = merge_reports(args.merge, lambda runs: summarise(runs, tasks)) | {"dataset": args.dataset}
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(markdown_table(report["summary"], tasks))
        plot(report, out.with_suffix(".png"))
        return report

    from cmoe_vlm.model.boundaries import ImageStride
    from cmoe_vlm.eval.builtin_suite import write_builtin_suite
    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.model.vlm import ConceptMoEVLM

    base = DATASETS[args.dataset]["base"] + PER_MODALITY + args.overrides
    if args.tower:
        if not Path(args.tower).is_file():
            ap.error(f"--tower: no file {args.tower} (bench/bench_easyvqa.py writes OUT/tower.safetensors)")
        base += ["vision.pretrained=true", f"vision.checkpoint_path={args.tower}", "vision.freeze=true"]
    if args.dataset == "builtin":
        root = Path(args.data or "data/builtin_reduction")
        ensure_builtin_data(root, args.num_train, args.text_chars, grounded=True)
        suite, train, heldout = root / "suite", root / "train", root / "heldout"
        if not (suite / "suite.yaml").exists():
            write_builtin_suite(suite, text_chars=args.text_chars, max_per_task=args.limit, grounded=True)
    else:
        from easyvqa_data import write_easyvqa
        paths = write_easyvqa(args.data or "data/easyvqa")
        suite, train, heldout = paths["suite"], paths["train"], paths["test"]
    steps = args.steps or (400 if args.dataset == "builtin" else None)
    report = {"dataset": args.dataset, "config": args.config, "base": base, "steps": steps, "limit": args.limit,
              "tower": args.tower, "runs": {}}
    grid = [v for v in variants(tuple(args.ratios)) if args.only is None or v[0] in args.only
            or (v[0] == "full" and "prune" in args.only)]
    grid = [v for v in grid if f"{v[0]}@R{v[1]}" not in args.skip]
    for seed in range(args.seed0, args.seed0 + args.seeds):
        full = None
        for name, r, extra, stride, keep in grid:
            t0 = time.perf_counter()
            exp = load_experiment(args.config, base + extra + [*([f"train.steps={steps}"] if steps else []),
                                                               f"train.seed={seed}", f"data.seed={seed}", f"data.shards={train}",
                                                               "data.num_workers=0"])
            policy = None if stride is None else ImageStride(stride)
            if keep:  # training-free: the full model's weights, fewer image tokens
                model = ConceptMoEVLM(exp.vlm)
                model.load_state_dict(full.state_dict())
                last = []
            else:
                model, last = train_model(exp, policy)
                full = model if name == "full" else full
            rec = measure(model, exp, policy, suite, args.limit, heldout, tasks)
            rec.update(variant=name, R=r, seed=seed, overrides=extra, image_stride=stride, keep_tokens=keep,
                       train_lm_loss_last20=sum(last) / len(last) if last else None,
                       seconds=time.perf_counter() - t0)
            report["runs"][f"{name}@R{r}/seed{seed}"] = rec
            print(f"{name}@R{r}/seed{seed}: acc {json.dumps({k: round(v, 3) for k, v in rec['acc'].items()})}, "
                  f"log P(answer) {json.dumps({k: round(v, 3) for k, v in rec['answer_logprob'].items()})}, "
                  f"heldout lm {rec['heldout_lm_loss']:.4f}, image concepts/image {rec['image_concepts_per_image']:.2f}, "
                  f"text ratio {rec['eval_ratio_text']:.2f}, {rec['seconds']:.0f}s", flush=True)
            out.write_text(json.dumps(report, indent=1))
    report["summary"] = summarise(report["runs"], tasks)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown_table(report["summary"], tasks))
    plot(report, out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()

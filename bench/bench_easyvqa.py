#!/usr/bin/env python
"""easy-VQA, a third-party benchmark, offline: does the trained VLM look at its images?

easy-VQA (PyPI `easy-vqa`, MIT): 64x64 images of one coloured shape on white, 38,575 train / 9,673
test questions, 13 answers (yes/no, 8 colours, 3 shapes). This script

1. writes the data with our own shard writer (bench/easyvqa_data.py: qa shards, and cmoe-eval
   multiple-choice suites with and without the image);
2. stage 0 (`--tower-epochs`, default 20): trains the config's vision tower alone on the train split's
   shape and colour labels (bench/probe_vision.py; ~35 s), the stand-in for the pretrained tower a real
   VLM starts from; every variant then trains with it frozen (docs/design.md §7b: a tower trained with
   the LM never learned shape);
3. trains each variant with the real training command (train_vlm.py: DeepSpeed, the streaming
   loader, checkpoints, export), same config, data and steps:
       conceptmoe   the config as it is
       baseline     the same with chunking off (the baseline MoE)
       text_only    the same trained with every image removed (data.drop_images): the floor that
                    the wording of the questions alone reaches
4. scores the full test split (or --limit questions per type) with `cmoe-eval` as 13-way multiple
   choice per question type, with the image and with it removed;
5. writes OUT/easyvqa.json, OUT/easyvqa.md (the README table) and OUT/easyvqa.png.

    pip install easy-vqa    # a bench extra, never needed by `make demo`
    python bench/bench_easyvqa.py --out bench/results/easyvqa
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from easyvqa_data import QUESTION_TYPES, write_easyvqa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"conceptmoe": [], "baseline": ["model.chunk.enabled=false"], "text_only": ["data.drop_images=true"]}
CHANCE = {"yes_no": 1 / 2, "colour": 1 / 8, "shape": 1 / 3}


def run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in `log`; returns its wall time; raises on failure."""
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {rc}); see {log}")
    return time.time() - t0


def score(model: Path, suite: Path, out: Path, limit: int | None, log: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "cmoe_vlm.eval", "--model", str(model), "--suite", str(suite), "--out", str(out),
           "--no-long-context", "--compression-samples", "0", "--batch-size", "64"]
    run(cmd + (["--limit", str(limit)] if limit else []), log)
    tasks = json.loads((out / "results.json").read_text())["models"]
    (res,) = tasks.values()
    return {t: res["tasks"][t]["acc"] for t in QUESTION_TYPES} | {"n": {t: res["tasks"][t]["n"] for t in QUESTION_TYPES}}


def overall(acc: dict) -> float:
    """Accuracy over all questions (each type weighted by its number of questions)."""
    return sum(acc[t] * acc["n"][t] for t in QUESTION_TYPES) / sum(acc["n"].values())


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / (2 * len(names))
    for i, name in enumerate(names):
        r = report["variants"][name]
        for j, (suite, hatch) in enumerate((("with_image", ""), ("image_removed", "//"))):
            xs = [k + (2 * i + j) * width for k in range(len(QUESTION_TYPES) + 1)]
            ys = [r[suite][t] for t in QUESTION_TYPES] + [r[suite]["overall"]]
            ax.bar(xs, ys, width, label=f"{name}, {suite.replace('_', ' ')}", hatch=hatch,
                   color=f"C{i}", alpha=1.0 if j == 0 else 0.45)
    for k, t in enumerate(QUESTION_TYPES):
        ax.hlines(CHANCE[t], k - width / 2, k + 0.8 - width / 2, colors="k", linestyles=":", linewidth=1)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(QUESTION_TYPES) + 1)], [*QUESTION_TYPES, "overall"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (13-way multiple choice)")
    ax.set_title(f"easy-VQA test split ({report['steps']} steps, {report['config']}); dotted: chance")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    lines = ["| variant | " + " | ".join(f"{t} (image / removed)" for t in QUESTION_TYPES)
             + " | overall (image / removed) | training time | held-out R text / image |",
             "|---" * (len(QUESTION_TYPES) + 4) + "|"]
    for name, r in report["variants"].items():
        cells = [f"{r['with_image'][t]:.3f} / {r['image_removed'][t]:.3f}" for t in QUESTION_TYPES]
        comp = r.get("heldout_compression", {})
        ratios = " / ".join(f"{comp[m]['ratio']:.2f}" for m in ("text", "image") if m in comp) or "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['with_image']['overall']:.3f} / "
                     f"{r['image_removed']['overall']:.3f} | {r['train_seconds'] / 60:.1f} min | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/easyvqa")
    ap.add_argument("--data", default="data/easyvqa", help="where the shards and suites are written (once)")
    ap.add_argument("--config", default="configs/easyvqa.yaml")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--limit", type=int, default=None, help="test questions per type (default: the full split)")
    ap.add_argument("--score-only", action="store_true", help="no training: score the runs already in OUT/runs/")
    ap.add_argument("--tower-epochs", type=int, default=20,
                    help="stage 0: train the config's vision tower alone on the train split's shape/colour labels "
                         "(bench/probe_vision.py) for this many epochs, then train every variant with it frozen "
                         "(0: the tower is trained from scratch with the LM, as in earlier runs)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    paths = write_easyvqa(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": args.config, "steps": args.steps, "limit": args.limit, "overrides": args.overrides,
                    "tower_epochs": args.tower_epochs,
                    "machine": f"{os.cpu_count()} CPUs", "variants": {}}
    tower = out / "tower.safetensors"
    if args.tower_epochs and not args.score_only:
        from easyvqa_data import image_labels
        from probe_vision import train_probe

        data = {split: image_labels(split) for split in ("train", "test")}
        report["tower"] = train_probe("tower", args.config, args.overrides, data, args.tower_epochs, save_tower=tower)
    elif args.score_only and (out / "easyvqa.json").is_file():
        report["tower"] = json.loads((out / "easyvqa.json").read_text()).get("tower")
    tower_overrides = (["vision.pretrained=true", f"vision.checkpoint_path={tower}", "vision.freeze=true"]
                       if args.tower_epochs else [])
    for name in names:
        run_dir = out / "runs" / name
        cmd = [sys.executable, "train_vlm.py", args.config, f"data.shards={paths['train']}",
               f"train.heldout_shards={paths['test']}", f"train.out_dir={run_dir}", "train.resume=false",
               *([f"train.steps={args.steps}"] if args.steps else []), *args.overrides, *tower_overrides, *VARIANTS[name]]
        if args.score_only:
            seconds = (json.loads((out / "easyvqa.json").read_text())["variants"].get(name, {}).get("train_seconds", 0)
                       if (out / "easyvqa.json").is_file() else 0)
        else:
            print(f"[{name}] training: {' '.join(cmd[2:])}", flush=True)
            seconds = run(cmd, out / f"{name}.train.log")
        summary = json.loads((run_dir / "summary.json").read_text())
        res = {"train_seconds": round(seconds), "train_summary": summary.get("train", {}),
               "heldout_compression": summary.get("heldout", {}).get("compression", {}), "steps": summary["step"]}
        for suite, key in (("suite", "with_image"), ("suite_blind", "image_removed")):
            acc = score(run_dir / "final", paths[suite], out / "eval" / name / suite, args.limit,
                        out / f"{name}.{suite}.log")
            res[key] = {**{t: round(acc[t], 4) for t in QUESTION_TYPES}, "overall": round(overall(acc), 4),
                        "n": acc["n"]}
        report["variants"][name] = res
        report["steps"] = res["steps"]
        print(f"[{name}] with image {res['with_image']}  image removed {res['image_removed']}", flush=True)
        (out / "easyvqa.json").write_text(json.dumps(report, indent=1))
    (out / "easyvqa.md").write_text(markdown(report))
    plot(report, out / "easyvqa.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

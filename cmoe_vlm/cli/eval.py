"""Evaluate one or more checkpoints side by side.

    python -m cmoe_vlm.eval --model runs/base/final --model runs/cmoe/final --suite builtin --out eval/
    python -m cmoe_vlm.eval --model DIR --suite my_suite/ --out eval/ --no-long-context
    python -m cmoe_vlm.eval --model DIR --suite none --out eval/ --lengths 1024 2048 --samples 5

--suite: `builtin` (written to OUT/suite from the built-in held-out split), a suite folder or
YAML (see cmoe_vlm/eval/tasks.py), a single <type>*.jsonl file, or `none`.
Long-context probes (passkey, needle; cmoe_vlm/eval/long_context.py) run unless
--no-long-context. Held-out compression per modality (eval threshold) is measured on
--compression-samples built-in held-out samples (0 = skip; images of several sizes for a model with
vision.max_pixels).

Writes OUT/results.json (everything, per model), OUT/results.md (one column per model), and per
model OUT/<name>/long_context/{long_context.json,.md,heatmap_*.png} and predictions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmoe_base.commands import Parser, command, fraction, non_negative_int, positive_int
from cmoe_base.outputs import check_output

if TYPE_CHECKING:  # the evaluation modules load torch: imported after the arguments are parsed
    from ..inference.runner import ModelRunner


def model_name(folder: str) -> str:
    p = Path(folder)
    return p.parent.name if p.name == "final" else p.name


def compression_on_builtin(runner: ModelRunner, n: int) -> dict[str, float]:
    """Eval-threshold compression per modality on n built-in held-out samples, drawn at several sizes
    for a model that takes images at their own size (`eval.adaptivity.heldout_sizes`)."""
    from ..eval.adaptivity import heldout_sizes
    from ..inspection.analysis import analyse, summarise
    from ..inspection.samples import load_samples

    samples = load_samples(["builtin"], n, builtin_sizes=heldout_sizes(runner.model))
    summary = summarise(analyse(runner, samples), runner.model.cfg.image_grid)
    return {m: summary["modalities"][m]["ratio"] for m in ("all", "text", "image")}


def evaluate_model(folder: str, suite: list | None, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.long_context import run_probes, write_report
    from ..eval.tasks import HEADLINE, run_task
    from ..inference.runner import ModelRunner

    runner = ModelRunner.load(folder, batch_size=args.batch_size)
    name = model_name(folder)
    res: dict[str, Any] = {"dir": str(folder), "params": sum(p.numel() for p in runner.model.parameters()),
                           "chunking": runner.model.cfg.model.chunk.enabled, "tasks": {}}
    t0 = time.perf_counter()
    for task in suite or []:
        t = time.perf_counter()
        res["tasks"][task.name] = run_task(runner, task, args.limit)
        res["tasks"][task.name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {task.name}: {res['tasks'][task.name].get(HEADLINE[task.type])}", flush=True)
    if args.compression_samples:
        res["compression"] = compression_on_builtin(runner, args.compression_samples)
    if not args.no_long_context:
        lc = run_probes(runner, tuple(args.probes), args.lengths, tuple(args.depths), args.samples, args.seed)
        res["long_context"] = lc
        res["long_context_files"] = write_report(lc, out / name / "long_context", label=name)
        print(f"[{name}] long context: " + ", ".join(f"{p} {v['accuracy']:.2f}" for p, v in lc["summary"].items()),
              flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def markdown(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, vals: list[Any], fmt: str = "{:.3f}") -> None:
        lines.append(f"| {label} | " + " | ".join("–" if v is None else fmt.format(v) for v in vals) + " |")

    row("parameters", [r["params"] for r in results.values()], "{:,}")
    row("chunking", [r["chunking"] for r in results.values()], "{}")
    tasks = {t: v["type"] for r in results.values() for t, v in r["tasks"].items()}
    for t, kind in tasks.items():
        metrics = {"multiple_choice": ["acc", "acc_norm"], "vqa": ["exact_match", "vqa_accuracy"],
                   "caption": ["cider", "bleu4", "rouge_l"], "perplexity": ["bits_per_byte"]}[kind]
        for m in metrics:
            vals = [r["tasks"].get(t, {}).get(m) for r in results.values()]
            if all(v is None for v in vals):  # e.g. vqa_accuracy on single-answer records
                continue
            n = next(r["tasks"][t]["n"] for r in results.values() if t in r["tasks"])
            suffix = " (lower is better)" if m == "bits_per_byte" else ""
            chance = next((r["tasks"][t].get("chance") for r in results.values() if t in r["tasks"]), None)
            extra = f", chance {chance:.2f}" if chance and m == "acc" else ""
            row(f"{t} {m} (n={n}{extra}){suffix}", vals)
    for m in ("all", "text", "image"):
        if any("compression" in r for r in results.values()):
            row(f"held-out compression ratio, {m}", [r.get("compression", {}).get(m) for r in results.values()], "{:.2f}")
    probes = {p for r in results.values() for p in r.get("long_context", {}).get("summary", {})}
    for p in sorted(probes):
        lengths = next(r["long_context"]["lengths"] for r in results.values() if "long_context" in r)
        for n in lengths:
            row(f"{p} accuracy @ {n} tokens (mean over depths)",
                [r.get("long_context", {}).get("summary", {}).get(p, {}).get("by_length", {}).get(str(n))
                 for r in results.values()], "{:.2f}")
        row(f"{p} answer-token accuracy (all cells)",
            [r.get("long_context", {}).get("summary", {}).get(p, {}).get("token_accuracy") for r in results.values()],
            "{:.2f}")
    return "\n".join(lines) + "\n"


@command("cmoe-eval")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="cmoe-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="exported checkpoint folder (e.g. runs/tiny/final); repeat for side by side")
    ap.add_argument("--suite", default="builtin",
                    help="builtin (default) | suite folder or YAML | <type>*.jsonl task file | none")
    ap.add_argument("--out", required=True, help="output folder for results.json, results.md, reports")
    ap.add_argument("--allow-outside-paths", action="store_true",
                    help="let a suite read data and image files outside its own folder (refused by default)")
    ap.add_argument("--limit", type=positive_int, default=None, help="records per task (default: all)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)")
    ap.add_argument("--no-long-context", action="store_true", help="skip the passkey / needle probes")
    ap.add_argument("--chat", action="store_true", help="ask every task as a conversation (the tokenizer's chat "
                    "template; as a task's `chat: true` option does): for models trained on chat data")
    ap.add_argument("--probes", nargs="+", default=None, metavar="PROBE",
                    help="long-context probes to run (default: all in cmoe_vlm/eval/long_context.py: passkey, needle)")
    ap.add_argument("--lengths", nargs="+", type=positive_int, default=None,
                    help="context lengths in tokens (default 1024, 2048, ... up to max_seq_len)")
    ap.add_argument("--depths", nargs="+", type=fraction, default=None,
                    help="where the key / needle sits: 0 = start of the context, 1 = end (default 0 0.25 0.5 0.75 1)")
    ap.add_argument("--samples", type=positive_int, default=3, help="probe samples per (length, depth) cell (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the probe contents (default 0)")
    ap.add_argument("--compression-samples", type=non_negative_int, default=32,
                    help="built-in held-out samples for the per-modality compression ratios (default 32; 0 = skip)")
    args = ap.parse_args(argv)
    names = [model_name(m) for m in args.model]
    if len(set(names)) != len(names):
        ap.error(f"two --model folders have the same name {names}: give them distinct folder names")
    out = check_output(args.out, args.model, whole=False)
    from ..eval.long_context import DEFAULT_DEPTHS, PROBES
    from ..eval.tasks import load_suite

    args.probes = list(PROBES) if args.probes is None else args.probes
    if not set(args.probes) <= set(PROBES):
        ap.error(f"--probes: {sorted(set(args.probes) - set(PROBES))} unknown; choose from {', '.join(PROBES)}")
    args.depths = list(DEFAULT_DEPTHS) if args.depths is None else args.depths
    if args.suite == "none":
        suite = None
    elif args.suite == "builtin":
        from ..eval.builtin_suite import write_builtin_suite
        out.mkdir(parents=True, exist_ok=True)
        suite = load_suite(write_builtin_suite(out / "suite"))
    else:
        suite = load_suite(args.suite, allow_outside=args.allow_outside_paths)
    if args.chat and suite:
        for task in suite:
            task.options["chat"] = True
    out.mkdir(parents=True, exist_ok=True)
    results = {model_name(m): evaluate_model(m, suite, out, args) for m in args.model}
    (out / "results.json").write_text(json.dumps({"suite": args.suite, "models": results}, indent=2))
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

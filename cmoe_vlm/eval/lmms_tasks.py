"""lmms-eval task files for our own multiple-choice and VQA tasks, scored the way our tasks score them.

    python -m cmoe_vlm.eval.lmms_tasks --suite runs/tiny/eval/suite --out runs/tiny/lmms_tasks
    .venv-lmms/bin/lmms-eval --model cmoe_vlm --model_args pretrained=runs/tiny/final \
        --tasks cmoe_mc_colour,cmoe_vqa --include_path runs/tiny/lmms_tasks --output_path runs/tiny/lmms_eval

For each multiple_choice and vqa task of a suite (see cmoe_vlm/eval/tasks.py) this writes
OUT/<prefix><name>.jsonl (records with canonical fields: prompt, choices, answer or answers, and an
absolute image path) and OUT/<prefix><name>.yaml, a local lmms-eval task (`dataset_path: json`)
whose images come from `doc_to_visual` below:
- multiple_choice: output_type multiple_choice, each choice scored as the continuation
  `choice_prefix + choice` of [image, prompt]; metrics acc and acc_norm (lmms-eval normalises by
  the choice's length in characters, our own tasks by its UTF-8 bytes).
- vqa: output_type generate_until with the task's max_new_tokens (default 16), greedy, stopping at
  a newline; `vqa_process_results` gives exact_match and, when every record has several answers,
  vqa_accuracy, with the functions of our own VQA task.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PREFIX = "cmoe_"
MODULE = "cmoe_vlm.eval.lmms_tasks"  # named by the task files (also when run as __main__)


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The record's image (an absolute path, as written by `write_lmms_tasks`), or none."""
    from PIL import Image

    if not doc.get("image"):
        return []
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def vqa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from .tasks import normalize_answer
    from .vqa_metric import vqa_accuracy

    (pred,) = results
    out = {"exact_match": float(normalize_answer(pred) in {normalize_answer(a) for a in doc["answers"]})}
    if len(doc["answers"]) >= 2:
        out["vqa_accuracy"] = vqa_accuracy(pred, doc["answers"])
    return out


class _Function(str):
    """A `!function module.name` value in a task YAML (lmms-eval imports it)."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _metric(name: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def write_lmms_tasks(suite: str | Path, out: str | Path, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Write lmms-eval tasks for the multiple_choice and vqa tasks of `suite` into `out`; returns
    the lmms-eval task names. Records are checked (and normalised) as our own tasks read them."""
    from .tasks import load_suite, multiple_choice_fields, vqa_fields

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task in load_suite(suite):
        if task.type not in ("multiple_choice", "vqa"):
            continue
        name = f"{prefix}{task.name}"
        rows = []
        for i, rec in enumerate(task.records(task.options.get("limit"))):
            where = f"{task.data}: record {i + 1}"
            image = str((task.data.parent / rec["image"]).resolve()) if rec.get("image") else ""
            if task.type == "multiple_choice":
                prompt, choices, answer = multiple_choice_fields(rec, where, task.options)
                rows.append({"image": image, "prompt": prompt, "choices": choices, "answer": answer})
            else:
                prompt, answers = vqa_fields(rec, where)
                rows.append({"image": image, "prompt": prompt, "answers": answers, "answer": answers[0]})
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec: dict[str, Any] = {
            "task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},  # lmms-eval resolves from the cwd
            "test_split": "test", "doc_to_visual": _Function(f"{MODULE}.doc_to_visual"),
            "doc_to_text": "prompt",
        }
        if task.type == "multiple_choice":
            spec.update({"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "answer",
                         "target_delimiter": task.options.get("choice_prefix", " "),
                         "metric_list": [_metric("acc"), _metric("acc_norm")]})
        else:
            several = all(len(r["answers"]) >= 2 for r in rows)
            spec.update({"output_type": "generate_until", "doc_to_target": "answer",
                         "generation_kwargs": {"max_new_tokens": int(task.options.get("max_new_tokens", 16)),
                                               "until": ["\n"], "do_sample": False},
                         "process_results": _Function(f"{MODULE}.vqa_process_results"),
                         "metric_list": [_metric("exact_match")] + ([_metric("vqa_accuracy")] if several else [])})
        text = yaml.dump(spec, Dumper=_TaskDumper, sort_keys=False)
        (out / f"{name}.yaml").write_text(f"# Written by cmoe_vlm.eval.lmms_tasks from {task.data}\n{text}")
        names.append(name)
    if not names:
        raise ValueError(f"{suite}: no multiple_choice or vqa tasks to write")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cmoe_vlm.eval.lmms_tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, help="suite folder or YAML, or a <type>*.jsonl task file")
    ap.add_argument("--out", required=True, help="folder for the task files (lmms-eval's --include_path)")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, help="prefix of the lmms-eval task names")
    args = ap.parse_args(argv)
    names = write_lmms_tasks(args.suite, args.out, args.prefix)
    print(f"wrote {len(names)} lmms-eval tasks to {args.out}: {','.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

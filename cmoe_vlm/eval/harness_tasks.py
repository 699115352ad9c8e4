"""Harness task files for our own tasks, so lm-eval and lmms-eval run them as our tasks run them.

    python -m cmoe_vlm.eval.harness_tasks --harness lmms-eval --suite runs/tiny/eval/suite --out runs/tiny/lmms_tasks
    python -m cmoe_vlm.eval.harness_tasks --harness lm-eval --suite runs/tiny/eval/suite --out runs/tiny/lm_eval_tasks

then run the harness with `--include_path OUT --tasks NAMES` (the names are printed). For each task
of a suite (see cmoe_vlm/eval/tasks.py) that the harness can run, this writes OUT/<prefix><name>.jsonl
(records with canonical fields, read and checked as our task reads them; image paths made absolute)
and OUT/<prefix><name>.yaml, a local task (`dataset_path: json` on that file):
- multiple_choice (both harnesses; lm-eval: tasks without images only): output_type
  multiple_choice, each choice scored as the continuation `choice_prefix + choice` of [image,
  prompt]; metrics acc and acc_norm (the harnesses normalise by the choice's length in
  characters, our own tasks by its UTF-8 bytes).
- vqa (lmms-eval): output_type generate_until with the task's max_new_tokens (default 16),
  greedy, stopping at a newline; `vqa_process_results` gives exact_match and, when every record
  has several answers, vqa_accuracy, with the functions of our own VQA task.
- perplexity (lm-eval): output_type loglikelihood_rolling over each text; word_perplexity,
  byte_perplexity, bits_per_byte (lm-eval's rolling windows: each token predicted once with as
  much context as max_seq_len allows; our own task restarts each window from bos, so its figure
  is a little higher on texts longer than a window).
lmms-eval tasks take their images from `doc_to_visual` below.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

from cmoe_base.commands import InputError, Parser, command

HARNESSES = ("lm-eval", "lmms-eval")
DEFAULT_PREFIX = "cmoe_"
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MODULE = "cmoe_vlm.eval.harness_tasks"  # named by the task files (also when this runs as __main__)


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The record's image (an absolute path, as written by `write_harness_tasks`), or none."""
    from data_pipelines.images import open_image

    return [open_image(doc["image"])] if doc.get("image") else []


def vqa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from .tasks import normalize_answer
    from .vqa_metric import vqa_accuracy

    (pred,) = results
    out = {"exact_match": float(normalize_answer(pred) in {normalize_answer(a) for a in doc["answers"]})}
    if len(doc["answers"]) >= 2:
        out["vqa_accuracy"] = vqa_accuracy(pred, doc["answers"])
    return out


class _Function(str):
    """A `!function module.name` value in a task YAML (the harness imports it)."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _metric(name: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def _rows(task) -> list[dict[str, Any]]:
    from .tasks import multiple_choice_fields, vqa_fields

    rows = []
    for i, rec in enumerate(task.records(task.options.get("limit"))):
        where = f"{task.data}: record {i + 1}"
        image = _image_path(task, rec, where)
        if task.type == "multiple_choice":
            prompt, choices, answer = multiple_choice_fields(rec, where, task.options)
            rows.append({"image": image, "prompt": prompt, "choices": choices, "answer": answer})
        elif task.type == "vqa":
            prompt, answers = vqa_fields(rec, where)
            rows.append({"image": image, "prompt": prompt, "answers": answers, "answer": answers[0]})
        else:
            if not isinstance(rec.get("text"), str) or not rec["text"]:
                raise InputError(f"{where}: a perplexity record needs a non-empty string 'text'")
            rows.append({"text": rec["text"]})
    return rows


def _image_path(task, rec: dict[str, Any], where: str) -> str:
    """The record's image as an absolute path inside the suite's folder (unless the suite allows outside paths)."""
    if not rec.get("image"):
        return ""
    if not isinstance(rec["image"], str):
        raise InputError(f"{where}: image {rec['image']!r} is not a path string")
    return str(task.inside(task.data.parent / rec["image"], "image"))


def task_file_name(prefix: str, name: str) -> str:
    """`prefix + name` if it is a plain file name (letters, digits, `_`, `-`, `.`; not hidden): a
    task name never leads out of --out."""
    full = f"{prefix}{name}"
    if not SAFE_NAME.fullmatch(full) or full.startswith("."):
        raise InputError(f"task name {full!r} (prefix {prefix!r} + name {name!r}): use letters, digits, '_', '-' "
                         "and '.' only: task files are written as OUT/<name>.yaml")
    return full


def _spec(task, rows: list[dict[str, Any]], harness: str) -> dict[str, Any] | None:
    """The task YAML's settings past the dataset, or None when this harness cannot run the task."""
    images = any(r.get("image") for r in rows)
    if task.type == "multiple_choice" and (harness == "lmms-eval" or not images):
        spec = {"output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "choices",
                "doc_to_target": "answer", "target_delimiter": task.options.get("choice_prefix", " "),
                "metric_list": [_metric("acc"), _metric("acc_norm")]}
    elif task.type == "vqa" and harness == "lmms-eval":
        several = all(len(r["answers"]) >= 2 for r in rows)
        spec = {"output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
                "generation_kwargs": {"max_new_tokens": int(task.options.get("max_new_tokens", 16)),
                                      "until": ["\n"], "do_sample": False},
                "process_results": _Function(f"{MODULE}.vqa_process_results"),
                "metric_list": [_metric("exact_match")] + ([_metric("vqa_accuracy")] if several else [])}
    elif task.type == "perplexity" and harness == "lm-eval":
        spec = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                {"metric": "bits_per_byte"}]}
    else:
        return None
    if harness == "lmms-eval":
        spec["doc_to_visual"] = _Function(f"{MODULE}.doc_to_visual")
    return spec


def write_harness_tasks(suite: str | Path, out: str | Path, harness: str = "lmms-eval",
                        prefix: str = DEFAULT_PREFIX, allow_outside: bool = False) -> list[str]:
    """Write the tasks of `suite` that `harness` can run (see the module docstring) into `out`, and
    nowhere else; returns their task names. Images outside the suite's folder are refused unless
    `allow_outside`."""
    from .tasks import load_suite

    if harness not in HARNESSES:
        raise ValueError(f"harness {harness!r}: expected one of {', '.join(HARNESSES)}")
    out = Path(out)
    tasks = load_suite(suite, allow_outside)
    for task in tasks:
        task_file_name(prefix, task.name)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        rows = _rows(task) if task.type in ("multiple_choice", "vqa", "perplexity") else []
        spec = _spec(task, rows, harness) if rows else None
        if spec is None:
            continue
        name = task_file_name(prefix, task.name)
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = {"task": name, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},  # relative: from the cwd
                "test_split": "test"}
        text = yaml.dump({**head, **spec}, Dumper=_TaskDumper, sort_keys=False)
        (out / f"{name}.yaml").write_text(f"# {harness} task written by {MODULE} from {task.data}\n{text}")
        names.append(name)
    if not names:
        raise InputError(f"{suite}: no task that {harness} can run (it runs: "
                         + ("multiple_choice, vqa" if harness == "lmms-eval" else
                            "multiple_choice without images, perplexity") + ")")
    return names


@command("harness_tasks")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m cmoe_vlm.eval.harness_tasks", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", choices=HARNESSES, required=True, help="which harness the task files are for")
    ap.add_argument("--suite", required=True, help="suite folder or YAML, or a <type>*.jsonl task file")
    ap.add_argument("--out", required=True, help="folder for the task files (the harness's --include_path)")
    ap.add_argument("--prefix", default=DEFAULT_PREFIX, help="prefix of the task names (default %(default)s)")
    ap.add_argument("--allow-outside-paths", action="store_true",
                    help="let the suite's images lie outside its folder (refused by default)")
    args = ap.parse_args(argv)
    names = write_harness_tasks(args.suite, args.out, args.harness, args.prefix, args.allow_outside_paths)
    print(f"wrote {len(names)} {args.harness} tasks to {args.out}: {','.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation tasks defined by local files: a suite folder with `suite.yaml` and JSONL records.

    # suite.yaml
    tasks:
      - {name: mc_colour, type: multiple_choice, data: mc_colour.jsonl}
      - {name: vqa, type: vqa, data: vqa.jsonl, max_new_tokens: 16}
      - {name: caption, type: caption, data: caption.jsonl, max_new_tokens: 48}
      - {name: text, type: perplexity, data: text.jsonl}

One JSON object per line; `image` paths are relative to the JSONL file's folder.

    multiple_choice  {"image"?: path, "prompt": str, "choices": [str], "answer": int}
                     Each choice is scored as the continuation `choice_prefix + choice` (default " ")
                     of [image, prompt]; the highest total log-likelihood wins (`acc`), and the
                     highest per-byte log-likelihood (`acc_norm`, lm-eval's length normalisation).
    vqa              {"image"?: path, "question": str, "answers": [str]}
                     Prompt [image, "Question: q Answer:"] (the training layout); greedy generation
                     with the KV cache until eos; `exact_match` after `normalize_answer` against any
                     of the answers.
    caption          {"image": path, "references": [str], "prompt"?: str}
                     Greedy caption of [image, prompt]; BLEU-1..4, CIDEr and ROUGE-L from
                     pycocoevalcap on lower-cased, space-split text (no Java needed). CIDEr's IDF
                     comes from the evaluated set itself, so small sets score oddly: `n` is reported.
    perplexity       {"text": str}
                     Bits per byte (UTF-8), bits per token and token perplexity of each text.

`run_task(runner, task)` returns the metrics dict plus a few `examples`; `load_suite(path)` reads
the YAML (or a single JSONL task file, typed by its name's prefix).
"""
from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from data_pipelines.shards import qa_prompt

from ..runner import ModelRunner, bits_per_byte

TASK_TYPES = ("multiple_choice", "vqa", "caption", "perplexity")
NUM_EXAMPLES = 5  # predictions kept in the results for a quick look


@dataclass
class Task:
    name: str
    type: str
    data: Path
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type {self.type!r} is not one of {', '.join(TASK_TYPES)}")

    def records(self, limit: int | None = None) -> list[dict[str, Any]]:
        if not self.data.is_file():
            raise FileNotFoundError(f"task {self.name!r}: data file {self.data} does not exist")
        out = []
        with self.data.open() as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.data}:{line_no}: {e}") from None
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    break
        if not out:
            raise ValueError(f"task {self.name!r}: {self.data} holds no records")
        return out

    def image(self, rec: dict[str, Any]) -> Image.Image | None:
        if not rec.get("image"):
            return None
        path = self.data.parent / rec["image"]
        with Image.open(path) as img:
            return img.convert("RGB")


def load_suite(path: str | Path) -> list[Task]:
    """Tasks of a suite folder (`suite.yaml` inside), a suite YAML, or one JSONL file whose name
    starts with its type (e.g. `multiple_choice_colours.jsonl`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "suite.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such suite (expected a folder with suite.yaml, a YAML or a JSONL)")
    if path.suffix == ".jsonl":
        kind = next((t for t in TASK_TYPES if path.stem.startswith(t)), None)
        if kind is None:
            raise ValueError(f"{path}: a single task file must be named <type>*.jsonl, type one of {TASK_TYPES}")
        return [Task(path.stem, kind, path.resolve())]
    spec = yaml.safe_load(path.read_text()) or {}
    tasks = []
    for i, t in enumerate(spec.get("tasks", [])):
        missing = [k for k in ("name", "type", "data") if k not in t]
        if missing:
            raise ValueError(f"{path}: tasks[{i}] lacks {', '.join(missing)}")
        opts = {k: v for k, v in t.items() if k not in ("name", "type", "data")}
        tasks.append(Task(t["name"], t["type"], (path.parent / t["data"]).resolve(), opts))
    if not tasks:
        raise ValueError(f"{path}: no tasks listed under 'tasks:'")
    return tasks


# ----------------------------------------------------------------------------- text normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD/VQA-style)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def caption_tokens(text: str) -> str:
    """Lower-cased, punctuation-free, space-joined: the pre-tokenised form pycocoevalcap scores."""
    return " ".join(text.lower().translate(_PUNCT).split())


# ----------------------------------------------------------------------------- runners

def _with_image(task: Task, rec: dict[str, Any], *text: str) -> list[Any]:
    img = task.image(rec)
    return ([img] if img is not None else []) + [t for t in text if t]


def run_multiple_choice(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    prefix = task.options.get("choice_prefix", " ")
    contexts, conts, owners = [], [], []
    recs = task.records(limit)
    for i, rec in enumerate(recs):
        choices, answer = rec["choices"], rec["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{task.data}: record {i}: answer {answer!r} is not an index into its {len(choices)} choices")
        ctx = _with_image(task, rec, rec.get("prompt", ""))
        for c in choices:
            contexts.append(ctx)
            conts.append(prefix + c)
            owners.append(i)
    scores = runner.loglikelihood(contexts, conts)
    per: list[list[tuple[float, float]]] = [[] for _ in recs]
    for s, cont, i in zip(scores, conts, owners):
        per[i].append((s.logprob, s.logprob / max(len(cont.encode()), 1)))
    acc = acc_norm = 0
    examples = []
    for rec, sc in zip(recs, per):
        pick = max(range(len(sc)), key=lambda j: sc[j][0])
        pick_norm = max(range(len(sc)), key=lambda j: sc[j][1])
        acc += pick == rec["answer"]
        acc_norm += pick_norm == rec["answer"]
        if len(examples) < NUM_EXAMPLES:
            examples.append({"prompt": rec.get("prompt", ""), "image": rec.get("image"),
                             "answer": rec["choices"][rec["answer"]], "picked": rec["choices"][pick]})
    n = len(recs)
    chance = sum(1 / len(r["choices"]) for r in recs) / n
    return {"type": task.type, "n": n, "acc": acc / n, "acc_norm": acc_norm / n, "chance": chance,
            "examples": examples}


def run_vqa(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    recs = task.records(limit)
    prompts = [_with_image(task, r, qa_prompt(r["question"])) for r in recs]
    preds = runner.generate(prompts, int(task.options.get("max_new_tokens", 16)), stop=("\n",))
    hits, examples = 0, []
    for rec, pred in zip(recs, preds):
        answers = rec["answers"] if isinstance(rec["answers"], list) else [rec["answers"]]
        ok = normalize_answer(pred) in {normalize_answer(a) for a in answers}
        hits += ok
        if len(examples) < NUM_EXAMPLES:
            examples.append({"question": rec["question"], "answers": answers, "prediction": pred, "correct": ok})
    return {"type": task.type, "n": len(recs), "exact_match": hits / len(recs), "examples": examples}


def caption_scores(refs: dict[str, list[str]], preds: dict[str, str]) -> dict[str, float]:
    """BLEU-1..4, CIDEr, ROUGE-L (pycocoevalcap) of predictions against references, both raw text."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise ImportError(f"caption metrics need pycocoevalcap (pip install 'cmoe-vlm[eval]'): {e}") from None
    gts = {k: [caption_tokens(r) for r in v] for k, v in refs.items()}
    res = {k: [caption_tokens(preds[k]) or "<empty>"] for k in refs}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**{f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}, "cider": float(cider), "rouge_l": float(rouge)}


def run_caption(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    recs = task.records(limit)
    prompts = [_with_image(task, r, r.get("prompt", "")) for r in recs]
    preds = runner.generate(prompts, int(task.options.get("max_new_tokens", 48)), stop=("\n",))
    refs = {str(i): r["references"] for i, r in enumerate(recs)}
    out: dict[str, Any] = {"type": task.type, "n": len(recs)}
    try:
        out.update(caption_scores(refs, {str(i): p for i, p in enumerate(preds)}))
    except ImportError as e:
        out["metrics_unavailable"] = str(e)
    out["exact_match"] = sum(normalize_answer(p) in {normalize_answer(r) for r in rec["references"]}
                             for p, rec in zip(preds, recs)) / len(recs)
    out["examples"] = [{"references": r["references"], "prediction": p} for r, p in zip(recs[:NUM_EXAMPLES], preds)]
    return out


def run_perplexity(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    recs = task.records(limit)
    nll = 0.0
    tokens = nbytes = 0
    for rec in recs:
        n, t = runner.text_nll(rec["text"])
        nll, tokens, nbytes = nll + n, tokens + t, nbytes + len(rec["text"].encode())
    return {"type": task.type, "n": len(recs), "bits_per_byte": bits_per_byte(nll, nbytes),
            "bits_per_token": nll / math.log(2) / tokens, "token_perplexity": math.exp(nll / tokens),
            "tokens": tokens, "bytes": nbytes}


RUNNERS = {"multiple_choice": run_multiple_choice, "vqa": run_vqa, "caption": run_caption,
           "perplexity": run_perplexity}


def run_task(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    limit = task.options.get("limit", limit)
    return RUNNERS[task.type](runner, task, limit)


# Metric shown for each task type in the side-by-side table (higher is better unless noted).
HEADLINE = {"multiple_choice": "acc", "vqa": "exact_match", "caption": "cider", "perplexity": "bits_per_byte"}

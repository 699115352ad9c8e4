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
                     The usual field names of lm-eval / lmms-eval datasets are accepted too (see
                     MC_PROMPT_FIELDS, MC_CHOICE_FIELDS, MC_ANSWER_FIELDS): e.g. `question`,
                     `options` or ARC's {"text": [...], "label": [...]} or columns A, B, C, ...;
                     the answer as an index, a digit string, a choice's text or its letter/label.
                     A record with none of them, or with two candidates for one role, is an error
                     naming the record; task options prompt_field (a field or a list joined by
                     newlines), choices_field and answer_field choose explicitly.
    vqa              {"image"?: path, "question": str, "answers": [str]}
                     Prompt [image, "Question: q Answer:"] (the training layout; a "prompt" field
                     is used as it is instead); greedy generation with the KV cache until eos or a
                     newline. `exact_match` (after `normalize_answer`) against any of the answers
                     ("answers": [str] or VQA v2's [{"answer": str}, ...], or "answer": str), and,
                     when every record has several answers, `vqa_accuracy`: the standard VQA
                     accuracy with the official normalisation (cmoe_vlm/eval/vqa_metric.py).
    caption          {"image": path, "references": [str], "prompt"?: str}
                     Greedy caption of [image, prompt]; BLEU-1..4, CIDEr and ROUGE-L from
                     pycocoevalcap on lower-cased, space-split text (no Java needed). CIDEr's IDF
                     comes from the evaluated set itself, so small sets score oddly: `n` is reported.
    perplexity       {"text": str}
                     Bits per byte (UTF-8), bits per token and token perplexity of each text.

Task option `chat: true` (or `cmoe-eval --chat` for every task) asks as a conversation: the prompt
(a VQA record's bare question) and image become a user turn rendered with the tokenizer's chat
template (data_pipelines/chat.py: its own, else the documented default) up to the assistant's cue,
the layout `chat` training data has; choices and generations are the assistant's reply.

`run_task(runner, task)` returns the metrics dict plus a few `examples`; `load_suite(path)` reads
the YAML (or a single JSONL task file, typed by its name's prefix).
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from PIL import Image

from cmoe_base.commands import InputError, json_object
from data_pipelines.chat import Message, render_chat
from data_pipelines.images import check_regular_file, open_image
from data_pipelines.shards import qa_prompt

from .vqa_metric import vqa_accuracy

if TYPE_CHECKING:  # loads torch: the task files are read and written without it (harness_tasks)
    from ..inference.runner import ModelRunner

TASK_TYPES = ("multiple_choice", "vqa", "caption", "perplexity")
NUM_EXAMPLES = 5  # predictions kept in the results for a quick look


@dataclass
class Task:
    """One task of a suite. Its data file and images lie inside `root` (the suite's folder) unless
    `allow_outside` (cmoe-eval --allow-outside-paths)."""

    name: str
    type: str
    data: Path
    options: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None
    allow_outside: bool = False

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise InputError(f"task {self.name!r}: type {self.type!r} is not one of {', '.join(TASK_TYPES)}")
        self.root = (self.root or self.data.parent).resolve()
        self.data = self.inside(self.data, "data file")
        limit = self.options.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise InputError(f"task {self.name!r}: limit = {limit!r}: must be an integer >= 1")

    def inside(self, path: str | Path, what: str) -> Path:
        """`path` resolved (links followed), refused outside the suite's folder unless allowed."""
        resolved = Path(path).resolve()
        if not self.allow_outside and resolved != self.root and self.root not in resolved.parents:
            raise InputError(f"task {self.name!r}: {what} {path} is outside the suite's folder {self.root} "
                             "(pass --allow-outside-paths to read it)")
        return resolved

    def records(self, limit: int | None = None) -> list[dict[str, Any]]:
        check_regular_file(self.data, f"task {self.name!r}: data file")
        out = []
        try:
            with self.data.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if limit is not None and len(out) >= limit:
                        break
                    if line.strip():
                        out.append(json_object(line, f"{self.data}:{line_no}"))
        except UnicodeDecodeError as e:
            raise InputError(f"{self.data}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not out:
            raise InputError(f"task {self.name!r}: {self.data} holds no records")
        return out

    def image(self, rec: dict[str, Any]) -> Image.Image | None:
        if not rec.get("image"):
            return None
        if not isinstance(rec["image"], str):
            raise InputError(f"{self.data}: image {rec['image']!r} is not a path string")
        return open_image(self.inside(self.data.parent / rec["image"], "image"))


def load_suite(path: str | Path, allow_outside: bool = False) -> list[Task]:
    """Tasks of a suite folder (`suite.yaml` inside), a suite YAML, or one JSONL file whose name
    starts with its type (e.g. `multiple_choice_colours.jsonl`). Data files and images must lie in
    the suite's folder unless `allow_outside`."""
    path = Path(path)
    if path.is_dir():
        path = path / "suite.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such suite (expected a folder with suite.yaml, a YAML or a JSONL)")
    if path.suffix == ".jsonl":
        kind = next((t for t in TASK_TYPES if path.stem.startswith(t)), None)
        if kind is None:
            raise InputError(f"{path}: a single task file must be named <type>*.jsonl, type one of {TASK_TYPES}")
        return [Task(path.stem, kind, path.resolve(), allow_outside=allow_outside)]
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
    entries = spec.get("tasks") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: expected a mapping with a non-empty list under 'tasks:'")
    tasks = [_suite_task(path, i, t, allow_outside) for i, t in enumerate(entries)]
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{path}: task names {repeated} appear more than once: results are keyed by name")
    return tasks


def _suite_task(path: Path, i: int, t: Any, allow_outside: bool) -> Task:
    if not isinstance(t, dict):
        raise InputError(f"{path}: tasks[{i}] must be a mapping with name, type and data")
    missing = [k for k in ("name", "type", "data") if k not in t]
    if missing:
        raise InputError(f"{path}: tasks[{i}] lacks {', '.join(missing)}")
    bad = [k for k in ("name", "type", "data") if not isinstance(t[k], str) or not t[k]]
    if bad:
        raise InputError(f"{path}: tasks[{i}]: {', '.join(bad)} must be non-empty strings")
    opts = {k: v for k, v in t.items() if k not in ("name", "type", "data")}
    return Task(t["name"], t["type"], path.parent / t["data"], opts, root=path.parent, allow_outside=allow_outside)


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

def _with_image(runner: ModelRunner, task: Task, rec: dict[str, Any], *text: str) -> list[Any]:
    """The prompt pieces: [image?, text...], or with the task's `chat` option that user turn rendered
    by the tokenizer's chat template, ending with the assistant's cue."""
    img = task.image(rec)
    pieces = ([img] if img is not None else []) + [t for t in text if t]
    if not task.options.get("chat"):
        return pieces
    return render_chat([Message("user", pieces)], runner.tok.chat_template, add_generation_prompt=True)


# Field names of multiple-choice records, in lm-eval / lmms-eval datasets and ours.
MC_PROMPT_FIELDS = ("prompt", "question", "query", "context", "ctx", "question_stem", "goal", "sentence", "input")
MC_CHOICE_FIELDS = ("choices", "options", "endings", "candidates", "answers")
MC_ANSWER_FIELDS = ("answer", "label", "target", "gold", "answerKey", "answer_idx")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _one_field(rec: dict[str, Any], fields: tuple[str, ...], chosen: str | None, role: str, where: str,
               option: str) -> str:
    if chosen is not None:
        if chosen not in rec:
            raise InputError(f"{where}: no field {chosen!r} ({option} of the task); the record has {sorted(rec)}")
        return chosen
    found = [f for f in fields if f in rec]
    if len(found) > 1:
        raise InputError(f"{where}: several {role} fields {found}: set {option} for the task to choose")
    if not found:
        raise InputError(f"{where}: no {role} field: expected one of {', '.join(fields)} (or set {option} for the "
                         f"task); the record has {sorted(rec)}")
    return found[0]


def multiple_choice_fields(rec: dict[str, Any], where: str, options: dict[str, Any] | None = None
                           ) -> tuple[str, list[str], int]:
    """(prompt, choices, answer index) of a multiple-choice record, from the usual field names
    (see the module docstring). `where` names the record in errors."""
    options = options or {}
    chosen = options.get("prompt_field")
    if isinstance(chosen, list):
        missing = [f for f in chosen if f not in rec]
        if missing:
            raise InputError(f"{where}: no field(s) {missing} (prompt_field of the task); the record has {sorted(rec)}")
        prompt = "\n".join(str(rec[f]) for f in chosen)
    else:
        prompt = rec[_one_field(rec, MC_PROMPT_FIELDS, chosen, "prompt", where, "prompt_field")]
    if not isinstance(prompt, str):
        raise InputError(f"{where}: the prompt is a {type(prompt).__name__}, expected a string")

    labels: list[str] | None = None
    if options.get("choices_field") is None and not any(f in rec for f in MC_CHOICE_FIELDS) and \
            "A" in rec and "B" in rec:  # MMBench-style columns A, B, C, ...
        labels = []
        for c in LETTERS:  # up to the first missing, None or NaN column
            if rec.get(c) is None or rec[c] != rec[c]:
                break
            labels.append(c)
        choices = [rec[c] for c in labels]
    else:
        choices = rec[_one_field(rec, MC_CHOICE_FIELDS, options.get("choices_field"), "choices", where,
                                 "choices_field")]
        if isinstance(choices, dict) and isinstance(choices.get("text"), list):  # ARC / OpenBookQA / CSQA
            labels = [str(x) for x in choices["label"]] if isinstance(choices.get("label"), list) else None
            choices = choices["text"]
    if not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
        raise InputError(f"{where}: choices must be a list of at least 2 strings, got {choices!r}")
    choices = [str(c) for c in choices]
    if not all(c.strip() for c in choices):
        raise InputError(f"{where}: a choice is empty, got {choices!r}")

    answer = rec[_one_field(rec, MC_ANSWER_FIELDS, options.get("answer_field"), "answer", where, "answer_field")]
    return prompt, choices, _answer_index(answer, choices, labels, where)


def _answer_index(answer: Any, choices: list[str], labels: list[str] | None, where: str) -> int:
    """An answer given as an index, a digit string, a choice's text, or its label / letter."""
    n = len(choices)
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and choices.count(answer) == 1:
        index = choices.index(answer)
    elif isinstance(answer, str) and labels is not None and answer in labels:
        index = labels.index(answer)
    elif isinstance(answer, str) and labels is None and len(answer) == 1 and answer in LETTERS:
        index = LETTERS.index(answer)
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer)
    else:
        raise InputError(f"{where}: answer {answer!r} is not an index, a choice, or a choice's label/letter "
                         f"(choices {choices})")
    if not 0 <= index < n:
        raise InputError(f"{where}: answer {answer!r} is not an index into its {n} choices")
    return index


def run_multiple_choice(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    prefix = task.options.get("choice_prefix", " ")
    contexts, conts, owners, items = [], [], [], []
    recs = task.records(limit)
    for i, rec in enumerate(recs):
        prompt, choices, answer = multiple_choice_fields(rec, f"{task.data}: record {i + 1}", task.options)
        items.append((prompt, choices, answer))
        ctx = _with_image(runner, task, rec, prompt)
        for c in choices:
            contexts.append(ctx)
            conts.append(prefix + c)
            owners.append(i)
    scores = runner.loglikelihood(contexts, conts)
    per: list[list[tuple[float, float]]] = [[] for _ in recs]
    for s, cont, i in zip(scores, conts, owners):
        per[i].append((s.logprob, s.logprob / max(len(cont.encode()), 1)))
    acc = acc_norm = answer_logprob = 0.0
    examples = []
    for rec, (prompt, choices, answer), sc in zip(recs, items, per):
        pick = max(range(len(sc)), key=lambda j: sc[j][0])
        pick_norm = max(range(len(sc)), key=lambda j: sc[j][1])
        acc += pick == answer
        acc_norm += pick_norm == answer
        top = sc[pick][0]
        answer_logprob += sc[answer][0] - top - math.log(sum(math.exp(s - top) for s, _ in sc))
        if len(examples) < NUM_EXAMPLES:
            examples.append({"prompt": prompt, "image": rec.get("image"), "answer": choices[answer],
                             "picked": choices[pick]})
    n = len(recs)
    chance = sum(1 / len(choices) for _, choices, _ in items) / n
    # answer_logprob: mean log-probability of the answer among the choices (chance: mean −log #choices);
    # finer than accuracy where a model is near chance
    return {"type": task.type, "n": n, "acc": acc / n, "acc_norm": acc_norm / n, "chance": chance,
            "answer_logprob": answer_logprob / n, "chance_logprob": sum(-math.log(len(c)) for _, c, _ in items) / n,
            "examples": examples}


VQA_QUESTION_FIELDS = ("question", "query")
VQA_ANSWER_FIELDS = ("answers", "answer")


def vqa_fields(rec: dict[str, Any], where: str, chat: bool = False) -> tuple[str, list[str]]:
    """(prompt text, human answers) of a VQA record: `prompt` as it is, else qa_prompt(question) (with
    `chat`: the bare question, the user's turn);
    answers from "answers" ([str] or [{"answer": str}]) or "answer" (str or [str])."""
    if isinstance(rec.get("prompt"), str):
        prompt = rec["prompt"]
    else:
        field = next((f for f in VQA_QUESTION_FIELDS if isinstance(rec.get(f), str)), None)
        if field is None:
            raise InputError(f"{where}: no question: expected a string field prompt, "
                             f"{' or '.join(VQA_QUESTION_FIELDS)}; the record has {sorted(rec)}")
        prompt = rec[field] if chat else qa_prompt(rec[field])
    field = next((f for f in VQA_ANSWER_FIELDS if rec.get(f) not in (None, "", [])), None)
    if field is None:
        raise InputError(f"{where}: no answers: expected {' or '.join(VQA_ANSWER_FIELDS)}; the record has {sorted(rec)}")
    answers = rec[field] if isinstance(rec[field], list) else [rec[field]]
    answers = [a["answer"] if isinstance(a, dict) and "answer" in a else a for a in answers]
    if not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: answers must be strings (or {{'answer': str}}), got {rec[field]!r}")
    return prompt, answers


def run_vqa(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    recs = task.records(limit)
    fields = [vqa_fields(r, f"{task.data}: record {i + 1}", bool(task.options.get("chat"))) for i, r in enumerate(recs)]
    prompts = [_with_image(runner, task, r, prompt) for r, (prompt, _) in zip(recs, fields)]
    preds = runner.generate(prompts, int(task.options.get("max_new_tokens", 16)), stop=("\n",))
    hits, vqa, examples = 0, 0.0, []
    for rec, (prompt, answers), pred in zip(recs, fields, preds):
        ok = normalize_answer(pred) in {normalize_answer(a) for a in answers}
        hits += ok
        vqa += vqa_accuracy(pred, answers)
        if len(examples) < NUM_EXAMPLES:
            examples.append({"prompt": prompt, "answers": answers, "prediction": pred, "correct": ok})
    n = len(recs)
    out: dict[str, Any] = {"type": task.type, "n": n, "exact_match": hits / n}
    fewest = min(len(a) for _, a in fields)
    if fewest >= 2:
        out["vqa_accuracy"] = vqa / n
    else:
        out["vqa_accuracy_unavailable"] = ("some records have a single answer; VQA accuracy needs several human "
                                           "answers per question (10 in VQA v2)")
    out["answers_per_question"] = {"min": fewest, "max": max(len(a) for _, a in fields)}
    out["examples"] = examples
    return out


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


def caption_references(rec: dict[str, Any], where: str) -> list[str]:
    """The references of a caption record: a list of strings, or one string (one reference)."""
    refs = rec.get("references")
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise InputError(f"{where}: references must be a non-empty string or list of strings, got {refs!r}")
    return refs


def run_caption(runner: ModelRunner, task: Task, limit: int | None = None) -> dict[str, Any]:
    recs = task.records(limit)
    for i, r in enumerate(recs):
        r["references"] = caption_references(r, f"{task.data}: record {i + 1}")
    prompts = [_with_image(runner, task, r, r.get("prompt", "")) for r in recs]
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
    from ..inference.runner import bits_per_byte

    recs = task.records(limit)
    nll = 0.0
    tokens = nbytes = 0
    for i, rec in enumerate(recs):
        if not isinstance(rec.get("text"), str) or not rec["text"]:
            raise InputError(f"{task.data}: record {i + 1}: a perplexity record needs a non-empty string 'text'")
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

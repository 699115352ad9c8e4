"""Long-context probes generated on the fly: passkey retrieval and needle in a haystack.

For every context length L (tokens, default 1024, 2048, ... up to the model's max_seq_len) and
depth d (0 = the needle right after the opening line, 1 = just before the question), `samples`
prompts are built with a fresh random key each, seeded by (seed, probe, L, d, i):

    passkey  the built-in training format: "There is a pass key hidden in this text. " + filler with
             "The pass key is 48213. Remember it. 48213 is the pass key. " inserted at depth d,
             then "What is the pass key? The pass key is" → " 48213".
    needle   a haystack of multiplication tables (the other built-in long-text kind) with
             "The secret number of the <word> is 7291." inserted at depth d, then
             "What is the secret number of the <word>? The secret number of the <word> is" → " 7291".

Scoring: the prompt + answer go through one forward pass. `accuracy` counts a sample as solved
when every answer token is the argmax given the correct tokens before it, which is exactly when
greedy decoding (`generate`, temperature 0) would produce the answer (the cached and uncached
forwards agree, see tests/cmoe_vlm/test_generation.py); `digit_accuracy` gives partial credit per
answer token, `answer_logprob` the answer's log-likelihood. `greedy_check=k` also decodes the first
k samples of each cell with `generate` and records any disagreement (there should be none).

Outputs (`run_probes` + `write_report`): JSON with every cell, a markdown table, and a heatmap PNG
per probe (length × depth, colour = accuracy).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmoe_base import Modality
from data_pipelines.builtin import FILLER, WORDS
from data_pipelines.sequence import TokenSequence

from ..inference.runner import ModelRunner

PROBES = ("passkey", "needle")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def default_lengths(max_seq_len: int, start: int = 1024) -> list[int]:
    """1K, 2K, 4K, ... up to max_seq_len (which is included even if not a power of two)."""
    out, n = [], start
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return out + [max_seq_len]


def _tables(rng: random.Random) -> str:
    a = rng.randint(2, 12)
    return "\n".join([f"Table of {a}:"] + [f"{a} times {b} is {a * b}." for b in range(1, 11)]) + "\n"


@dataclass
class ProbeItem:
    prompt: str   # ends right before the answer
    answer: str   # with its leading space
    key: str


def make_probe(probe: str, length: int, depth: float, rng: random.Random, tokenizer) -> ProbeItem:
    """A prompt + answer of about `length` tokens (bos included) with the needle at `depth`."""
    if probe == "passkey":
        key = str(rng.randint(10000, 99999))
        head = "There is a pass key hidden in this text. "
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        tail = "What is the pass key? The pass key is"
        filler = lambda: FILLER  # noqa: E731
    elif probe == "needle":
        key, word = str(rng.randint(1000, 9999)), rng.choice(WORDS)
        head = "Here are some tables.\n"
        needle = f"The secret number of the {word} is {key}.\n"
        tail = f"What is the secret number of the {word}? The secret number of the {word} is"
        filler = lambda: _tables(rng)  # noqa: E731
    else:
        raise ValueError(f"probe {probe!r}: expected one of {PROBES}")
    answer = f" {key}"
    fixed = 1 + sum(len(tokenizer.encode(s)) for s in (head, needle, tail, answer)) + 2  # + 2 separators
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"{probe} at length {length}: the probe alone needs {fixed} tokens")

    def take(n_tokens: int) -> str:
        """Whole filler pieces, then a partial one: about n_tokens of haystack."""
        hay, used = [], 0
        while used < n_tokens:
            ids = tokenizer.encode(filler())
            hay.append(tokenizer.decode(ids[:n_tokens - used]))
            used += min(len(ids), n_tokens - used)
        return "".join(hay)

    def build(text: str) -> str:
        # the needle goes at a sentence/line boundary of the haystack nearest to the requested depth
        cuts = [0] + [i + 1 for i, ch in enumerate(text) if ch in ".\n" and i + 1 < len(text)] + [len(text)]
        at = min(cuts, key=lambda c: abs(c - depth * len(text)))
        left, right = text[:at].rstrip(" "), text[at:].strip(" ")
        join = lambda s: s + ("" if not s or s.endswith("\n") else " ")  # noqa: E731
        return head + join(left) + needle + join(right) + tail

    text = take(budget)
    for attempt in range(8):  # separators depend on where the needle lands: adjust the haystack's end
        prompt = build(text)   # (then its start) until the probe has exactly `length` tokens
        diff = length - 1 - len(tokenizer.encode(prompt + answer))
        if diff == 0:
            break
        ids = tokenizer.encode(text)
        if attempt < 4:
            text = text + take(diff) if diff > 0 else tokenizer.decode(ids[:diff])
        else:
            text = take(diff) + text if diff > 0 else tokenizer.decode(ids[-diff:])
    return ProbeItem(prompt, answer, key)


@torch.no_grad()
def score_items(runner: ModelRunner, items: list[ProbeItem]) -> list[dict[str, Any]]:
    """Forced scoring of each answer: solved (greedy would produce it), per-token accuracy, logprob."""
    out = []
    for it in items:  # one at a time: long rows, and memory grows with length²
        seq = runner.sequence([it.prompt])
        ans = runner.tok.encode(it.answer)
        n_ctx = len(seq)
        full = TokenSequence(input_ids=seq.input_ids + ans, modality=seq.modality + [int(Modality.TEXT)] * len(ans))
        runner._check_len(len(full), "probe")
        logits = runner.logits([full])
        logp = F.log_softmax(logits[0, n_ctx - 1:n_ctx - 1 + len(ans)], dim=-1)
        target = torch.tensor(ans)
        hit = logp.argmax(-1) == target
        out.append({"solved": bool(hit.all()), "token_accuracy": float(hit.float().mean()),
                    "answer_logprob": float(logp.gather(1, target[:, None]).sum()),
                    "tokens": len(full)})
    return out


def run_probes(runner: ModelRunner, probes: tuple[str, ...] = PROBES, lengths: list[int] | None = None,
               depths: tuple[float, ...] = DEFAULT_DEPTHS, samples: int = 3, seed: int = 0,
               greedy_check: int = 0) -> dict[str, Any]:
    """Accuracy per (probe, length, depth). Lengths above the model's max_seq_len are an error."""
    lengths = lengths or default_lengths(runner.max_len)
    too_long = [n for n in lengths if n > runner.max_len]
    if too_long:
        raise ValueError(f"lengths {too_long} exceed the model's max_seq_len = {runner.max_len}")
    cells = []
    for probe in probes:
        for length in lengths:
            for depth in depths:
                rng = random.Random(f"{seed}-{probe}-{length}-{depth}")
                items = [make_probe(probe, length, depth, rng, runner.tok) for _ in range(samples)]
                scores = score_items(runner, items)
                cell = {"probe": probe, "length": length, "depth": depth, "n": samples,
                        "accuracy": sum(s["solved"] for s in scores) / samples,
                        "token_accuracy": sum(s["token_accuracy"] for s in scores) / samples,
                        "answer_logprob": sum(s["answer_logprob"] for s in scores) / samples}
                if greedy_check:
                    gen = runner.generate([[it.prompt] for it in items[:greedy_check]],
                                          max_new_tokens=len(runner.tok.encode(items[0].answer)))
                    cell["greedy"] = [g for g in gen]
                    cell["greedy_disagreements"] = sum((g == it.answer) != s["solved"]
                                                       for g, it, s in zip(gen, items, scores))
                cells.append(cell)
    summary = {}
    for probe in probes:
        pc = [c for c in cells if c["probe"] == probe]
        summary[probe] = {"accuracy": sum(c["accuracy"] for c in pc) / len(pc),
                          "token_accuracy": sum(c["token_accuracy"] for c in pc) / len(pc),
                          "by_length": {str(n): sum(c["accuracy"] for c in pc if c["length"] == n) / len(depths)
                                        for n in lengths}}
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "seed": seed,
            "summary": summary, "cells": cells}


def markdown_table(results: dict[str, Any], probe: str, metric: str = "accuracy") -> str:
    depths, lengths = results["depths"], results["lengths"]
    rows = [f"| {probe} {metric} | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
            "|---|" + "---|" * (len(depths) + 1)]
    for n in lengths:
        vals = [next(c[metric] for c in results["cells"] if c["probe"] == probe and c["length"] == n
                     and c["depth"] == d) for d in depths]
        rows.append(f"| {n} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |")
    return "\n".join(rows)


def heatmap(results: dict[str, Any], probe: str, path: Path, title: str = "", metric: str = "accuracy") -> Path:
    """One cell per (needle depth, context length), its value written in it; large enough to read
    when embedded (at least 720 × 540 px)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    from ..inspection.plots import annotate_cells

    depths, lengths = results["depths"], results["lengths"]
    grid = np.array([[next(c[metric] for c in results["cells"] if c["probe"] == probe and c["length"] == n
                           and c["depth"] == d) for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 1.5 * len(lengths)), max(4.5, 1.8 + 0.8 * len(depths))))
    cmap = colormaps["RdYlGn"]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto", extent=(0, len(lengths), len(depths), 0))
    annotate_cells(ax, grid, cmap, 0, 1, fontsize=13)
    ax.set_xticks(np.arange(len(lengths)) + 0.5, [str(n) for n in lengths], fontsize=11)
    ax.set_yticks(np.arange(len(depths)) + 0.5, [f"{d:.0%}" for d in depths], fontsize=11)
    ax.set_xlabel("context length (tokens)", fontsize=12)
    ax.set_ylabel("needle depth (0% = start)", fontsize=12)
    ax.set_title(title or f"{probe}: {metric} ({results['samples']} samples per cell)", fontsize=12)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(metric, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path, label: str = "") -> dict[str, str]:
    """JSON + markdown + one heatmap PNG per probe under out_dir; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(results, indent=2))
    probes = list(results["summary"])
    md = "\n\n".join(markdown_table(results, p) for p in probes)
    (out / "long_context.md").write_text(md + "\n")
    paths = {"json": str(out / "long_context.json"), "markdown": str(out / "long_context.md")}
    for p in probes:
        title = f"{label + ': ' if label else ''}{p} accuracy ({results['samples']} samples per cell)"
        paths[f"heatmap_{p}"] = str(heatmap(results, p, out / f"heatmap_{p}.png", title))
    return paths

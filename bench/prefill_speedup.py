#!/usr/bin/env python
"""Prefill time of exported models side by side, with their own learned boundaries (issue 9).

    python bench/prefill_speedup.py --model runs/base/final --model runs/conv/final --length 8192

Each model prefills the same text (held-out built-in text documents, repeated to the length) with
`InferenceSession.prefill`; repetitions are interleaved across models and the median is reported, with
the speedup over the first model and the compression ratio the model actually reached on that
text (unlike bench_latency.py, boundaries are not forced: this is the trained chunker's R).
Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_core.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch  # noqa: E402

from cmoe_base import Batch  # noqa: E402
from cmoe_vlm.checkpoints.export import load_pretrained  # noqa: E402
from cmoe_vlm.inference.session import InferenceSession  # noqa: E402
from data_pipelines.builtin import HELDOUT_SEED_OFFSET, builtin_samples  # noqa: E402
from data_pipelines.tokenizer import load_tokenizer  # noqa: E402


def text_ids(length: int, tokenizer, text_file: str | None = None) -> torch.Tensor:
    """(1, length) token ids: a text file, or held-out built-in text documents, repeated to the length."""
    if text_file:
        docs = [Path(text_file).read_text()]
    else:
        docs = [s["txt"].decode() for s in builtin_samples(400, seed=HELDOUT_SEED_OFFSET) if set(s) == {"txt"}]
    ids: list[int] = []
    while len(ids) < length:
        for d in docs:
            ids += tokenizer.encode(d + "\n")
    return torch.tensor([ids[:length]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="export folder; the first is the reference")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--text", default=None, help="text file to prefill (default: held-out built-in text)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/prefill_speedup.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    models = {}
    for folder in args.model:
        vlm, meta = load_pretrained(folder)
        models[folder] = vlm.eval()
    ids = text_ids(args.length, load_tokenizer(meta.get("tokenizer", "byte")), args.text)
    batch = Batch.of(ids)
    times: dict[str, list[float]] = {k: [] for k in models}
    concepts = {}
    for k, m in models.items():  # warm-up, and the reached compression
        session = InferenceSession(m)
        session.prefill(batch)
        concepts[k] = int(session.state.num_concepts[0])
    for rep in range(args.reps):
        order = list(models)[rep % len(models):] + list(models)[:rep % len(models)]
        for k in order:
            t0 = time.perf_counter()
            InferenceSession(models[k]).prefill(batch)
            times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times[args.model[0]])
    rows = [{"model": k, "median_s": statistics.median(t), "times_s": t, "speedup": ref / statistics.median(t),
             "ratio": args.length / max(concepts[k], 1)} for k, t in times.items()]
    for r in rows:
        print(f"{r['model']}: {r['median_s']:.2f} s, speedup {r['speedup']:.2f}x, R {r['ratio']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"length": args.length, "threads": args.threads,
                                         "loadavg": list(os.getloadavg()), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Loader throughput on built-in shards: samples/s, tokens/s and memory (RSS) over time.

    python bench/bench_loader.py --out runs/bench_loader.json [--seconds 30] [--workers 2]

Writes built-in shards to a temporary folder unless --data names a shard folder. samples/s counts
documents started (bos tokens), tokens/s non-padding tokens. RSS is the main process plus its
DataLoader workers, sampled every --rss-every seconds, so a long run (--seconds 600) shows
whether memory stays flat.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from data_pipelines.builtin import write_builtin_dataset
from data_pipelines.loader import DataConfig, StreamingLoader


def rss_mib(pid: int | None = None) -> float:
    """Resident memory of a process and its children, MiB (Linux /proc)."""
    pid = pid or os.getpid()
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_mib(int(child))
    except FileNotFoundError:  # the process ended while we looked
        pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--data", help="shard folder (default: fresh built-in shards)")
    parser.add_argument("--num-train", type=int, default=4000, help="built-in samples to generate")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to stream")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens-per-image", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    data = args.data or str(write_builtin_dataset(tmp.name, num_train=args.num_train, num_heldout=10)["train"])
    cfg = DataConfig(shards=data, seq_len=args.seq_len, batch_size=args.batch_size, num_workers=args.workers,
                     image_size=args.image_size, tokens_per_image=args.tokens_per_image, steps_per_epoch=10**9)
    loader = StreamingLoader(cfg)
    bos = loader.tokenizer.bos_id
    totals = {"batches": 0, "samples": 0, "tokens": 0, "images": 0}
    rss = [(0.0, rss_mib())]
    start = time.perf_counter()
    first_batch_s = None
    for batch in loader:
        now = time.perf_counter() - start
        first_batch_s = first_batch_s or now
        totals["batches"] += 1
        totals["samples"] += int((batch.input_ids == bos).sum())
        totals["tokens"] += int((batch.doc_ids >= 0).sum())
        totals["images"] += int(batch.num_images.sum())
        if now - rss[-1][0] >= args.rss_every:
            rss.append((now, rss_mib()))
        if now >= args.seconds:
            break
    elapsed = time.perf_counter() - start
    result = {
        "config": {**vars(args), "data": data},
        "elapsed_s": round(elapsed, 2),
        "first_batch_s": round(first_batch_s or 0.0, 2),
        **totals,
        "samples_per_s": round(totals["samples"] / elapsed, 1),
        "tokens_per_s": round(totals["tokens"] / elapsed, 1),
        "images_per_s": round(totals["images"] / elapsed, 1),
        "batches_per_s": round(totals["batches"] / elapsed, 2),
        "rss_mib": [[round(t, 1), round(m, 1)] for t, m in rss],
        "peak_rss_mib": round(max(m for _, m in rss), 1),
        "skipped": loader.skipped,
        "cpu_count": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "rss_mib")}))


if __name__ == "__main__":
    main()

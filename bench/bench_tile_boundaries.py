"""Tile edges as forced chunk boundaries or learned ones (`vision.tile_boundaries`), measured (issue 27).

    python bench/bench_tile_boundaries.py --out bench/results/tile_boundaries [--steps 300]

Trains configs/tiny_sizes.yaml with tiles instead of own sizes (`vision.max_tiles` 4 of img_size 64 px,
no max_pixels) once per choice on the built-in data of several sizes (`--builtin` writes it if missing),
OMP_NUM_THREADS=1 each, both at once; a run folder that already holds `final/` is measured as it is.
Then, per model, on held-out built-in documents of several sizes (eval mode, p >= 0.5):
  - per tiled image (rows × cols > 1): image concepts of its thumbnail and of its tiles, and its tile
    edges (each tile's last token but the last tile's): how many carry no boundary, i.e. how many a
    concept straddles (always 0 when forced);
  - the run's end-of-training held-out LM loss (train.heldout_shards, summary.json; its predicted
    tokens include the layout's markers: forced has two per tile and a newline per tile row more);
  - the built-in suite drawn at several sizes (`cmoe_vlm.eval.builtin_suite --sizes mixed`) through
    cmoe-eval: mc accuracies.
Writes OUT/tile_boundaries.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: runtime defaults before torch
import numpy as np

from cmoe_base import Tiles
from data_pipelines.images import to_rgb
from data_pipelines.sequence import build_sequence

MODES = ("forced", "learned")
TILED = ["vision.max_pixels=null", "vision.min_pixels=null", "vision.dynamic_img_size=false", "vision.max_tiles=4"]


def tile_records(runner, docs: list[list], batch_size: int = 8) -> list[dict]:
    """One record per tiled image of `docs` (lists of text pieces and PIL images): its grid, the image
    concepts (boundaries) of its thumbnail and of its tiles, and the boundary at each tile edge."""
    n = runner.model.cfg.tokens_per_image  # tokens per tile (every tile is img_size)
    seqs, tiled = [], []
    for pieces in docs:
        pieces = [p if isinstance(p, str) else runner.transform(to_rgb(p)) for p in pieces]  # Tiles or tensors
        seq = build_sequence(pieces, runner.tok, runner.tokens_per_image, add_bos=True, add_eos=True)
        if len(seq) > runner.max_len:
            continue
        spans, k, found = seq.image_spans, 0, []
        for p in pieces:
            if isinstance(p, str):
                continue
            if isinstance(p, Tiles):
                tiles = spans[k + 1:k + 1 + p.rows * p.cols]
                starts = ([tiles[0][0] + 1 + i * n for i in range(len(tiles))] if not p.forced
                          else [s + 1 for s, _ in tiles])  # each tile's first image token
                found.append((p.rows, p.cols, spans[k][0] + 1, starts))
                k += 1 + p.rows * p.cols
            else:
                k += 1
        seqs.append(seq)
        tiled.append(found)
    records = []
    for i in range(0, len(seqs), batch_size):
        out, _ = runner.forward(seqs[i:i + batch_size])
        b = out.boundaries.cpu().numpy()
        for row, found in enumerate(tiled[i:i + batch_size]):
            for rows, cols, thumb, starts in found:
                bound = b[row]
                edges = [bool(bound[s + n - 1]) for s in starts[:-1]]
                records.append({"grid": [rows, cols], "thumbnail_concepts": int(bound[thumb:thumb + n].sum()),
                                "tile_tokens": n * len(starts),
                                "tile_concepts": int(sum(bound[s:s + n].sum() for s in starts)),
                                "edges": len(edges), "edges_straddled": edges.count(False)})
    return records


def summarise(records: list[dict]) -> dict:
    """Means over tiled images, overall and per tile grid."""
    def figures(sel: list[dict]) -> dict:
        edges = sum(r["edges"] for r in sel)
        return {"images": len(sel), "tile_tokens": float(np.mean([r["tile_tokens"] for r in sel])),
                "concepts_per_image": float(np.mean([r["thumbnail_concepts"] + r["tile_concepts"] for r in sel])),
                "tile_concepts_per_image": float(np.mean([r["tile_concepts"] for r in sel])),
                "thumbnail_concepts": float(np.mean([r["thumbnail_concepts"] for r in sel])),
                "edges": edges, "edges_straddled": sum(r["edges_straddled"] for r in sel),
                "straddled_fraction": sum(r["edges_straddled"] for r in sel) / max(edges, 1)}
    grids = sorted({tuple(r["grid"]) for r in records})
    return {**figures(records), "by_grid": {f"{r}x{c}": figures([x for x in records if tuple(x["grid"]) == (r, c)])
                                            for r, c in grids}}


def heldout_loss(run: Path) -> dict:
    """The end-of-training held-out evaluation (run/summary.json)."""
    heldout = json.loads((run / "summary.json").read_text())["heldout"]
    return {"lm_loss": heldout["lm_loss"], "predicted_tokens": heldout["predicted_tokens"],
            **{f"ratio_{m}": c["ratio"] for m, c in heldout["compression"].items()}}


def train(runs: Path, steps: int, overrides: list[str]) -> dict[str, float]:
    """Both trainings at once (one thread each); seconds per run; runs with final/ are left as they are."""
    procs, t0 = {}, time.perf_counter()
    for mode in MODES:
        if (runs / mode / "final").exists():
            continue
        cmd = [sys.executable, "-m", "cmoe_vlm.cli.train", "configs/tiny_sizes.yaml", "--builtin", *TILED,
               f"vision.tile_boundaries={mode}", f"train.out_dir={runs / mode}", f"train.steps={steps}",
               "data.num_workers=1", *overrides]
        log = open(runs / f"{mode}.log", "w")
        procs[mode] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = {}
    for mode, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"training {mode} failed: see {runs / mode}.log")
        seconds[mode] = round(time.perf_counter() - t0, 1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="runs/tiles", help="run folders OUT/{forced,learned}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--override", nargs="*", default=[], help="more key=value overrides for both trainings")
    parser.add_argument("--images", type=int, default=200, help="held-out images (in their documents)")
    parser.add_argument("--suite-limit", type=int, default=100, help="questions per suite task")
    args = parser.parse_args()
    import torch
    from cmoe_vlm.eval.adaptivity import heldout_documents
    from cmoe_vlm.eval.builtin_suite import write_builtin_suite
    from cmoe_vlm.inference.runner import ModelRunner

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    seconds = train(runs, args.steps, args.override)
    docs = [pieces for pieces, _ in heldout_documents(args.images, 64, sizes="mixed")]
    suite = write_builtin_suite(out / "suite", sizes="mixed")
    result = {"load_before": os.getloadavg(), "train_seconds": seconds, "overrides": args.override,
              "documents": len(docs), "modes": {}}
    for mode in MODES:
        runner = ModelRunner.load(str(runs / mode / "final"))
        result["modes"][mode] = {"tiled_images": summarise(tile_records(runner, docs)),
                                 "heldout": heldout_loss(runs / mode)}
        print(mode, json.dumps(result["modes"][mode]["tiled_images"], indent=1)[:600], flush=True)
    subprocess.run([sys.executable, "-m", "cmoe_vlm.cli.eval", *(a for m in MODES for a in ("--model", str(runs / m / "final"))),
                    "--suite", str(suite), "--out", str(out / "eval"), "--no-long-context", "--compression-samples", "0",
                    "--limit", str(args.suite_limit)], check=True)
    evals = json.loads((out / "eval" / "results.json").read_text())["models"]
    for mode in MODES:
        result["modes"][mode]["suite"] = {t: v["acc"] for t, v in evals[mode]["tasks"].items() if t.startswith("mc_")}
    result["load_after"] = os.getloadavg()
    (out / "tile_boundaries.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({m: {"suite": v["suite"], "heldout": v["heldout"]} for m, v in result["modes"].items()}, indent=1))


if __name__ == "__main__":
    main()

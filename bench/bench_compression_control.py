#!/usr/bin/env python
"""Per-modality compression control on built-in data: does each modality reach its own target?

Trains a small ConceptMoE VLM (configs/tiny.yaml made smaller; per_modality: R_text=1.5,
R_image=3) once per variant and seed, and records the training ratio pooled over the last 20
steps (sampled boundaries) beside the eval-time ratio on held-out data (thresholded boundaries).
Writes JSON. The built-in data is written with short text documents: with the default long ones,
images are ~3% of the tokens and a 20-step window holds too few image tokens to judge ±10%.

    python bench/bench_compression_control.py --out bench/results/compression_control.json
    python bench/bench_compression_control.py --seeds 3 --variant lam3=model.chunk.ratio_loss_weight=3
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SMALL = ["model.dim=64", "model.moe.expert_hidden=64", "model.encoder_layers=1", "model.concept_layers=1",
         "model.decoder_layers=1", "vision.depth=1", "vision.embed_dim=48", "data.seq_len=256", "data.batch_size=8",
         "data.shuffle_buffer=50", "data.num_workers=0", "train.warmup_steps=10", "train.lr=3e-3",
         "train.tensorboard=false", "train.resume=false", "train.eval_batches=8",
         "model.chunk.ratio_mode=per_modality", "model.chunk.text_ratio=1.5", "model.chunk.image_ratio=3"]
VARIANTS = {"default": [], "random_init": ["model.chunk.init=random"], "lambda3": ["model.chunk.ratio_loss_weight=3.0"],
            "integral": ["model.chunk.ratio_integral=0.03"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/compression_control.json")
    ap.add_argument("--data", default="data/builtin_control",
                    help="built-in dataset root (written if missing, with --text-chars long text documents)")
    ap.add_argument("--text-chars", type=int, default=300,
                    help="length of the built-in text documents: short ones leave images a larger share of "
                         "the tokens, so a 20-step window holds enough image tokens to judge ±10%%")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--variant", action="append", default=[],
                    help="name=key=value[,key=value] (name= alone: no overrides); default: the built-in set")
    ap.add_argument("--seeds", type=int, default=1, help="runs per variant (train.seed 0..N-1)")
    args = ap.parse_args(argv)

    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.training.loop import train
    from data_pipelines.builtin import write_builtin_dataset

    root = Path(args.data)
    if not (root / "train" / "manifest.json").exists():
        write_builtin_dataset(root, text_chars=args.text_chars)
    variants = {v.split("=", 1)[0]: [x for x in v.partition("=")[2].split(",") if x] for v in args.variant}
    results = {}
    for name, extra in (variants or VARIANTS).items():
        for seed in range(args.seeds):
            key = name if args.seeds == 1 else f"{name}/seed{seed}"
            out = Path(args.out).parent / f"compression_control_{key.replace('/', '_')}"
            exp = load_experiment("configs/tiny.yaml", SMALL + extra + [
                f"train.steps={args.steps}", f"train.seed={seed}", f"data.shards={root / 'train'}",
                f"train.heldout_shards={root / 'heldout'}", f"train.out_dir={out}"])
            summary = train(exp)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            window = {k: (sum(r.get(f"tokens_{k}", 0) for r in rows[-20:]),
                          sum(r.get(f"concepts_{k}", 0) for r in rows[-20:])) for k in ("text", "image")}
            held = summary["heldout"]["compression"]
            results[key] = {"overrides": extra, "seed": seed,
                            "train_window20": {k: t / max(c, 1) for k, (t, c) in window.items()},
                            "train_window20_tokens": {k: t for k, (t, _) in window.items()},
                            "heldout_eval": {k: held[k]["ratio"] for k in ("text", "image") if k in held},
                            "heldout_image_tokens": held.get("image", {}).get("tokens", 0),
                            "heldout_lm_loss": summary["heldout"]["lm_loss"]}
            print(key, json.dumps(results[key]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"targets": {"text": 1.5, "image": 3.0}, "steps": args.steps, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

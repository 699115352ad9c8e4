"""Vision tower cost for images at their own size: grouped by size vs padded to the largest vs one square.

    python bench/bench_image_sizes.py --out bench/results/image_sizes/image_sizes.json [--images 32] [--repeats 5]

configs/tiny.yaml's ViT and projector (patch 8, reduction 2: one LM token per 16x16 px) with
`vision.max_pixels` (default 128x128). --images source sizes with aspect ratios drawn from [1/3, 3] and
areas from [0.25, 1] x max_pixels are fitted (`vision.sizes.fit_size`), then the tower + projector
run forward and backward three ways:
  grouped   `ConceptMoEVLM.encode_images`: one ViT call per distinct size (what training does);
  padded    every image zero-padded to the largest H and W, one ViT call (the cost of padding);
  square    every image resized to one square of (about) the mean token count, one call (today's
            fixed layout at the same LM budget).
Reported: median ms over --repeats, patches the ViT ran on, LM image tokens, distinct sizes. --bucket
rounds fitted sides up to a multiple of that many token units, trading a little upscaling for fewer
distinct sizes (fewer ViT calls).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: runtime defaults before torch
import torch

from cmoe_vlm.model.vlm import ConceptMoEVLM
from cmoe_vlm.training.config import load_experiment
from vision.sizes import fit_size


def source_sizes(n: int, max_pixels: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
        area = rng.uniform(0.25, 1.0) * max_pixels
        out.append((max(1, round(math.sqrt(area / aspect))), max(1, round(math.sqrt(area * aspect)))))
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/image_sizes/image_sizes.json")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, default=128 * 128)
    parser.add_argument("--bucket", type=int, default=1, help="round sides up to this many token units")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = the default)")
    parser.add_argument("--unfused", action="store_true",
                        help="the ViT's attention as explicit matmul + softmax (timm fused_attn off) instead of SDPA")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    exp = load_experiment(args.config, ["vision.dynamic_img_size=true", f"vision.max_pixels={args.max_pixels}"])
    torch.manual_seed(0)
    model = ConceptMoEVLM(exp.vlm).train()
    if args.unfused:
        for module in model.vision.vit.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    uh, uw = exp.vlm.image_unit
    bh, bw = uh * args.bucket, uw * args.bucket
    sizes = []
    for h, w in source_sizes(args.images, args.max_pixels, args.seed):
        fh, fw = fit_size(h, w, (uh, uw), uh * uw, args.max_pixels)
        sizes.append((math.ceil(fh / bh) * bh, math.ceil(fw / bw) * bw))
    imgs = [torch.randn(3, h, w) for h, w in sizes]
    stacked, padded_sizes = cmoe_base.stack_images(imgs)
    padded_sizes = padded_sizes or tuple(sizes)
    H, W = stacked.shape[-2:]
    tokens = [(h // uh) * (w // uw) for h, w in sizes]
    side = max(1, round(math.sqrt(statistics.mean(tokens))))
    square = torch.randn(len(imgs), 3, side * uh, side * uw)
    patch = model.vision.patch_size

    def run(fn):
        def go():
            model.zero_grad(set_to_none=True)
            fn().float().pow(2).mean().backward()
        return go

    variants = {
        "grouped": run(lambda: model.encode_images(stacked, padded_sizes)),
        "padded": run(lambda: model.encode_images(stacked, ((H, W),) * len(imgs))),
        "square": run(lambda: model.encode_images(square, ((side * uh, side * uw),) * len(imgs))),
    }
    patches = {"grouped": sum(h * w for h, w in sizes) // (patch[0] * patch[1]),
               "padded": len(imgs) * H * W // (patch[0] * patch[1]),
               "square": len(imgs) * (side * uh) * (side * uw) // (patch[0] * patch[1])}
    lm_tokens = {"grouped": sum(tokens), "padded": len(imgs) * (H // uh) * (W // uw),
                 "square": len(imgs) * side * side}
    results = {}
    for name, fn in variants.items():
        ms = timed(fn, args.repeats)
        results[name] = {"ms_fwd_bwd": round(ms, 1), "vit_patches": patches[name], "lm_image_tokens": lm_tokens[name]}
        print(f"{name:8s} {ms:8.1f} ms  patches {patches[name]:6d}  LM tokens {lm_tokens[name]:5d}", flush=True)
    out = {
        "config": args.config, "images": args.images, "unfused_attention": args.unfused, "max_pixels": args.max_pixels, "bucket": args.bucket,
        "token_unit": [uh, uw], "distinct_sizes": len(set(sizes)), "largest": [int(H), int(W)],
        "square_side_tokens": side, "results": results,
        "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))


if __name__ == "__main__":
    main()

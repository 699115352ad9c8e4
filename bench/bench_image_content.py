"""Concepts per image by content at several resolutions: does the image-token budget follow content?

    python bench/bench_image_content.py --model runs/sizes/final --out bench/results/image_sizes/content.json

For a model trained with `vision.max_pixels` (images at their own size), draws --images images of each
kind at each --sizes side (square, px, multiples of the token unit) and counts, per image, its tokens and
the concepts the chunker makes of them (boundaries among its tokens, eval mode):
  flat    a flat dark background with one small red circle (large redundant regions);
  busy    a 6x6 grid of random colours and shapes, with noise (something changes everywhere);
  text    three lines of dark rendered text on a light background (small text).
Images are fed at exactly the stated size (normalised like FitTransform, no resize to the budget), so a
side above the model's budget shows what the chunker does with more pixels than it was trained on.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import cmoe_base  # noqa: F401  first: runtime defaults before torch
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cmoe_base import Modality
from cmoe_vlm.inference.runner import ModelRunner
from vision.transforms import data_config

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (230, 120, 30), (200, 60, 200)]
WORDS = "the quick brown fox jumps over a lazy dog while seven red kites fly high".split()


def draw(kind: str, side: int, rng: random.Random) -> Image.Image:
    if kind == "flat":
        img = Image.new("RGB", (side, side), (25, 30, 40))
        r, x, y = side // 8, rng.randint(side // 8, side * 5 // 8), rng.randint(side // 8, side * 5 // 8)
        ImageDraw.Draw(img).ellipse((x, y, x + 2 * r, y + 2 * r), fill=(220, 40, 40))
        return img
    if kind == "busy":
        img = Image.new("RGB", (side, side), (90, 90, 90))
        d, c = ImageDraw.Draw(img), side / 6
        for i in range(36):
            x0, y0 = (i % 6) * c, (i // 6) * c
            box = (x0 + 1, y0 + 1, x0 + c - 2, y0 + c - 2)
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=rng.choice(COLOURS))
        noise = torch.randint(-20, 21, (side, side, 3), generator=torch.Generator().manual_seed(rng.getrandbits(31)))
        pixels = (torch.from_numpy(np.asarray(img, dtype=np.int64)) + noise).clamp(0, 255).to(torch.uint8)
        return Image.fromarray(pixels.numpy(), "RGB")
    img = Image.new("RGB", (side, side), (235, 235, 225))
    d, font = ImageDraw.Draw(img), ImageFont.load_default(size=max(8, side // 10))
    for line in range(3):
        d.text((side // 16, side // 8 + line * side // 4), " ".join(rng.sample(WORDS, 3)), font=font, fill=(20, 20, 20))
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export trained with vision.max_pixels")
    parser.add_argument("--out", default="bench/results/image_sizes/content.json")
    parser.add_argument("--sizes", default="64,128,192", help="square sides in px")
    parser.add_argument("--images", type=int, default=8, help="images per kind and size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from torchvision.transforms import functional as F

    runner = ModelRunner.load(args.model)
    model = runner.model
    if not model.cfg.vision.variable_size:
        raise SystemExit(f"{args.model}: not trained with vision.max_pixels (images at their own size)")
    cfg = data_config(model.vision)
    results = {}
    for side in (int(s) for s in args.sizes.split(",")):
        for kind in ("flat", "busy", "text"):
            rng = random.Random(f"{args.seed}-{kind}-{side}")
            counts = []
            for _ in range(args.images):
                x = F.normalize(F.to_tensor(draw(kind, side, rng)), cfg["mean"], cfg["std"])
                seq = runner.sequence(["a picture: ", x, " done"])
                out, _ = runner.forward([seq])
                is_image = torch.tensor(seq.modality) == Modality.IMAGE
                counts.append((int(is_image.sum()), int(out.boundaries[0][: len(seq)][is_image.to(out.boundaries.device)].sum())))
            tokens = counts[0][0]
            concepts = [c for _, c in counts]
            results[f"{kind}@{side}"] = {"kind": kind, "side_px": side, "tokens": tokens,
                                         "concepts_mean": sum(concepts) / len(concepts), "concepts": concepts}
            print(f"{kind:5s} {side:4d} px: {tokens:4d} tokens, {sum(concepts) / len(concepts):6.1f} concepts "
                  f"({min(concepts)}-{max(concepts)})", flush=True)
    out = {"model": args.model, "images": args.images, "results": results,
           "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

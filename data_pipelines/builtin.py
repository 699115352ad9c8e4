"""Built-in multimodal data, drawn with PIL: no downloads, deterministic from a seed.

Sample kinds (mixed in fixed proportions, each sample seeded by (seed, index)):
    caption      shapes scene or rendered word/number, with a caption that describes it
                 ("2 red circles and 1 blue square.", 'The number 417 written in green.')
    qa           an image with a question and its answer ("How many circles?" → "2",
                 "What colour is the square?" → "red", "What is written?" → "cat")
    interleaved  2-3 images, each introduced and described, and a closing count over all of them
    text         long documents: a pass key hidden in filler ("The pass key is 48213. Remember it.")
                 then asked for at the end, or structured filler (multiplication tables, lists)

`write_builtin_dataset` writes `train/` and `heldout/` through the shard writer (the held-out split
uses seed + 1_000_003, so its samples differ). CLI: `python -m data_pipelines.builtin --out DIR`.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.shards import Sample, write_shards

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "tree", "car", "fish", "bird", "moon", "star", "book", "cup", "hat")
KINDS = ("caption",) * 8 + ("qa",) * 5 + ("interleaved",) * 3 + ("text",) * 4  # 40/25/15/20 %
HELDOUT_SEED_OFFSET = 1_000_003
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def textured_background(rng: random.Random, size: int, dark: bool) -> Image.Image:
    """A linear gradient between two random dark (or light) colours in a random direction, plus
    pixel noise: like a photo's background, no two patches are identical, but neighbours are close.
    (Flat backgrounds made every background patch the same token, so a learned chunker could only
    merge or split all of them at once: whole-image steps in the compression rate.)"""
    lo, hi = (10, 70) if dark else (200, 250)
    c0 = np.array([rng.randint(lo, hi) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(lo, hi) for _ in range(3)], dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (math.cos(angle) * xx + math.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (size, size, 3))
    pixels = c0 + (c1 - c0) * t[..., None] + noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def draw_scene(rng: random.Random, size: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    """1-2 kinds of shapes, 1-4 of each, in distinct cells of a 4x4 grid, on a textured dark
    background. Returns (image, [(colour, shape)])."""
    img = textured_background(rng, size, dark=True)
    draw = ImageDraw.Draw(img)
    groups = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.choice((1, 2)))
    objects = [g for g in groups for _ in range(rng.randint(1, 4))]
    cell = size // 4
    for (colour, shape), idx in zip(objects, rng.sample(range(16), len(objects))):
        x0, y0 = (idx % 4) * cell + 1, (idx // 4) * cell + 1
        x1, y1 = x0 + cell - 3, y0 + cell - 3
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) // 2, y0, x1, y1, x0, y1), fill=fill)
    return img, objects


def draw_text_image(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    """A word or 3-digit number in a colour. Returns (image, text, colour)."""
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(100, 999))
    colour = rng.choice(list(COLOURS))
    img = textured_background(rng, size, dark=False)
    font = ImageFont.load_default(size=max(8, size // 4))
    draw = ImageDraw.Draw(img)
    draw.text((rng.randint(1, size // 3), rng.randint(1, size // 2)), text, font=font, fill=COLOURS[colour])
    return img, text, colour


def describe_scene(objects: list[tuple[str, str]]) -> str:
    counts = Counter(objects)
    parts = [f"{_plural(n, f'{colour} {shape}')}" for (colour, shape), n in counts.items()]
    return " and ".join(parts) + "."


def describe_text_image(text: str, colour: str) -> str:
    kind = "number" if text.isdigit() else "word"
    return f'The {kind} "{text}" written in {colour}.'


def scene_question(rng: random.Random, objects: list[tuple[str, str]]) -> tuple[str, str]:
    shape_counts = Counter(s for _, s in objects)
    shape = rng.choice(SHAPES)
    colours = {c for c, s in objects if s == shape}
    if len(colours) == 1 and rng.random() < 0.5:
        return f"What colour is the {shape}?", colours.pop()
    if rng.random() < 0.3:
        return f"Is there a {shape}?", "yes" if shape_counts[shape] else "no"
    return f"How many {shape}s?", str(shape_counts[shape])


def caption_sample(rng: random.Random, size: int) -> Sample:
    if rng.random() < 0.7:
        img, objects = draw_scene(rng, size)
        caption = describe_scene(objects)
    else:
        img, text, colour = draw_text_image(rng, size)
        caption = describe_text_image(text, colour)
    return {"png": _png(img), "txt": caption.encode()}


def qa_sample(rng: random.Random, size: int) -> Sample:
    if rng.random() < 0.75:
        img, objects = draw_scene(rng, size)
        question, answer = scene_question(rng, objects)
    else:
        img, text, colour = draw_text_image(rng, size)
        question, answer = ("What is written?", text) if rng.random() < 0.6 else ("What colour is the text?", colour)
    meta = {"question": question, "answer": answer}
    return {"png": _png(img), "json": json.dumps(meta).encode()}


def interleaved_sample(rng: random.Random, size: int) -> Sample:
    sample: Sample = {}
    pieces: list[dict[str, str]] = [{"text": "A short picture book."}]
    total = 0
    for i in range(rng.choice((2, 3))):
        img, objects = draw_scene(rng, size)
        total += len(objects)
        sample[f"{i}.png"] = _png(img)
        pieces += [{"text": f" Picture {i + 1}:"}, {"image": f"{i}.png"}, {"text": f" It shows {describe_scene(objects)}"}]
    pieces.append({"text": f" In all the pictures there are {_plural(total, 'shape')}."})
    sample["json"] = json.dumps({"pieces": pieces}).encode()
    return sample


def text_sample(rng: random.Random, chars: int) -> Sample:
    if rng.random() < 0.5:
        key = rng.randint(10000, 99999)
        n = max(2, chars // len(FILLER))
        at = rng.randint(0, n)
        parts = [FILLER] * n
        parts.insert(at, f"The pass key is {key}. Remember it. {key} is the pass key. ")
        text = "There is a pass key hidden in this text. " + "".join(parts) + f"What is the pass key? The pass key is {key}."
    else:
        lines = []
        while sum(map(len, lines)) < chars:
            a = rng.randint(2, 12)
            lines += [f"Table of {a}:"] + [f"{a} times {b} is {a * b}." for b in range(1, 11)]
        text = "\n".join(lines)
    return {"txt": text.encode()}


def builtin_samples(num: int, image_size: int = 64, seed: int = 0, text_chars: int = 3000) -> Iterator[Sample]:
    """`num` samples; sample i depends only on (seed, i)."""
    for i in range(num):
        rng = random.Random(f"{seed}-{i}")
        kind = rng.choice(KINDS)
        if kind == "caption":
            yield caption_sample(rng, image_size)
        elif kind == "qa":
            yield qa_sample(rng, image_size)
        elif kind == "interleaved":
            yield interleaved_sample(rng, image_size)
        else:
            yield text_sample(rng, text_chars)


def write_builtin_dataset(
    out_dir: str | Path, num_train: int = 4000, num_heldout: int = 400, image_size: int = 64,
    seed: int = 0, maxcount: int = 500, text_chars: int = 3000,
) -> dict[str, Path]:
    """Write `out_dir/train` and `out_dir/heldout` shards (+ manifests); returns both folders."""
    paths = {"train": Path(out_dir) / "train", "heldout": Path(out_dir) / "heldout"}
    for split, num, split_seed in (("train", num_train, seed), ("heldout", num_heldout, seed + HELDOUT_SEED_OFFSET)):
        samples = builtin_samples(num, image_size, split_seed, text_chars)
        write_shards(samples, paths[split], maxcount=maxcount, total=num, desc=f"builtin {split}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (gets train/ and heldout/)")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-heldout", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maxcount", type=int, default=500, help="samples per shard")
    parser.add_argument("--text-chars", type=int, default=3000, help="length of the long text documents")
    args = parser.parse_args(argv)
    paths = write_builtin_dataset(args.out, args.num_train, args.num_heldout, args.image_size,
                                  args.seed, args.maxcount, args.text_chars)
    print(" ".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()

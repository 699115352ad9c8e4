"""Built-in multimodal data, drawn with PIL: no downloads, deterministic from a seed.

Sample kinds (mixed in fixed proportions, each sample seeded by (seed, index)):
    caption      shapes scene or rendered word/number, with a caption that describes it
                 ("2 red circles and 1 blue square.", 'The number 417 written in green.')
    qa           an image with a question and its answer ("How many circles?" → "2",
                 "What colour is the square?" → "red", "Where is the red square?" → "row 1,
                 column 2", "What is written?" → "cat"); scene questions of each kind equally often
    interleaved  2-3 images, each introduced and described, and a closing count over all of them
    text         long documents (TEXT_CHARS): a pass key hidden in filler ("The pass key is 48213. Remember it.")
                 then asked for at the end, or structured filler (multiplication tables, lists)

Images are image_size squares by default; `sizes` ("mixed", or "WxH,...") draws each image on a canvas of
one of several sizes and aspect ratios, with objects at the same scale, flat backgrounds, banners and
receipts of small text (data_pipelines/builtin_sizes.py).

`write_builtin_dataset` writes `train/` and `heldout/` through the shard writer (the held-out split
uses seed + 1_000_003, so its samples differ). CLI: `python -m data_pipelines.builtin --out DIR [--sizes mixed]`.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.builtin_sizes import Canvas, Canvases
from data_pipelines.shards import Sample, write_shards

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "tree", "car", "fish", "bird", "moon", "star", "book", "cup", "hat")
# 30/50/15/5 % of documents: image tokens are ~15% of the training tokens (16 per image against ~50-200
# bytes of text per image document); with 20% long text documents of 3,000 characters they were ~2%
# and the demo's VLM learned no image content (docs/design.md §7b).
KINDS = ("caption",) * 6 + ("qa",) * 10 + ("interleaved",) * 3 + ("text",) * 1
TEXT_CHARS = 600  # length of the long text documents (passkey, tables): longer than the demo's 512-token probes
GROUNDED = True    # half the scene captions and questions name object positions (grid cells)
HELDOUT_SEED_OFFSET = 1_000_003
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def textured_background(rng: random.Random, width: int, height: int, dark: bool) -> Image.Image:
    """A linear gradient between two random dark (or light) colours in a random direction, plus
    pixel noise: like a photo's background, no two patches are identical, but neighbours are close.
    (Flat backgrounds made every background patch the same token, so a learned chunker could only
    merge or split all of them at once: whole-image steps in the compression rate.)"""
    lo, hi = (10, 70) if dark else (200, 250)
    c0 = np.array([rng.randint(lo, hi) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(lo, hi) for _ in range(3)], dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1), xx / max(width - 1, 1)
    t = (math.cos(angle) * xx + math.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (height, width, 3))
    pixels = c0 + (c1 - c0) * t[..., None] + noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def background(rng: random.Random, canvas: Canvas, dark: bool) -> Image.Image:
    """The canvas's background: textured, or one dark (light) colour when `canvas.flat` (only with
    several sizes: large flat regions beside the textured ones, `builtin_sizes.FLAT_SHARE`)."""
    if not canvas.flat:
        return textured_background(rng, canvas.width, canvas.height, dark)
    lo, hi = (10, 70) if dark else (200, 250)
    return Image.new("RGB", (canvas.width, canvas.height), tuple(rng.randint(lo, hi) for _ in range(3)))


class SceneObject(NamedTuple):
    """One drawn object: a coloured shape in a cell of the scene grid (4x4 on the default square; cells
    in raster order), or the rendered text of a text image (shape "text", cell -1)."""
    colour: str
    shape: str
    cell: int


class Drawing(NamedTuple):
    """A drawn image with its ground truth: `labels` (height, width) uint8 holds 0 on background
    pixels and i + 1 on the pixels of objects[i] (the object masks); `grid` (rows, cols) of the scene
    grid its cells number."""
    image: Image.Image
    labels: np.ndarray
    objects: list[SceneObject]
    grid: tuple[int, int] = (4, 4)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cell: int, canvas: Canvas, fill) -> None:
    c = canvas.cell
    x0, y0 = (cell % canvas.cols) * c + 1, (cell // canvas.cols) * c + 1
    x1, y1 = x0 + c - 3, y0 + c - 3
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon(((x0 + x1) // 2, y0, x1, y1, x0, y1), fill=fill)


def draw_scene(rng: random.Random, canvas: Canvas) -> Drawing:
    """1-2 kinds of shapes, 1-4 of each, in distinct cells of the canvas's grid, on a dark background
    (textured, or flat)."""
    img = background(rng, canvas, dark=True)
    groups = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.choice((1, 2)))
    kinds = [g for g in groups for _ in range(rng.randint(1, 4))]
    cells = rng.sample(range(canvas.rows * canvas.cols), len(kinds))
    objects = [SceneObject(c, s, cell) for (c, s), cell in zip(kinds, cells)]
    labels = Image.new("L", (canvas.width, canvas.height), 0)
    draw, draw_labels = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    for i, o in enumerate(objects):
        _draw_shape(draw, o.shape, o.cell, canvas, COLOURS[o.colour])
        _draw_shape(draw_labels, o.shape, o.cell, canvas, i + 1)
    return Drawing(img, np.asarray(labels), objects, (canvas.rows, canvas.cols))


def _ink(img: Image.Image, lines: list[tuple[tuple[int, int], str]], font, colour: str) -> np.ndarray:
    """Write each (xy, text) of `lines` on `img` in `colour`; returns the ink mask (height, width) uint8."""
    ink = Image.new("L", img.size, 0)
    for xy, text in lines:
        ImageDraw.Draw(img).text(xy, text, font=font, fill=COLOURS[colour])
        ImageDraw.Draw(ink).text(xy, text, font=font, fill=255)
    return (np.asarray(ink) >= 128).astype(np.uint8)


def draw_text_image(rng: random.Random, canvas: Canvas) -> tuple[Drawing, str]:
    """A word or 3-digit number in a colour, glyphs one cell high, in the top left of the canvas (on a
    wide one: a banner): (drawing with one object of shape "text", whose ink is its mask; the text)."""
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(100, 999))
    colour = rng.choice(list(COLOURS))
    img = background(rng, canvas, dark=False)
    font = ImageFont.load_default(size=max(8, canvas.cell))
    xy = (rng.randint(1, canvas.width // 3), rng.randint(1, canvas.height // 2))
    labels = _ink(img, [(xy, text)], font, colour)
    return Drawing(img, labels, [SceneObject(colour, "text", -1)], (canvas.rows, canvas.cols)), text


RECEIPT_ITEMS = (2, 5)  # items per receipt, prices 1-9


def _receipt_font(canvas: Canvas) -> ImageFont.FreeTypeFont:
    """Small text: glyphs 5/8 of a scene cell high (10 px at image_size 64)."""
    return ImageFont.load_default(size=max(8, canvas.cell * 5 // 8))


def receipt_fits(canvas: Canvas) -> bool:
    """A tall canvas (height >= 2 x width) that the longest receipt fits on."""
    if canvas.height < 2 * canvas.width:
        return False
    font = _receipt_font(canvas)
    widest = max(font.getlength(f"{w} 9") for w in WORDS + ("total 45",))
    lines = RECEIPT_ITEMS[1] + 1
    return widest + 2 <= canvas.width and canvas.cell + lines * (font.size + 2) <= canvas.height


def draw_receipt(rng: random.Random, canvas: Canvas) -> tuple[Drawing, list[tuple[str, int]]]:
    """A receipt in small text (glyphs 5/8 of a cell high) on a light background: one line per item
    ("cat 3"), then "total N"; (drawing with one object of shape "text", all lines' ink its mask;
    the (item, price) pairs). Needs `receipt_fits(canvas)`."""
    items = [(w, rng.randint(1, 9)) for w in rng.sample(WORDS, rng.randint(*RECEIPT_ITEMS))]
    colour = rng.choice(list(COLOURS))
    img = background(rng, canvas, dark=False)
    font = _receipt_font(canvas)
    texts = [f"{w} {p}" for w, p in items] + [f"total {sum(p for _, p in items)}"]
    widest = max(font.getlength(t) for t in texts)
    x, y = rng.randint(1, max(1, int(canvas.width - widest) - 1)), rng.randint(1, canvas.cell)
    labels = _ink(img, [((x, y + k * (font.size + 2)), t) for k, t in enumerate(texts)], font, colour)
    return Drawing(img, labels, [SceneObject(colour, "text", -1)], (canvas.rows, canvas.cols)), items


def describe_scene(objects: list[SceneObject]) -> str:
    counts = Counter((o.colour, o.shape) for o in objects)
    parts = [f"{_plural(n, f'{colour} {shape}')}" for (colour, shape), n in counts.items()]
    return " and ".join(parts) + "."


def describe_text_image(text: str, colour: str) -> str:
    kind = "number" if text.isdigit() else "word"
    return f'The {kind} "{text}" written in {colour}.'


def describe_receipt(items: list[tuple[str, int]]) -> str:
    """'A receipt: cat 3, dog 5, total 8.'"""
    return "A receipt: " + ", ".join(f"{w} {p}" for w, p in items) + f", total {sum(p for _, p in items)}."


def receipt_question(rng: random.Random, items: list[tuple[str, int]]) -> tuple[str, str]:
    """'What is the total?' or 'How much is the cat?' (an item on the receipt)."""
    if rng.random() < 0.5:
        return "What is the total?", str(sum(p for _, p in items))
    word, price = rng.choice(items)
    return f"How much is the {word}?", str(price)


def scene_question(rng: random.Random, objects: list[SceneObject]) -> tuple[str, str]:
    """A question about the scene, its kind drawn evenly from those it allows: the colour of a shape
    that has one colour in it, how many of a shape (present or not), whether there is a shape."""
    shape_counts = Counter(o.shape for o in objects)
    one_colour = sorted(s for s in shape_counts if len({o.colour for o in objects if o.shape == s}) == 1)
    kinds = ["count", "is_there"] + (["colour"] if one_colour else [])
    kind = rng.choice(kinds)
    if kind == "colour":
        shape = rng.choice(one_colour)
        return f"What colour is the {shape}?", next(o.colour for o in objects if o.shape == shape)
    shape = rng.choice(sorted(shape_counts)) if kind == "count" and rng.random() < 0.8 else rng.choice(SHAPES)
    if kind == "is_there":
        return f"Is there a {shape}?", "yes" if shape_counts[shape] else "no"
    return f"How many {shape}s?", str(shape_counts[shape])


Document = tuple[Sample, list[Drawing]]  # a sample and the drawings of its images, in order


def cell_name(cell: int, cols: int = 4) -> str:
    """Scene grid cell (raster order in a grid of `cols` columns) -> "row r, column c" (1-based)."""
    return f"row {cell // cols + 1}, column {cell % cols + 1}"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def describe_layout(objects: list[SceneObject], cols: int = 4) -> str:
    """Every object and where it is (grid of `cols` columns), in reading order: 'A red circle at row 1,
    column 2. An ...'"""
    return " ".join(f"{_a(o.colour).capitalize()} {o.shape} at {cell_name(o.cell, cols)}."
                    for o in sorted(objects, key=lambda o: o.cell))


def where_question(rng: random.Random, objects: list[SceneObject], grid: tuple[int, int] = (4, 4)) -> tuple[str, str]:
    """'Where is the red circle?' (an object of a unique colour and shape) or 'What is at row r,
    column c?' (any cell of the (rows, cols) grid; 'nothing' for an empty one)."""
    rows, cols = grid
    kinds = Counter((o.colour, o.shape) for o in objects)
    unique = [o for o in objects if kinds[(o.colour, o.shape)] == 1]
    if unique and rng.random() < 0.8:
        o = rng.choice(unique)
        return f"Where is the {o.colour} {o.shape}?", cell_name(o.cell, cols)
    cell = rng.randrange(rows * cols)
    found = [o for o in objects if o.cell == cell]
    return f"What is at {cell_name(cell, cols)}?", f"{_a(found[0].colour)} {found[0].shape}" if found else "nothing"


def caption_sample(rng: random.Random, canvases: Canvases, grounded: bool = GROUNDED) -> Document:
    canvas = canvases.draw(rng)
    if rng.random() < 0.7:
        drawing = draw_scene(rng, canvas)
        layout = grounded and rng.random() < 0.5
        caption = (describe_layout(drawing.objects, drawing.grid[1]) if layout
                   else describe_scene(drawing.objects))
    elif receipt_fits(canvas):
        drawing, items = draw_receipt(rng, canvas)
        caption = describe_receipt(items)
    else:
        drawing, text = draw_text_image(rng, canvas)
        caption = describe_text_image(text, drawing.objects[0].colour)
    return {"png": _png(drawing.image), "txt": caption.encode()}, [drawing]


def qa_sample(rng: random.Random, canvases: Canvases, grounded: bool = GROUNDED) -> Document:
    canvas = canvases.draw(rng)
    if rng.random() < 0.85:
        drawing = draw_scene(rng, canvas)
        if grounded and rng.random() < 1 / 3:
            question, answer = where_question(rng, drawing.objects, drawing.grid)
        else:
            question, answer = scene_question(rng, drawing.objects)
    elif receipt_fits(canvas):
        drawing, items = draw_receipt(rng, canvas)
        question, answer = receipt_question(rng, items)
    else:
        drawing, text = draw_text_image(rng, canvas)
        question, answer = (("What is written?", text) if rng.random() < 0.6
                            else ("What colour is the text?", drawing.objects[0].colour))
    meta = {"question": question, "answer": answer}
    return {"png": _png(drawing.image), "json": json.dumps(meta).encode()}, [drawing]


def interleaved_sample(rng: random.Random, canvases: Canvases) -> Document:
    sample: Sample = {}
    drawings = []
    pieces: list[dict[str, str]] = [{"text": "A short picture book."}]
    total = 0
    for i in range(rng.choice((2, 3))):
        drawing = draw_scene(rng, canvases.draw(rng))
        drawings.append(drawing)
        total += len(drawing.objects)
        sample[f"{i}.png"] = _png(drawing.image)
        pieces += [{"text": f" Picture {i + 1}:"}, {"image": f"{i}.png"},
                   {"text": f" It shows {describe_scene(drawing.objects)}"}]
    pieces.append({"text": f" In all the pictures there are {_plural(total, 'shape')}."})
    sample["json"] = json.dumps({"pieces": pieces}).encode()
    return sample, drawings


def text_sample(rng: random.Random, chars: int) -> Document:
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
    return {"txt": text.encode()}, []


def builtin_documents(num: int, image_size: int = 64, seed: int = 0, text_chars: int = TEXT_CHARS,
                      grounded: bool = GROUNDED, sizes: str | None = None) -> Iterator[Document]:
    """`num` (sample, drawings) pairs; pair i depends only on (seed, i). The drawings carry each
    image's object masks, which the shards do not hold (cmoe_vlm.eval.adaptivity reads them).
    `grounded`: half the scene captions list every object with its grid cell, half the scene
    questions ask where an object is or what a cell holds (text that needs each image token).
    `sizes` (None: image_size squares): canvases of several sizes, `builtin_sizes.Canvases`."""
    canvases = Canvases(image_size, sizes)
    for i in range(num):
        rng = random.Random(f"{seed}-{i}")
        kind = rng.choice(KINDS)
        if kind == "caption":
            yield caption_sample(rng, canvases, grounded)
        elif kind == "qa":
            yield qa_sample(rng, canvases, grounded)
        elif kind == "interleaved":
            yield interleaved_sample(rng, canvases)
        else:
            yield text_sample(rng, text_chars)


def builtin_samples(num: int, image_size: int = 64, seed: int = 0, text_chars: int = TEXT_CHARS,
                    grounded: bool = GROUNDED, sizes: str | None = None) -> Iterator[Sample]:
    """`num` samples; sample i depends only on (seed, i)."""
    return (sample for sample, _ in builtin_documents(num, image_size, seed, text_chars, grounded, sizes))


def write_builtin_dataset(
    out_dir: str | Path, num_train: int = 4000, num_heldout: int = 400, image_size: int = 64,
    seed: int = 0, maxcount: int = 500, text_chars: int = TEXT_CHARS, grounded: bool = GROUNDED,
    sizes: str | None = None,
) -> dict[str, Path]:
    """Write `out_dir/train` and `out_dir/heldout` shards (+ manifests); returns both folders."""
    Canvases(image_size, sizes)  # a bad `sizes` fails before anything is written
    paths = {"train": Path(out_dir) / "train", "heldout": Path(out_dir) / "heldout"}
    for split, num, split_seed in (("train", num_train, seed), ("heldout", num_heldout, seed + HELDOUT_SEED_OFFSET)):
        samples = builtin_samples(num, image_size, split_seed, text_chars, grounded, sizes)
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
    parser.add_argument("--text-chars", type=int, default=TEXT_CHARS, help="length of the long text documents")
    parser.add_argument("--grounded", action=argparse.BooleanOptionalAction, default=GROUNDED,
                        help="captions and questions about object positions (default: on)")
    parser.add_argument("--sizes", default=None,
                        help="images of several sizes: 'mixed' (1x1, 2x2, 2x1, 1x2, 4x1, 1x4 image sizes, "
                             "half on flat backgrounds) or WxH,WxH,... px (default: image-size squares)")
    args = parser.parse_args(argv)
    try:
        Canvases(args.image_size, args.sizes)
    except ValueError as e:
        parser.error(f"--{e}")
    paths = write_builtin_dataset(args.out, args.num_train, args.num_heldout, args.image_size,
                                  args.seed, args.maxcount, args.text_chars, args.grounded, args.sizes)
    print(" ".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()

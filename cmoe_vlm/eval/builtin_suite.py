"""The built-in evaluation suite, made from the held-out split of the built-in data.

    python -m cmoe_vlm.eval.builtin_suite --out suites/builtin     # or: write_builtin_suite(out)

The held-out split is regenerated sample by sample (`builtin_documents` with the held-out seed, the
same bytes `write_builtin_dataset` writes to `heldout/`), so no shards are needed. Tasks:

    mc_caption   [image] → pick the true caption among 4 that differ only in the colour words
                 (caption layout of training; chance 1/4). Only the image can decide.
    mc_colour    [image, "Question: What colour is the <shape>? Answer:"] → one of the 6 colours
                 (scenes where that shape has one colour; chance 1/6).
    mc_count     [image, "Question: How many <shape>s? Answer:"] → 1..8 (chance 1/8).
    mc_position  [image, "Question: Where is the <colour> <shape>? Answer:"] → one of the 16 cells
                 "row r, column c" of the scene grid (an object of a unique colour and shape; chance
                 1/16; with `sizes`, every cell of that image's grid). Localisation: only the image
                 token of that cell can decide.
    vqa          the held-out QA samples as open-ended questions (exact match).
    caption      the held-out caption samples (BLEU, CIDEr, ROUGE-L; one reference each).
    text         the held-out long text documents (bits per byte).

Images are written as PNG under `images/`; each task is one JSONL file; `suite.yaml` lists them.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from data_pipelines.builtin import COLOURS, GROUNDED, HELDOUT_SEED_OFFSET, TEXT_CHARS, builtin_documents, cell_name

SCENE = re.compile(r"(\d+) (\w+) (circle|square|triangle)s?")
MAX_COUNT = 8


def parse_scene(caption: str) -> list[tuple[int, str, str]] | None:
    """'2 red circles and 1 blue square.' → [(2, 'red', 'circle'), (1, 'blue', 'square')]; None for
    captions of rendered text."""
    groups = [(int(n), c, s) for n, c, s in SCENE.findall(caption)]
    return groups if groups and all(c in COLOURS for _, c, _ in groups) else None


def recolour(caption: str, groups: list[tuple[int, str, str]], rng: random.Random) -> str:
    """The caption with every group's colour replaced by a different colour."""
    out = caption
    for n, c, s in groups:
        new = rng.choice([x for x in COLOURS if x != c])
        out = out.replace(f"{n} {c} {s}", f"{n} {new} {s}", 1)
    return out


def write_builtin_suite(out_dir: str | Path, num_samples: int = 400, image_size: int = 64, seed: int = 0,
                        text_chars: int = TEXT_CHARS, max_per_task: int = 100,
                        grounded: bool = GROUNDED, sizes: str | None = None) -> Path:
    """Write the suite to `out_dir` (suite.yaml, *.jsonl, images/); returns the suite.yaml path.

    `num_samples`, `image_size`, `seed`, `text_chars`, `grounded`, `sizes` must match `write_builtin_dataset`'s
    held-out split for the suite to be that split (defaults match)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"suite-{seed}")
    tasks: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("mc_caption", "mc_colour", "mc_count", "mc_position", "vqa", "caption", "text")}
    position_rng = random.Random(f"suite-position-{seed}")  # its own stream: the other tasks stay as they were

    def save_png(i: int, data: bytes, k: int | None = None) -> str:
        name = f"images/heldout_{i:06d}.png" if k is None else f"images/heldout_{i:06d}_{k}.png"
        (out / name).write_bytes(data)
        return name

    docs = builtin_documents(num_samples, image_size, seed + HELDOUT_SEED_OFFSET, text_chars, grounded, sizes)
    for i, (sample, drawings) in enumerate(docs):
        images = [k for k in sample if k.endswith("png")]  # "png", or "0.png", "1.png", ... in order
        for k, drawing in zip(images, drawings):  # every scene image with an object of a unique kind
            kinds = Counter((o.colour, o.shape) for o in drawing.objects)
            unique = [o for o in drawing.objects if kinds[(o.colour, o.shape)] == 1 and o.shape != "text"]
            if unique:
                o = position_rng.choice(unique)
                image = save_png(i, sample[k], None if k == "png" else int(k.split(".")[0]))
                rows, cols = drawing.grid
                tasks["mc_position"].append({"id": i, "image": image,
                                             "prompt": f"Question: Where is the {o.colour} {o.shape}? Answer:",
                                             "choices": [cell_name(c, cols) for c in range(rows * cols)],
                                             "answer": o.cell})
        if "png" in sample and "txt" in sample:  # caption
            caption = sample["txt"].decode()
            image = save_png(i, sample["png"])
            tasks["caption"].append({"id": i, "image": image, "references": [caption]})
            groups = parse_scene(caption)
            if groups is None:
                continue
            choices = [caption] + [recolour(caption, groups, rng) for _ in range(3)]
            while len(set(choices)) < 4:  # two distractors came out equal: redraw
                choices = [caption] + [recolour(caption, groups, rng) for _ in range(3)]
            order = rng.sample(range(4), 4)
            tasks["mc_caption"].append({"id": i, "image": image, "prompt": "", "choices": [choices[j] for j in order],
                                        "answer": order.index(0)})
            colours: dict[str, set[str]] = {}
            counts: dict[str, int] = {}
            for n, c, s in groups:
                colours.setdefault(s, set()).add(c)
                counts[s] = counts.get(s, 0) + n
            shape = rng.choice(sorted(colours))
            if len(colours[shape]) == 1:
                colour_list = list(COLOURS)
                tasks["mc_colour"].append({"id": i, "image": image,
                                           "prompt": f"Question: What colour is the {shape}? Answer:",
                                           "choices": colour_list, "answer": colour_list.index(next(iter(colours[shape])))})
            tasks["mc_count"].append({"id": i, "image": image, "prompt": f"Question: How many {shape}s? Answer:",
                                      "choices": [str(k) for k in range(1, MAX_COUNT + 1)], "answer": counts[shape] - 1})
        elif "png" in sample and "json" in sample:  # qa
            meta = json.loads(sample["json"])
            tasks["vqa"].append({"id": i, "image": save_png(i, sample["png"]), "question": meta["question"],
                                 "answers": [meta["answer"]]})
        elif set(sample) == {"txt"}:  # long text
            tasks["text"].append({"id": i, "text": sample["txt"].decode()})
    types = {"mc_caption": "multiple_choice", "mc_colour": "multiple_choice", "mc_count": "multiple_choice",
             "mc_position": "multiple_choice", "vqa": "vqa", "caption": "caption", "text": "perplexity"}
    extra = {"mc_caption": {"choice_prefix": ""}, "vqa": {"max_new_tokens": 12}, "caption": {"max_new_tokens": 48}}
    listed = []
    for name, recs in tasks.items():
        recs = recs[:max_per_task]
        with (out / f"{name}.jsonl").open("w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        listed.append({"name": name, "type": types[name], "data": f"{name}.jsonl", **extra.get(name, {})})
    suite = out / "suite.yaml"
    px = f"{image_size} px" if sizes is None else f"{image_size} px scale, sizes {sizes}"
    header = (f"# Built-in suite from the held-out split (seed {seed} + {HELDOUT_SEED_OFFSET}, "
              f"{num_samples} samples, {px}). Written by cmoe_vlm.eval.builtin_suite.\n")
    suite.write_text(header + yaml.safe_dump({"tasks": listed}, sort_keys=False))
    return suite


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-samples", type=int, default=400, help="held-out samples to draw from")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-per-task", type=int, default=100)
    ap.add_argument("--sizes", default=None, help="as the data's `python -m data_pipelines.builtin --sizes`")
    args = ap.parse_args(argv)
    print(write_builtin_suite(args.out, args.num_samples, args.image_size, args.seed, max_per_task=args.max_per_task,
                              sizes=args.sizes))


if __name__ == "__main__":
    main()

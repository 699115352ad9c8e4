"""Inspection inputs: documents (lists of text pieces and PIL images) from shards, the built-in
held-out split, or files (images, .txt, .jsonl)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _jsonl_pieces(path: Path) -> list[list[Any]]:
    from PIL import Image

    def image(rel: str):
        with Image.open(path.parent / rel) as im:
            return im.convert("RGB")

    out = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if "pieces" in obj:
            out.append([p["text"] if "text" in p else image(p["image"]) for p in obj["pieces"]])
        elif "image" in obj:
            out.append([image(obj["image"])] + ([obj["text"]] if obj.get("text") else []))
        elif "text" in obj:
            out.append([obj["text"]])
        else:
            raise ValueError(f"{path}:{line_no}: expected 'pieces', 'image' or 'text'")
    return out


def load_samples(specs: list[str], limit: int) -> list[list[Any]]:
    """Documents (lists of text pieces and PIL images) from shards, `builtin` or files."""
    from PIL import Image

    from data_pipelines.loader import list_shards, read_tar
    from data_pipelines.shards import decode_sample

    docs: list[list[Any]] = []
    for spec in specs:
        path = Path(spec)
        if spec == "builtin":
            from data_pipelines.builtin import HELDOUT_SEED_OFFSET, builtin_samples
            docs += [decode_sample(s) for s in builtin_samples(limit, seed=HELDOUT_SEED_OFFSET)]
        elif path.is_file() and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            with Image.open(path) as im:
                docs.append([im.convert("RGB")])
        elif path.is_file() and path.suffix.lower() == ".txt":
            docs.append([path.read_text()])
        elif path.is_file() and path.suffix.lower() == ".jsonl":
            docs += _jsonl_pieces(path)
        else:
            shards = list_shards(spec)
            if not shards:
                raise FileNotFoundError(f"--data {spec!r}: not a file, a shard folder or a tar pattern")
            for url in shards:
                for raw in read_tar(url):
                    docs.append(decode_sample(raw))
                    if len(docs) >= limit:
                        break
                if len(docs) >= limit:
                    break
        if len(docs) >= limit:
            break
    if not docs:
        raise ValueError(f"--data {specs}: no samples")
    return docs[:limit]

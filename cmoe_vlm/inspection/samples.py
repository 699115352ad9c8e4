"""Inspection inputs: documents (lists of text pieces and PIL images) from shards, the built-in
held-out split, or files (images, .txt, .jsonl)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cmoe_base.commands import InputError, json_object

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_pieces(path: Path) -> list[list[Any]]:
    from data_pipelines.images import open_image

    def image(rel: Any, where: str):
        if not isinstance(rel, str):
            raise InputError(f"{where}: image {rel!r} is not a path string")
        return open_image(path.parent / rel)

    out = []
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        obj = json_object(line, where)
        if "pieces" in obj:
            out.append([p["text"] if "text" in p else image(p.get("image"), where) for p in obj["pieces"]])
        elif "image" in obj:
            out.append([image(obj["image"], where)] + ([obj["text"]] if obj.get("text") else []))
        elif "text" in obj:
            out.append([obj["text"]])
        else:
            raise InputError(f"{where}: expected 'pieces', 'image' or 'text'")
    return out


def load_samples(specs: list[str], limit: int, builtin_sizes: str | None = None) -> list[list[Any]]:
    """Documents (lists of text pieces and PIL images) from shards, `builtin` (held-out, drawn on the
    canvases `builtin_sizes` names: `python -m data_pipelines.builtin --sizes`) or files."""
    from data_pipelines.images import open_image
    from data_pipelines.loader import list_shards, read_tar
    from data_pipelines.shards import decode_sample

    docs: list[list[Any]] = []
    for spec in specs:
        path = Path(spec)
        if spec == "builtin":
            from data_pipelines.builtin import HELDOUT_SEED_OFFSET, builtin_samples
            docs += [decode_sample(s) for s in builtin_samples(limit, seed=HELDOUT_SEED_OFFSET, sizes=builtin_sizes)]
        elif path.suffix.lower() in IMAGE_SUFFIXES and path.exists():
            docs.append([open_image(path)])
        elif path.is_file() and path.suffix.lower() == ".txt":
            docs.append([_read_text(path)])
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

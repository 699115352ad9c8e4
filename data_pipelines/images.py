"""The one image decoder of every path that reads a picture: shards, evaluation tasks, inspection,
the transformers processor, the harness adapters and `ModelRunner`.

    to_rgb(img)          8-bit RGB; 16-bit greyscale scaled, not clipped to white
    open_image(path)     a regular file only (a FIFO would block the reader forever), decoded
                         whole; a bad file is an InputError naming it
"""
from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
from PIL import Image

from cmoe_base.commands import InputError


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale (PNG: mode I;16, or I) is scaled to 8 bits; Pillow's own
    `convert("RGB")` clips it instead, so nearly every pixel came out white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
        img = Image.fromarray(grey)
    return img.convert("RGB")


def check_regular_file(path: str | Path, what: str = "image") -> Path:
    """`path` if it is a regular file (symlinks followed); an InputError naming it otherwise."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path}: not a regular file (a folder, FIFO or device)")
    return path


def open_image(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, decoded whole."""
    path = check_regular_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"image {path}: cannot be decoded ({e})") from None

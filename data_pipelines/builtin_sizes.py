"""Canvases of the built-in images: one square (the default) or several sizes and aspect ratios.

    Canvases(64)                  every image a 64 x 64 square, scene grid 4 x 4 (the default data)
    Canvases(64, "mixed")         per image one of SIZE_PRESETS["mixed"] (in units of image_size):
                                  64², 128², 128x64, 64x128, 256x64, 64x256 px, half of them flat
    Canvases(64, "256x64,64x256") per image one of the listed sizes (width x height, px)

Objects keep one scale on every canvas: a scene cell (and the glyphs of rendered text) is image_size / 4
px whatever the canvas, so a larger canvas holds more cells, not larger shapes: a 256 x 64 scene has a
grid of 4 rows x 16 columns with the same 1-8 objects, mostly empty. With several sizes, half the images
(`FLAT_SHARE`) get a flat one-colour background instead of the textured one: large flat regions.
Rendered text is a word or number one cell high near the top left (on a wide canvas: a banner with a
wide empty rest), or on a tall canvas (height >= 2 x width) a receipt: lines of smaller text.
"""
from __future__ import annotations

import random
import re
from typing import NamedTuple

# Sizes as (width, height) in units of image_size.
SIZE_PRESETS = {"mixed": ((1, 1), (2, 2), (2, 1), (1, 2), (4, 1), (1, 4))}
FLAT_SHARE = 0.5  # with several sizes: share of images on a flat background
MIN_CELLS = 8     # a scene holds up to 8 objects in distinct cells
SIZE = re.compile(r"(\d+)x(\d+)")


class Canvas(NamedTuple):
    """An image's canvas: width x height px, a scene grid of rows x cols cells of `cell` px from the
    top left (the rest of each side a background margin), `flat`: a one-colour background."""
    width: int
    height: int
    cell: int
    rows: int = 4
    cols: int = 4
    flat: bool = False


def parse_sizes(spec: str, image_size: int) -> tuple[tuple[int, int], ...]:
    """`sizes` ("mixed", or "WxH,WxH,...") -> ((width, height), ...) px; a ValueError naming `sizes` when
    the spec is malformed or a canvas holds fewer than MIN_CELLS cells of image_size // 4 px."""
    if spec in SIZE_PRESETS:
        sizes = tuple((w * image_size, h * image_size) for w, h in SIZE_PRESETS[spec])
    else:
        parts = [SIZE.fullmatch(p.strip()) for p in spec.split(",")]
        if not spec.strip() or not all(parts):
            raise ValueError(f"sizes {spec!r}: expected a preset ({', '.join(SIZE_PRESETS)}) or a list of "
                             f"WIDTHxHEIGHT in px, e.g. 128x64,64x256")
        sizes = tuple((int(m[1]), int(m[2])) for m in parts)
    cell = image_size // 4
    for w, h in sizes:
        if cell < 1 or (w // cell) * (h // cell) < MIN_CELLS:
            raise ValueError(f"sizes {spec!r}: {w}x{h} px holds {(w // max(cell, 1)) * (h // max(cell, 1))} scene "
                             f"cells of {cell} px (image_size / 4); a scene needs at least {MIN_CELLS}")
    return sizes


class Canvases:
    """The canvas of each image: the square `image_size` (sizes None: draws nothing from the rng, so the
    data is the default's byte for byte), or per image a size of `sizes` and flat or not, from the rng."""

    def __init__(self, image_size: int, sizes: str | None = None):
        self.image_size = image_size
        self.sizes = None if sizes is None else parse_sizes(sizes, image_size)

    def draw(self, rng: random.Random) -> Canvas:
        """The next image's canvas."""
        cell = self.image_size // 4
        if self.sizes is None:
            return Canvas(self.image_size, self.image_size, cell)
        width, height = rng.choice(self.sizes)
        return Canvas(width, height, cell, height // cell, width // cell, flat=rng.random() < FLAT_SHARE)

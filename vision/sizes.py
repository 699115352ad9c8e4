"""Images at their own size (`vision.min_pixels` / `vision.max_pixels`): the size an image is resized to,
and the LM token grid that size gives.

An image keeps its aspect ratio and is scaled to fit the pixel budget [min_pixels, max_pixels], each
side rounded to a multiple of the *token unit* (uh, uw) = patch size × projector block (the pixels one
LM image token covers), so every image is a whole grid of tokens: (H / uh) rows × (W / uw) cols. This
is Qwen2-VL's `smart_resize` with a unit per side. With both budgets unset every image is resized to
the square `vision.img_size` as before (tokens_per_image tokens each).
"""
from __future__ import annotations

import math


def fit_size(height: int, width: int, unit: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H, W) for an image of (height, width): aspect ratio kept as closely as the unit allows,
    H % uh == W % uw == 0, and H·W within [min_pixels, max_pixels] (at least one unit per side; a
    budget smaller than one unit gives one token)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {(height, width)}: both sides must be > 0")
    uh, uw = unit
    h = max(uh, round(height / uh) * uh)
    w = max(uw, round(width / uw) * uw)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(uh, math.floor(height / beta / uh) * uh)
        w = max(uw, math.floor(width / beta / uw) * uw)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / uh) * uh
        w = math.ceil(width * beta / uw) * uw
    return h, w


def tile_grid(height: int, width: int, tile: tuple[int, int], max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (height, width): rows · cols <= max_tiles, the grid whose
    aspect ratio is closest to the image's, and among those the one whose area is closest to the
    image's (a small image: one tile, i.e. no tiling)."""
    th, tw = tile
    grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)]
    aspect = math.log(width / height)
    return min(grids, key=lambda g: (round(abs(aspect - math.log(g[1] * tw / (g[0] * th))), 9),
                                     abs(math.log(height * width / (g[0] * g[1] * th * tw)))))


def token_grid(height: int, width: int, unit: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of LM image tokens for an input of (height, width) pixels (already fitted)."""
    uh, uw = unit
    if height % uh or width % uw:
        raise ValueError(f"image size {(height, width)} is not a multiple of the token unit {unit} "
                         f"(patch size × projector block): resize it with vision.sizes.fit_size")
    return height // uh, width // uw

"""Where an image changes, from the pixels the model saw: works on any images, no masks needed.

Image token k of a (rows, cols) token grid covers one cell of the model-input image (the tensor
after the training transform, un-normalised to [0, 1] RGB): pixel rows r·H/rows to (r+1)·H/rows and
columns c·W/cols to (c+1)·W/cols, with (r, c) = divmod(k, cols) (the ViT's patches, each r×r block
merged by the projector's reduction, in raster order; `VLMConfig.image_grid`).

The chunker scores token k against its predecessor in raster order, k−1 (the last cell of the row
above for the first cell of a row) and, with `image_chunking: 2d`, also against the cell above,
taking the larger boundary probability. The same comparison on pixels: each cell is reduced to
SUBCELLS × SUBCELLS block means (which averages out pixel noise and keeps the layout), and token k
*repeats* when these differ from those of each cell it is scored against by at most
REPEAT_TOLERANCE in mean absolute value, and *changes* otherwise. The first token of an image is a
forced boundary (the modality switch) and has no predecessor in the image: it is neither.
Measured on 300 built-in scenes (a noisy gradient background, objects in the 4×4 cells;
docs/design.md §18): 93.5% of background-after-background tokens repeat, 93.2% of tokens next to an
object change (the rest sit beside an identical object).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

REPEAT_TOLERANCE = 0.04  # mean |Δ| between two cells' block means, in [0, 1] RGB: ~10 of 255 levels
SUBCELLS = 4             # each cell compared as SUBCELLS x SUBCELLS block means (fewer if it is smaller)


def model_pixels(image: torch.Tensor, mean_std: tuple[tuple[float, ...], tuple[float, ...]]) -> np.ndarray:
    """(3, H, W) normalised model input -> (H, W, 3) RGB in [0, 1] (the normalisation undone)."""
    mean, std = (np.asarray(x, dtype=np.float32) for x in mean_std)
    return np.clip(image.detach().cpu().float().permute(1, 2, 0).numpy() * std + mean, 0, 1)


def token_cells(pixels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) -> (P, h, w, 3): each image token's pixel cell as block means (h, w <= SUBCELLS),
    tokens in raster order."""
    rows, cols = grid
    H, W, C = pixels.shape
    if H % rows or W % cols:
        raise ValueError(f"image of {H}x{W} pixels does not split into the {rows}x{cols} token grid")
    ch, cw = H // rows, W // cols
    h, w = (max(n for n in range(1, SUBCELLS + 1) if size % n == 0) for size in (ch, cw))
    blocks = pixels.reshape(rows, h, ch // h, cols, w, cw // w, C).mean(axis=(2, 5))  # (rows, h, cols, w, C)
    return blocks.transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, C)


def cell_difference(pixels: np.ndarray, grid: tuple[int, int], above: bool = False) -> np.ndarray:
    """(P,) mean absolute difference between each token's cell and the cell(s) the chunker scores it
    against (raster predecessor; with `above`, the larger of that and the cell above);
    NaN for the first token."""
    cells = token_cells(pixels, grid)
    diff = np.full(len(cells), np.nan)
    diff[1:] = np.abs(cells[1:] - cells[:-1]).mean(axis=(1, 2, 3))
    cols = grid[1]
    if above and len(cells) > cols:
        diff[cols:] = np.maximum(diff[cols:], np.abs(cells[cols:] - cells[:-cols]).mean(axis=(1, 2, 3)))
    return diff


def change_repeat_rates(diffs: list[np.ndarray], boundaries: list[np.ndarray],
                        tolerance: float = REPEAT_TOLERANCE) -> dict[str, object]:
    """Pooled over images (each a (P,) cell difference and (P,) boundary mask): the boundary rate on
    changing and on repeating tokens, and their quotient (None when a rate is missing or the
    repeating rate is 0); the first token of each image is left out."""
    d = np.concatenate([x[1:] for x in diffs]) if diffs else np.zeros(0)
    b = np.concatenate([x[1:] for x in boundaries]) if boundaries else np.zeros(0, dtype=bool)
    out: dict[str, object] = {"tolerance": tolerance, "cell_blocks": SUBCELLS,
                              "first_tokens_excluded": len(diffs)}
    for name, sel in (("changing", d > tolerance), ("repeating", d <= tolerance)):
        n = int(sel.sum())
        out[name] = {"tokens": n, "boundaries": int(b[sel].sum()), "rate": float(b[sel].mean()) if n else None}
    rc, rr = out["changing"]["rate"], out["repeating"]["rate"]
    out["rate_changing_over_repeating"] = None if rc is None or not rr else rc / rr
    return out

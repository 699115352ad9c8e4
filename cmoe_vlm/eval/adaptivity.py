"""Does the chunker follow image content? Boundaries on held-out built-in images with object masks.

    from cmoe_vlm.eval.adaptivity import measure_adaptivity
    report = measure_adaptivity(runner, num_images=64)     # runner: cmoe_vlm.inference.runner.ModelRunner

The built-in images are drawn with known object masks (`data_pipelines.builtin.Drawing.labels`).
Each image token covers one cell of the image; its *content* is the set of object appearances
(colour, shape) that cover at least `min_cover` of the cell's pixels (the empty set: background).
Every image token but the first (a forced boundary at the modality switch) is compared with its
predecessor in raster order, the order the chunker scores it in:

    change   content differs from the predecessor's (object edges, object vs background)
    repeat   both are background (flat background after flat background)
    same     both show the same non-empty content (inside one object, or two equal objects)

A content-adaptive chunker puts boundaries on changing tokens more often than on repeating ones
(`change_over_repeat` = rate on change / rate on repeat; the project's target is >= 1.5). Also
measured: images with one chunk or with every token a boundary (`degenerate_fraction`), the
spread of p inside each image (`within_image_p_std`; 0 = every token scored alike, so whole images
flip between the two degenerate cases), the area under the ROC curve of p separating change from
repeat tokens (threshold-free; 0.5 = blind), and the evaluation-time (p >= 0.5) compression ratio
per modality pooled over all held-out documents the images came from. A model that takes images at
their own size (vision.max_pixels) is measured on the built-in images of several sizes (`heldout_sizes`),
each token grid its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cmoe_base import Modality
from data_pipelines.builtin import GROUNDED, HELDOUT_SEED_OFFSET, TEXT_CHARS, Drawing, builtin_documents
from data_pipelines.packing import split_point
from data_pipelines.shards import decode_sample

CHANGE, REPEAT, SAME = 0, 1, 2
KINDS = {CHANGE: "change", REPEAT: "repeat", SAME: "same"}


def token_contents(drawing: Drawing, grid: tuple[int, int], min_cover: float = 0.05) -> list[frozenset]:
    """Content of each image token in raster order: the (colour, shape) of the objects covering at
    least `min_cover` of its cell. The label map is resized (nearest) if the grid does not divide it."""
    rows, cols = grid
    labels = drawing.labels
    if labels.shape[0] % rows or labels.shape[1] % cols:
        from PIL import Image
        size = (cols * max(1, labels.shape[1] // cols), rows * max(1, labels.shape[0] // rows))
        labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
    h, w = labels.shape[0] // rows, labels.shape[1] // cols
    cells = labels.reshape(rows, h, cols, w).transpose(0, 2, 1, 3).reshape(rows * cols, h * w)
    out = []
    for cell in cells:
        ids, n = np.unique(cell, return_counts=True)
        out.append(frozenset((drawing.objects[i - 1].colour, drawing.objects[i - 1].shape)
                             for i, k in zip(ids.tolist(), n.tolist()) if i and k >= min_cover * cell.size))
    return out


def token_kinds(contents: list[frozenset]) -> np.ndarray:
    """(P,) CHANGE / REPEAT / SAME for each token against its predecessor; −1 for the first token."""
    kinds = np.full(len(contents), -1)
    for n in range(1, len(contents)):
        a, b = contents[n - 1], contents[n]
        kinds[n] = CHANGE if a != b else REPEAT if not b else SAME
    return kinds


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(a random positive scores above a random negative), ties counted half; None if a set is empty."""
    if not len(pos) or not len(neg):
        return None
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # average ranks over ties
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass
class ImageRecord:
    """One image as the model chunked it: per-token p and boundary, and the content kinds."""
    p: np.ndarray         # (P,)
    boundary: np.ndarray  # (P,) bool
    kinds: np.ndarray     # (P,) see token_kinds
    kind: str             # "text" for a rendered word or number, "scene" for shapes


def heldout_sizes(model) -> str | None:
    """The built-in canvases held-out measurements draw for `model` (a ConceptMoEVLM): "mixed" when it
    takes images at their own size (vision.max_pixels), else None: img_size squares (a square model
    would resize every canvas to its square; a tiled one reads a large canvas as several image blocks)."""
    return "mixed" if model.cfg.vision.variable_size else None


def heldout_documents(num_images: int, image_size: int, seed: int = 0, text_chars: int = TEXT_CHARS,
                      grounded: bool = GROUNDED, max_docs: int = 10_000,
                      sizes: str | None = None) -> list[tuple[list[Any], list[Drawing]]]:
    """Held-out built-in documents (pieces, drawings) in order until they hold >= num_images images;
    `sizes` as `builtin_documents`' (None: image_size squares)."""
    docs, n = [], 0
    for sample, drawings in builtin_documents(max_docs, image_size, seed + HELDOUT_SEED_OFFSET, text_chars, grounded,
                                              sizes):
        docs.append((decode_sample(sample), drawings))
        n += len(drawings)
        if n >= num_images:
            break
    return docs


@torch.no_grad()
def chunker_output(runner, seqs: list) -> tuple[np.ndarray, np.ndarray]:
    """Boundary probabilities and boundaries (B, T) of token sequences run as left-aligned rows of
    one batch (one document each), in the runner's eval mode: the one call into the model."""
    out, _ = runner.forward(seqs)
    return out.boundary_probs.float().cpu().numpy(), out.boundaries.cpu().numpy()


def chunk_documents(runner, docs: list[tuple[list[Any], list[Drawing]]],
                    batch_size: int = 8) -> tuple[list[ImageRecord], dict[str, list[int]]]:
    """Run each document alone (eval mode: p >= 0.5 boundaries); returns the image records (each on
    its image's own token grid) and the pooled (tokens, boundaries) per modality."""
    seqs, drawings = [], []
    for pieces, drawn in docs:
        seq = runner.sequence(pieces, add_eos=True)
        if len(seq) > runner.max_len:  # keep whole image blocks
            cut = split_point(seq, runner.max_len)
            kept = sum(s < cut for s, _ in seq.image_spans)
            seq.images, seq.image_spans, drawn = seq.images[:kept], seq.image_spans[:kept], drawn[:kept]
            seq.input_ids, seq.modality = seq.input_ids[:cut], seq.modality[:cut]
        seqs.append(seq)
        drawings.append(drawn)
    images, pooled = [], {"text": [0, 0], "image": [0, 0]}
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        p_all, b_all = chunker_output(runner, group)
        for row, seq in enumerate(group):
            mod = np.array(seq.modality)
            p, b = p_all[row, :len(seq)], b_all[row, :len(seq)]
            for m in Modality:
                pooled[m.label][0] += int((mod == m).sum())
                pooled[m.label][1] += int(b[mod == m].sum())
            for image, (start, _), drawing in zip(seq.images, seq.image_spans, drawings[i + row]):
                grid = runner.model.image_grid_of(image)
                sl = slice(start + 1, start + 1 + grid[0] * grid[1])  # after <img_start>
                images.append(ImageRecord(p[sl], b[sl].astype(bool), token_kinds(token_contents(drawing, grid)),
                                          "text" if drawing.objects[0].shape == "text" else "scene"))
    return images, pooled


def summarise_adaptivity(images: list[ImageRecord], pooled: dict[str, list[int]]) -> dict[str, Any]:
    """The adaptivity report (see the module docstring) from chunked images and pooled counts;
    `by_image_kind` repeats the image figures for scenes and for rendered text separately."""
    report = _image_figures(images)
    report["by_image_kind"] = {kind: _image_figures(sel) for kind in ("scene", "text")
                               if (sel := [r for r in images if r.kind == kind])}
    report["eval_ratio"] = {name: t / max(c, 1) for name, (t, c) in pooled.items() if t}
    report["eval_tokens"] = {name: t for name, (t, _) in pooled.items()}
    return report


def _image_figures(images: list[ImageRecord]) -> dict[str, Any]:
    kinds = np.concatenate([r.kinds for r in images])
    p = np.concatenate([r.p for r in images])
    b = np.concatenate([r.boundary for r in images])
    rates = {}
    for k, name in KINDS.items():
        sel = kinds == k
        rates[name] = {"tokens": int(sel.sum()), "boundary_rate": float(b[sel].mean()) if sel.any() else None,
                       "mean_p": float(p[sel].mean()) if sel.any() else None}
    rc, rr = rates["change"]["boundary_rate"], rates["repeat"]["boundary_rate"]
    ratio = None if rc is None or not rr else rc / rr  # None: undefined (no repeat boundaries at all)
    P = np.array([len(r.p) for r in images])  # each image's tokens (its own grid)
    per_image = np.array([int(r.boundary.sum()) for r in images])
    p_std = np.array([float(r.p[1:].std()) for r in images])  # the first token is forced (p = 1)
    ratios = P / np.maximum(per_image, 1)
    return {
        "images": len(images),
        "tokens_per_image": float(P.mean()),
        "kinds": rates,
        "change_over_repeat": ratio,
        "change_beats_repeat_by_1.5": bool(rc is not None and rr is not None and (rc >= 1.5 * rr) and rc > 0),
        "auc_change_vs_repeat": roc_auc(p[kinds == CHANGE], p[kinds == REPEAT]),
        "degenerate_fraction": float(((per_image <= 1) | (per_image == P)).mean()),
        "images_one_chunk": int((per_image <= 1).sum()),
        "images_all_boundaries": int((per_image == P).sum()),
        "within_image_p_std": {"mean": float(p_std.mean()), "median": float(np.median(p_std)),
                               "fraction_below_0.01": float((p_std < 0.01).mean())},
        "per_image_ratio": {"mean": float(ratios.mean()), "min": float(ratios.min()), "max": float(ratios.max())},
    }


def measure_adaptivity(runner, num_images: int = 64, seed: int = 0, text_chars: int = TEXT_CHARS,
                       grounded: bool = GROUNDED, batch_size: int = 8) -> dict[str, Any]:
    """Chunk >= `num_images` held-out built-in images (in their documents) and summarise. `seed`,
    `text_chars`, `grounded` as the built-in data was written with; the canvases follow the model
    (`heldout_sizes`)."""
    image_size = runner.model.vision.img_size[0]
    docs = heldout_documents(num_images, image_size, seed, text_chars, grounded, sizes=heldout_sizes(runner.model))
    images, pooled = chunk_documents(runner, docs, batch_size)
    report = summarise_adaptivity(images, pooled)
    report["documents"] = len(docs)
    return report

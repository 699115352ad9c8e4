"""What a model did with each sample: its eval-mode boundaries and probabilities, and the
compression statistics recomputed from them (which must agree with the model's own)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cmoe_base import Modality
from data_pipelines.packing import split_point

from ..inference.runner import ModelRunner
from .image_content import REPEAT_TOLERANCE, cell_difference, change_repeat_rates, model_pixels

P_BINS = np.linspace(0.0, 1.0, 21)


@dataclass
class SampleChunks:
    """One sample after the model: masks (T,) and what they imply."""

    input_ids: list[int]
    modality: np.ndarray      # (T,) 0 text, 1 image
    boundary: np.ndarray      # (T,) bool, the model's eval-mode boundaries
    p: np.ndarray             # (T,) boundary probability
    images: list[torch.Tensor]  # the transformed image tensors the model saw
    reported: dict[str, tuple[int, int]] = field(default_factory=dict)  # model's (tokens, concepts)
    image_diffs: list[np.ndarray] = field(default_factory=list)  # per image (P,) `cell_difference`
    image_grids: list[tuple[int, int]] = field(default_factory=list)  # per image its (rows, cols) of tokens

    def grid(self, k: int, default: tuple[int, int]) -> tuple[int, int]:
        """Image k's token grid (its own with vision.max_pixels), else `default` (the configured grid)."""
        return self.image_grids[k] if k < len(self.image_grids) else default

    def image_starts(self, default: tuple[int, int]) -> np.ndarray:
        """Position of each image's first token, counting the image positions off image by image (an
        image run may hold several images: tiles with vision.tile_boundaries learned)."""
        if not self.images:
            return image_starts(self.modality)
        sizes = [rows * cols for rows, cols in (self.grid(k, default) for k in range(len(self.images)))]
        return np.flatnonzero(self.modality == Modality.IMAGE)[np.cumsum([0] + sizes[:-1])]

    @property
    def chunk_id(self) -> np.ndarray:
        """(T,) index of the chunk holding each token (the open tail gets the next index)."""
        closed = np.cumsum(self.boundary)
        return closed - self.boundary

    def counts(self) -> dict[str, tuple[int, int]]:
        """modality -> (tokens, boundaries among them), recomputed from the masks."""
        out = {"all": (len(self.modality), int(self.boundary.sum()))}
        for m, name in ((m, m.label) for m in Modality):
            sel = self.modality == m
            out[name] = (int(sel.sum()), int(self.boundary[sel].sum()))
        return out

    def chunks(self) -> list[tuple[int, int, bool]]:
        """(start, end exclusive, closed) of each chunk in order; the open tail has closed False."""
        out, start = [], 0
        for t in np.flatnonzero(self.boundary):
            out.append((start, int(t) + 1, True))
            start = int(t) + 1
        if start < len(self.boundary):
            out.append((start, len(self.boundary), False))
        return out


def image_starts(modality: np.ndarray) -> np.ndarray:
    """Positions where an image's tokens begin."""
    is_image = modality == Modality.IMAGE
    return np.flatnonzero(is_image & ~np.r_[False, is_image[:-1]])


@torch.no_grad()
def analyse(runner: ModelRunner, docs: list[list[Any]]) -> list[SampleChunks]:
    from vision.transforms import image_mean_std

    mean_std = image_mean_std(runner.model.vision)
    above = runner.model.cfg.model.chunk.image_chunking == "2d"
    out = []
    for pieces in docs:
        seq = runner.sequence(pieces, add_eos=True)
        if len(seq) > runner.max_len:  # keep whole image blocks
            cut = split_point(seq, runner.max_len)
            seq.images = [img for img, (s, _) in zip(seq.images, seq.image_spans) if s < cut]
            seq.input_ids, seq.modality = seq.input_ids[:cut], seq.modality[:cut]
        res, _ = runner.forward([seq])
        out.append(SampleChunks(
            input_ids=list(seq.input_ids), modality=np.array(seq.modality),
            boundary=res.boundaries[0].cpu().numpy().astype(bool), p=res.boundary_probs[0].float().cpu().numpy(),
            images=list(seq.images),
            reported={k: (int(s.tokens), int(s.concepts)) for k, s in res.compression.items()},
            image_diffs=[cell_difference(model_pixels(img, mean_std), runner.model.image_grid_of(img), above)
                         for img in seq.images],
            image_grids=[runner.model.image_grid_of(img) for img in seq.images]))
    return out


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.array(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "p10": float(np.percentile(a, 10)),
            "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": float(a.max()), "samples": len(a)}


def image_records(samples: list[SampleChunks], grid: tuple[int, int]) -> list[dict[str, Any]]:
    """One record per image: where it is, its boundaries and ratio, the spread of p over its
    non-forced patches, and whether it is degenerate (one chunk, or every token a boundary). `grid`:
    the configured grid, for images without their own (`SampleChunks.image_grids`)."""
    out = []
    for i, s in enumerate(samples):
        for k, start in enumerate(s.image_starts(grid)):
            rows, cols = s.grid(k, grid)
            P = rows * cols
            n = int(s.boundary[start:start + P].sum())
            out.append({"sample": i, "image": k, "start": int(start), "grid": [rows, cols], "boundaries": n,
                        "ratio": round(P / max(n, 1), 2),
                        "p_std": float(s.p[start + 1:start + P].std()),  # the first patch is a forced boundary
                        "degenerate": "one chunk" if n <= 1 else "all boundaries" if n == P else None})
    return out


def images_to_show(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n images, most compressed first, covering the range: one per distinct ratio (the one
    with the most varied p), then a spread over all images by ratio."""
    order = sorted(records, key=lambda r: (-r["ratio"], -r["p_std"]))
    first_of_ratio: dict[float, dict[str, Any]] = {}
    for r in order:
        first_of_ratio.setdefault(r["ratio"], r)
    distinct = list(first_of_ratio.values())
    if len(distinct) >= n:
        return _evenly(distinct, n)
    rest = [r for r in order if all(r is not d for d in distinct)]
    return sorted(distinct + _evenly(rest, n - len(distinct)), key=lambda r: (-r["ratio"], -r["p_std"]))


def _evenly(items: list[Any], m: int) -> list[Any]:
    """m items spread evenly over the list, its first and last included (all of them if m >= len)."""
    if m >= len(items):
        return list(items)
    return [items[i] for i in sorted({round(x) for x in np.linspace(0, len(items) - 1, m)})]


def summarise(samples: list[SampleChunks], grid: tuple[int, int],
              tolerance: float = REPEAT_TOLERANCE) -> dict[str, Any]:
    per_mod: dict[str, Any] = {}
    mixed = open_tail = 0
    for name, m in (("all", None), *((m.label, m) for m in Modality)):
        tokens = concepts = 0
        ratios, lengths, probs = [], Counter(), []
        for s in samples:
            t, c = s.counts()[name]
            tokens, concepts = tokens + t, concepts + c
            if t:
                ratios.append(t / max(c, 1))
            sel = np.ones_like(s.modality, dtype=bool) if m is None else s.modality == m
            probs.append(s.p[sel])
            for start, end, closed in s.chunks():
                if closed:
                    n = int(sel[start:end].sum())
                    if n:
                        lengths[n] += 1
        probs_all = np.concatenate(probs) if probs else np.zeros(0)
        hist, _ = np.histogram(probs_all, bins=P_BINS)
        entry = {"tokens": tokens, "boundaries": concepts, "ratio": tokens / max(concepts, 1),
                 "ratio_per_sample": _spread(ratios),
                 "mean_p": float(probs_all.mean()) if probs_all.size else 0.0,
                 "chunk_length": {"mean": (sum(k * v for k, v in lengths.items()) / max(sum(lengths.values()), 1)),
                                  "max": max(lengths, default=0),
                                  "histogram": {str(k): lengths[k] for k in sorted(lengths)}},
                 "boundary_prob": {"bin_edges": [round(float(x), 3) for x in P_BINS], "counts": hist.tolist(),
                                   "fraction_at_or_above_0.5": float((probs_all >= 0.5).mean()) if probs_all.size else 0.0,
                                   # tokens whose decision a small change of p flips: a knife edge, where
                                   # the eval-time (thresholded) ratio swings far from the training one
                                   "fraction_within_0.05_of_0.5":
                                       float((np.abs(probs_all - 0.5) < 0.05).mean()) if probs_all.size else 0.0}}
        per_mod[name] = entry
    for s in samples:
        for start, end, closed in s.chunks():
            # a concept's content is the tokens of its span in its boundary token's modality; the other
            # modality's tail just before a switch joins no concept (cmoe_vlm.model.merge.SumMerge)
            if closed:
                mixed += int((s.modality[start:end] != s.modality[end - 1]).sum())
            open_tail += not closed
    records = image_records(samples, grid)
    if records:
        img = per_mod["image"]
        n = len(records)
        img["images"] = n
        img["per_image_boundaries"] = _spread([float(r["boundaries"]) for r in records])
        # per-image ratios are P / boundaries: a few discrete values, so counted, not summarised
        img["per_image_ratio"] = {f"{k:.2f}": v for k, v in sorted(Counter(r["ratio"] for r in records).items())}
        # how differently the chunker scores the patches of one image: near 0 = all-or-nothing images
        img["within_image_p_std"] = _spread([r["p_std"] for r in records])
        img["images_one_chunk"] = sum(r["degenerate"] == "one chunk" for r in records)
        img["images_all_boundaries"] = sum(r["degenerate"] == "all boundaries" for r in records)
        img["degenerate_fraction"] = (img["images_one_chunk"] + img["images_all_boundaries"]) / n
        with_pixels = [(s.image_diffs[k], s.boundary[st:st + len(s.image_diffs[k])])
                       for s in samples for k, st in enumerate(s.image_starts(grid)) if k < len(s.image_diffs)]
        if with_pixels:
            img["content"] = change_repeat_rates([d for d, _ in with_pixels], [b for _, b in with_pixels], tolerance)
        img["per_image"] = records
    reported = {}
    for name in ("all", "text", "image"):
        t = sum(s.reported.get(name, (0, 0))[0] for s in samples)
        c = sum(s.reported.get(name, (0, 0))[1] for s in samples)
        reported[name] = {"tokens": t, "concepts": c, "ratio": t / max(c, 1)}
    mismatch = [n for n in reported if (reported[n]["tokens"], reported[n]["concepts"])
                != (per_mod[n]["tokens"], per_mod[n]["boundaries"])]
    if mismatch:
        raise AssertionError(f"compression recomputed from the boundary masks disagrees with the model's own "
                             f"statistics for {mismatch}: {reported} vs masks")
    return {"num_samples": len(samples), "modalities": per_mod, "model_reported": reported,
            "tokens_left_out_before_modality_switch": mixed, "open_tail_chunks": open_tail, "image_grid": list(grid)}

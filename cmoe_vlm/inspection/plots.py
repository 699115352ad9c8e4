"""PNG figures of the inspection: per-image chunk maps, compression, chunk lengths, p histograms."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmoe_base import Modality

from .analysis import SampleChunks, image_starts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_chunk_map(s: SampleChunks, image_index: int, grid: tuple[int, int], mean_std, path: Path,
                    title: str) -> Path:
    """Two panels: the image as the model saw it, and the same image with its chunk map."""
    plt = _plt()
    from matplotlib import colormaps

    rows, cols = grid
    starts = image_starts(s.modality)
    start = int(starts[image_index])
    P = rows * cols
    cid = s.chunk_id[start:start + P].reshape(rows, cols)
    bnd = s.boundary[start:start + P].reshape(rows, cols)
    pgrid = s.p[start:start + P].reshape(rows, cols)
    mean, std = (torch.tensor(x).view(3, 1, 1) for x in mean_std)
    img = (s.images[image_index].cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    H, W = img.shape[:2]
    ch, cw = H / rows, W / cols
    uniq = {c: i for i, c in enumerate(sorted(set(cid.ravel().tolist())))}
    palette = colormaps["tab20"]
    colour = np.array([[palette(uniq[c] % 20)[:3] for c in row] for row in cid.tolist()])
    overlay = np.kron(colour, np.ones((int(math.ceil(ch)), int(math.ceil(cw)), 1)))[:H, :W]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.8))
    axes[0].imshow(img)
    axes[0].set_title("image (model input)", fontsize=9)
    axes[1].imshow(img)
    axes[1].imshow(overlay, alpha=0.55)
    for r in range(rows):  # white lines between cells of different chunks
        for c in range(cols):
            if c + 1 < cols and cid[r, c] != cid[r, c + 1]:
                axes[1].plot([(c + 1) * cw - 0.5] * 2, [r * ch - 0.5, (r + 1) * ch - 0.5], color="white", lw=2)
            if r + 1 < rows and cid[r, c] != cid[r + 1, c]:
                axes[1].plot([c * cw - 0.5, (c + 1) * cw - 0.5], [(r + 1) * ch - 0.5] * 2, color="white", lw=2)
            if bnd[r, c]:
                axes[1].plot((c + 0.5) * cw - 0.5, (r + 0.5) * ch - 0.5, "o", color="black", ms=5, mec="white")
    axes[1].set_title(f"chunk map: {len(uniq)} chunks, {int(bnd.sum())} boundaries (●)", fontsize=9)
    im = axes[2].imshow(pgrid, vmin=0, vmax=1, cmap="viridis")
    for r in range(rows):
        for c in range(cols):
            axes[2].text(c, r, f"{pgrid[r, c]:.2f}", ha="center", va="center", fontsize=7,
                         color="white" if pgrid[r, c] < 0.6 else "black")
    axes[2].set_title("boundary probability p per patch", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, "Patches are read in raster order (left→right, top→bottom); a boundary patch closes its "
             "chunk; the first patch's chunk may start in the text before the image.", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_plots(summary: dict[str, Any], samples: list[SampleChunks], out: Path, label: str,
                  targets: dict[str, float]) -> dict[str, str]:
    plt = _plt()
    mods = [m for m in ("text", "image") if summary["modalities"][m]["tokens"]]
    paths = {}
    # compression per modality: per-sample ratios (dots, box) and the pooled ratio (bar)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, m in enumerate(mods):
        code = int(Modality.TEXT if m == "text" else Modality.IMAGE)
        vals = [c[0] / max(c[1], 1) for c in (s.counts()[m] for s in samples) if c[0]]
        ax.bar(i, summary["modalities"][m]["ratio"], color="#9cc3e6" if m == "text" else "#f4b183", alpha=0.6,
               label="pooled ratio (all tokens / all boundaries)" if i == 0 else None)
        ax.boxplot([vals], positions=[i], widths=0.35, showfliers=False)
        ax.scatter(np.full(len(vals), i) + np.random.default_rng(code).uniform(-0.12, 0.12, len(vals)), vals, s=8,
                   color="k", alpha=0.5, label="one sample" if i == 0 else None)
    for name, r in targets.items():
        ax.axhline(r, ls="--", color="gray")
        ax.text(len(mods) - 0.5, r, f" target {name} R={r:g}", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(range(len(mods)), mods)
    ax.set_ylabel("compression ratio (tokens per chunk)")
    ax.set_title(f"{label}: compression per modality ({summary['num_samples']} samples)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "compression.png", dpi=100)
    plt.close(fig)
    paths["compression_png"] = str(out / "compression.png")
    def per_modality(name: str, title: str, draw) -> None:  # one panel per modality, saved as name.png
        fig, axes = plt.subplots(1, len(mods), figsize=(4.5 * len(mods), 3.5), squeeze=False)
        for ax, m in zip(axes[0], mods):
            draw(ax, m, summary["modalities"][m], "#9cc3e6" if m == "text" else "#f4b183")
        fig.suptitle(f"{label}: {title}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        paths[f"{name}_png"] = str(out / f"{name}.png")

    def chunk_lengths(ax, m, stats, colour) -> None:
        h = stats["chunk_length"]["histogram"]
        ax.bar([int(k) for k in h], list(h.values()), color=colour)
        ax.set_xlabel(f"{m} tokens in the chunk")
        ax.set_ylabel("chunks")
        ax.set_title(f"{m}: chunk lengths (mean {stats['chunk_length']['mean']:.2f})", fontsize=9)

    def boundary_probs(ax, m, stats, colour) -> None:
        bp = stats["boundary_prob"]
        edges = np.array(bp["bin_edges"])
        ax.bar(edges[:-1], bp["counts"], width=np.diff(edges), align="edge", color=colour, edgecolor="white")
        ax.axvline(0.5, color="red", ls="--", label="threshold 0.5")
        ax.set_xlabel("boundary probability p")
        ax.set_ylabel("tokens")
        ax.set_title(f"{m}: p ≥ 0.5 for {bp['fraction_at_or_above_0.5']:.0%} of tokens", fontsize=9)
        ax.legend(fontsize=7)

    per_modality("chunk_lengths", "how many tokens each chunk holds", chunk_lengths)
    per_modality("boundary_probs", "boundary probabilities (forced boundaries have p = 1)", boundary_probs)
    return paths

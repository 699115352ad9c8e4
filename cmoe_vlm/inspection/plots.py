"""PNG figures of the inspection: each shown image with its chunk map, p heatmap and changing cells;
compression per modality, chunk lengths, p histograms."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .analysis import SampleChunks
from .image_content import REPEAT_TOLERANCE, SUBCELLS, model_pixels

DISCRETE_MAX = 12   # at most this many distinct values: a bar per value, not a histogram
ANNOTATE_MAX_COLS = 16  # token grids up to this wide get their p written in each cell
COLOURS = {"text": "#5b9bd5", "image": "#ed7d31"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def annotate_cells(ax, values: np.ndarray, cmap, vmin: float, vmax: float, fmt: str = "{:.2f}",
                   fontsize: float = 10) -> None:
    """Write each cell's value over an imshow of `values` (rows, cols), black or white, whichever
    reads better on that cell's colour."""
    for (r, c), v in np.ndenumerate(values):
        rgb = cmap((v - vmin) / max(vmax - vmin, 1e-12))[:3]
        light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.5
        ax.text(c + 0.5, r + 0.5, fmt.format(v), ha="center", va="center", fontsize=fontsize,
                color="black" if light else "white")


def _outline_chunks(ax, cid: np.ndarray) -> None:
    """Thick lines between cells of different chunks (and around the image), in token units."""
    import matplotlib.patheffects as pe
    from matplotlib.collections import LineCollection

    rows, cols = cid.shape
    r, c = np.nonzero(cid[:, :-1] != cid[:, 1:])  # a vertical edge right of (r, c)
    segs = [[(x + 1, y), (x + 1, y + 1)] for y, x in zip(r, c)]
    r, c = np.nonzero(cid[:-1] != cid[1:])         # a horizontal edge below (r, c)
    segs += [[(x, y + 1), (x + 1, y + 1)] for y, x in zip(r, c)]
    segs += [[(0, 0), (cols, 0), (cols, rows), (0, rows), (0, 0)]]
    ax.add_collection(LineCollection(segs, colors="black", linewidths=2.5, capstyle="round",
                                     path_effects=[pe.Stroke(linewidth=4.5, foreground="white"), pe.Normal()]))


def image_chunk_map(s: SampleChunks, image_index: int, grid: tuple[int, int], mean_std, path: Path,
                    title: str, tolerance: float = REPEAT_TOLERANCE) -> Path:
    """Four panels over the image as the model saw it: the image with its token grid, the chunk map
    (a colour and an outline per chunk, a dot on each boundary token), the boundary probability p per
    token (colour bar), and which tokens change or repeat their predecessor's pixels."""
    plt = _plt()
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    rows, cols = s.grid(image_index, grid)  # the image's own grid (vision.max_pixels), else `grid`
    P = rows * cols
    start = int(s.image_starts(grid)[image_index])
    cid = s.chunk_id[start:start + P].reshape(rows, cols)
    bnd = s.boundary[start:start + P].reshape(rows, cols)
    pgrid = s.p[start:start + P].reshape(rows, cols)
    img = model_pixels(s.images[image_index], mean_std)
    H, W = img.shape[:2]
    extent = (0, cols, rows, 0)  # token units: cell (r, c) is the unit square at (c, r)
    grey = np.repeat(img.mean(-1, keepdims=True), 3, -1)
    fig, axes = plt.subplots(2, 2, figsize=(12, 12.5))
    (a_img, a_chunk), (a_p, a_content) = axes
    for ax in axes.ravel():
        ax.imshow(img if ax is a_img or ax is a_chunk else grey, extent=extent, interpolation="nearest")
        ax.set_xticks(range(cols + 1))
        ax.set_yticks(range(rows + 1))
        ax.tick_params(labelsize=8, length=0)
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
    a_img.grid(color="white", lw=0.6, alpha=0.7)
    a_img.set_title(f"model input: {H}×{W} px, {rows}×{cols} tokens of {H // rows}×{W // cols} px,\n"
                    f"read in raster order (left→right, top→bottom)", fontsize=11)

    # chunk map: colour and outline per chunk, a dot on each boundary (it closes its chunk)
    palette = colormaps["tab20"]
    order = {c: i for i, c in enumerate(sorted(set(cid.ravel().tolist())))}
    # tab20 holds 10 hues in dark/light pairs: neighbouring chunks get different hues
    colour = np.array([[palette((2 * order[c] + order[c] // 10) % 20)[:3] for c in row] for row in cid.tolist()])
    a_chunk.imshow(colour, extent=extent, alpha=0.5, interpolation="nearest")
    _outline_chunks(a_chunk, cid)
    br, bc = np.nonzero(bnd)
    a_chunk.scatter(bc + 0.5, br + 0.5, s=60, color="black", edgecolors="white", linewidths=1.5, zorder=3)
    nb = int(bnd.sum())
    a_chunk.set_title(f"chunk map: {len(order)} chunk{'s' * (len(order) != 1)} (a colour and an outline each),\n"
                      f"● = boundary token ({nb}), the last token of its chunk", fontsize=11)

    # p over the image
    cmap = colormaps["viridis"]
    im = a_p.imshow(pgrid, extent=extent, vmin=0, vmax=1, cmap=cmap, alpha=0.75, interpolation="nearest")
    if cols <= ANNOTATE_MAX_COLS:
        annotate_cells(a_p, pgrid, cmap, 0, 1, fontsize=11 if cols <= 8 else 7)
    bar = fig.colorbar(im, ax=a_p, fraction=0.046, pad=0.03)
    bar.set_label("boundary probability p (boundary at p ≥ 0.5)", fontsize=10)
    bar.ax.axhline(0.5, color="red", lw=2)
    p_rest = s.p[start + 1:start + P]
    a_p.set_title(f"boundary probability per token: mean {p_rest.mean():.2f}, spread (std) {p_rest.std():.3f}\n"
                  f"over the non-forced tokens (the first is forced, p = 1)", fontsize=11)

    # content: does each token's cell change from the one the chunker compares it with?
    diff = s.image_diffs[image_index] if image_index < len(s.image_diffs) else None
    if diff is not None:
        changes = (diff > tolerance).reshape(rows, cols)
        shade = np.zeros((rows, cols, 4))
        shade[changes] = (1.0, 0.35, 0.0, 0.55)
        shade[~changes] = (0.2, 0.2, 0.2, 0.55)
        shade[0, 0] = (1, 1, 1, 0.0)
        a_content.imshow(shade, extent=extent, interpolation="nearest")
        a_content.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, hatch="//", edgecolor="white", lw=0))
        a_content.scatter(bc + 0.5, br + 0.5, s=60, color="black", edgecolors="white", linewidths=1.5, zorder=3)
        ch, rp = changes.ravel()[1:], ~changes.ravel()[1:]
        b = bnd.ravel()[1:]
        a_content.set_title(f"boundaries on changing tokens: {int(b[ch].sum())}/{int(ch.sum())}, "
                            f"on repeating: {int(b[rp].sum())}/{int(rp.sum())}\n"
                            f"repeat: mean |Δ| of {SUBCELLS}×{SUBCELLS} block means ≤ {tolerance:g} "
                            f"vs the cell scored against", fontsize=11)
        a_content.legend(handles=[Patch(color=(1.0, 0.35, 0.0, 0.55), label="changes"),
                                  Patch(color=(0.2, 0.2, 0.2, 0.55), label="repeats"),
                                  Patch(facecolor="none", edgecolor="gray", hatch="//", label="first (forced)")],
                         loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=3, fontsize=10, frameon=False)
    else:
        a_content.set_axis_off()
    fig.suptitle(title, fontsize=13)
    fig.text(0.5, 0.005, "Axes in token cells. The first token's chunk may start in the text before the image; "
             "tokens after an image's last boundary join no concept (docs/design.md §4).", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.015, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def value_counts_panel(ax, values: list[float], colour: str) -> str:
    """The distribution of `values` on ax: a bar per distinct value when there are few (ratios of
    small images take only P / k values), else a histogram. Returns which ('bars' or 'histogram')."""
    from matplotlib.ticker import MaxNLocator

    distinct, counts = np.unique(np.round(values, 2), return_counts=True)
    if len(distinct) <= DISCRETE_MAX:
        span = distinct[-1] - distinct[0] if len(distinct) > 1 else 1.0
        ax.bar(distinct, counts, width=max(span * 0.03, 0.05), color=colour)
        ax.set_xticks(distinct, [f"{v:g}" for v in distinct], fontsize=9)
        for x, n in zip(distinct, counts):
            ax.text(x, n, str(n), ha="center", va="bottom", fontsize=9)
        kind = "bars"
    else:
        ax.hist(values, bins=20, color=colour, edgecolor="white")
        kind = "histogram"
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return kind


def chunk_length_panel(ax, m: str, stats: dict[str, Any], colour: str) -> None:
    """Chunks per length (tokens of modality m in the chunk), on integer axes."""
    from matplotlib.ticker import MaxNLocator

    h = stats["chunk_length"]["histogram"]
    ax.bar([int(k) for k in h], list(h.values()), color=colour)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"{m} tokens in the chunk")
    ax.set_ylabel("chunks")
    ax.set_title(f"{m}: chunk lengths (mean {stats['chunk_length']['mean']:.2f})", fontsize=10)


def summary_plots(summary: dict[str, Any], samples: list[SampleChunks], out: Path, label: str,
                  targets: dict[str, float]) -> dict[str, str]:
    """compression.png, chunk_lengths.png, boundary_probs.png under out: one panel per modality."""
    plt = _plt()
    mods = [m for m in ("text", "image") if summary["modalities"][m]["tokens"]]
    paths = {}

    def per_modality(name: str, title: str, draw) -> None:  # one panel per modality, saved as name.png
        fig, axes = plt.subplots(1, len(mods), figsize=(5.5 * len(mods), 4.2), squeeze=False)
        for ax, m in zip(axes[0], mods):
            draw(ax, m, summary["modalities"][m], COLOURS[m])
        fig.suptitle(f"{label}: {title}", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        paths[f"{name}_png"] = str(out / f"{name}.png")

    def compression(ax, m, stats, colour) -> None:
        if m == "image" and "per_image" in stats:
            values, unit = [r["ratio"] for r in stats["per_image"]], "images"
        else:
            values, unit = [t / max(b, 1) for t, b in (s.counts()[m] for s in samples) if t], "samples"
        value_counts_panel(ax, values, colour)
        ax.axvline(stats["ratio"], color="black", lw=1.5, label=f"pooled ratio {stats['ratio']:.2f}")
        if m in targets:
            ax.axvline(targets[m], color="gray", ls="--", lw=1.5, label=f"target R = {targets[m]:g}")
        elif "all" in targets:
            ax.axvline(targets["all"], color="gray", ls=":", lw=1.5,
                       label=f"joint target (all tokens) R = {targets['all']:g}")
        ax.set_xlabel(f"{m} ratio per {unit[:-1]} (tokens / boundaries)")
        ax.set_ylabel(unit)
        ax.set_title(f"{m}: compression of {len(values)} {unit}", fontsize=10)
        ax.legend(fontsize=8)

    def boundary_probs(ax, m, stats, colour) -> None:
        bp = stats["boundary_prob"]
        edges = np.array(bp["bin_edges"])
        ax.bar(edges[:-1], bp["counts"], width=np.diff(edges), align="edge", color=colour, edgecolor="white")
        ax.axvline(0.5, color="red", ls="--", label="threshold 0.5")
        ax.set_xlabel("boundary probability p")
        ax.set_ylabel("tokens")
        ax.set_title(f"{m}: p ≥ 0.5 for {bp['fraction_at_or_above_0.5']:.0%} of tokens", fontsize=10)
        ax.legend(fontsize=8)

    per_modality("compression", f"compression per modality ({summary['num_samples']} samples)", compression)
    per_modality("chunk_lengths", "how many tokens each chunk holds", chunk_length_panel)
    per_modality("boundary_probs", "boundary probabilities (forced boundaries have p = 1)", boundary_probs)
    return paths

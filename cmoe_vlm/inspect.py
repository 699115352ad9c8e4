"""How did a checkpoint chunk its inputs? Compression per modality, chunk lengths, boundary
probabilities, and single samples with their chunks drawn.

    python -m cmoe_vlm.inspect --model runs/tiny/final --data data/builtin/heldout --out inspect/
    python -m cmoe_vlm.inspect --model DIR --data builtin --out DIR         # regenerated held-out split
    python -m cmoe_vlm.inspect --model DIR --data a.png b.txt docs.jsonl --out DIR

Data: shard folders or tar patterns (as data.shards), `builtin` (the built-in held-out split,
regenerated), or files: images (one image each), .txt (one text each), .jsonl (lines of
{"pieces": [{"text"}|{"image": path}]}, {"image", "text"} or {"text"}; paths relative to the file).
Each sample is laid out as in training (bos ... eos) and run alone through the model in eval mode,
where boundaries are deterministic (p ≥ 0.5).

What is a chunk. The chunk module marks boundary tokens; a boundary token *closes* its chunk, which
holds the tokens after the previous boundary up to and including it (spec §2). The first token of a
document and (by default) the first token after a modality switch are forced boundaries (p = 1).
Tokens after the last boundary belong to no chunk yet ("open" tail). The compression ratio of a
modality is its tokens / the boundaries among them (what training logs as ratio_text/ratio_image).

Outputs in --out:
    compression.json        per modality: tokens, boundaries, pooled ratio, per-sample ratio spread,
                            mean p, chunk lengths, boundary-probability histogram, image extremes;
                            and the ratios the model itself reported (they must agree)
    samples.jsonl           per sample: modality and boundary masks, p, per-modality counts
    compression.png, chunk_lengths.png, boundary_probs.png
    samples.html            the first --show samples: text with chunks highlighted, image chunk maps
    sample_<i>.ansi.txt     the same text for a terminal (`cat` it); printed unless --quiet
    sample_<i>_image_<k>.png  image with its patch-level chunk map
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.packing import split_point

from .chunking import IMAGE, MODALITY_NAMES, TEXT
from .eval.runner import ModelRunner

ANSI_BG = ("\033[48;5;153m", "\033[48;5;223m", "\033[48;5;194m", "\033[48;5;225m")  # cycled per chunk
ANSI_RESET = "\033[0m"
HTML_BG = ("#cfe2ff", "#ffe5c2", "#d3f5d3", "#fbd3f2")
P_BINS = np.linspace(0.0, 1.0, 21)


# ----------------------------------------------------------------------------- data

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


# ----------------------------------------------------------------------------- analysis

@dataclass
class SampleChunks:
    """One sample after the model: masks (T,) and what they imply."""

    input_ids: list[int]
    modality: np.ndarray      # (T,) 0 text, 1 image
    boundary: np.ndarray      # (T,) bool, the model's eval-mode boundaries
    p: np.ndarray             # (T,) boundary probability
    images: list[torch.Tensor]  # the transformed image tensors the model saw
    reported: dict[str, tuple[int, int]] = field(default_factory=dict)  # model's (tokens, concepts)

    @property
    def chunk_id(self) -> np.ndarray:
        """(T,) index of the chunk holding each token (the open tail gets the next index)."""
        closed = np.cumsum(self.boundary)
        return closed - self.boundary

    def counts(self) -> dict[str, tuple[int, int]]:
        """modality -> (tokens, boundaries among them), recomputed from the masks."""
        out = {"all": (len(self.modality), int(self.boundary.sum()))}
        for m, name in MODALITY_NAMES.items():
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


@torch.no_grad()
def analyse(runner: ModelRunner, docs: list[list[Any]]) -> list[SampleChunks]:
    out = []
    for pieces in docs:
        seq = runner.sequence(pieces, add_eos=True)
        if len(seq) > runner.max_len:  # keep whole image blocks
            cut = split_point(seq, runner.max_len)
            seq.images = [img for img, (s, _) in zip(seq.images, seq.image_spans) if s < cut]
            seq.input_ids, seq.modality = seq.input_ids[:cut], seq.modality[:cut]
        ids = torch.tensor([seq.input_ids], device=runner.device)
        mod = torch.tensor([seq.modality], device=runner.device)
        images = torch.stack(seq.images).to(runner.device) if seq.images else None
        res = runner.model(ids, modality=mod, images=images, doc_ids=torch.zeros_like(ids))
        out.append(SampleChunks(
            input_ids=list(seq.input_ids), modality=np.array(seq.modality),
            boundary=res.boundaries[0].cpu().numpy().astype(bool), p=res.boundary_probs[0].float().cpu().numpy(),
            images=list(seq.images),
            reported={k: (int(s.tokens), int(s.concepts)) for k, s in res.compression.items()}))
    return out


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.array(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "p10": float(np.percentile(a, 10)),
            "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": float(a.max()), "samples": len(a)}


def summarise(samples: list[SampleChunks], grid: tuple[int, int]) -> dict[str, Any]:
    per_mod: dict[str, Any] = {}
    mixed = open_tail = 0
    for name, m in (("all", None), *((n, k) for k, n in MODALITY_NAMES.items())):
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
            # modality's tail just before a switch joins no concept (cmoe_vlm.chunking.merge_concepts)
            if closed:
                mixed += int((s.modality[start:end] != s.modality[end - 1]).sum())
            open_tail += not closed
    # per-image extremes (spec §12: whole images flip between one chunk and all boundaries)
    P = grid[0] * grid[1]
    per_image, p_std = [], []
    for s in samples:
        for start in np.flatnonzero((s.modality == IMAGE) & (np.r_[TEXT, s.modality[:-1]] != IMAGE)):
            per_image.append(int(s.boundary[start:start + P].sum()))
            p_std.append(float(s.p[start + 1:start + P].std()))  # the first patch is a forced boundary
    if per_image:
        per_mod["image"]["per_image_boundaries"] = _spread([float(x) for x in per_image])
        # how differently the chunker scores the patches of one image: near 0 = all-or-nothing images
        per_mod["image"]["within_image_p_std"] = _spread(p_std)
        per_mod["image"]["images_one_chunk"] = sum(x <= 1 for x in per_image)
        per_mod["image"]["images_all_boundaries"] = sum(x == P for x in per_image)
        per_mod["image"]["images"] = len(per_image)
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


# ----------------------------------------------------------------------------- text views

def token_strings(runner: ModelRunner, ids: list[int]) -> list[str]:
    tok = runner.tok
    special = {tok.bos_id: "⟨bos⟩", tok.eos_id: "⟨eos⟩", tok.img_start_id: "⟨img⟩", tok.img_end_id: "⟨/img⟩",
               tok.image_id: "▦", tok.pad_id: "⟨pad⟩"}
    if type(tok).__name__ == "ByteTokenizer":  # decode UTF-8 runs whole; show the char on its last byte
        out, buf = [], b""
        for i in ids:
            if i in special:
                out.append(special[i])
                buf = b""
                continue
            buf += bytes([i])
            try:
                out.append(buf.decode("utf-8"))
                buf = b""
            except UnicodeDecodeError:
                out.append("" if len(buf) < 4 else buf.decode("utf-8", "replace"))
                buf = b"" if len(buf) >= 4 else buf
        return out
    return [special.get(i, tok.decode([i])) for i in ids]


def ansi_view(s: SampleChunks, strings: list[str], color: bool = True) -> str:
    """Text with each chunk on a cycling background (or `|` after each boundary without colour);
    an image block is summarised as [image: P patches, K boundaries]."""
    out, t, T = [], 0, len(strings)
    cid = s.chunk_id
    while t < T:
        if s.modality[t] == IMAGE:
            end = t
            while end < T and s.modality[end] == IMAGE:
                end += 1
            k = int(s.boundary[t:end].sum())
            out.append(f"[image: {end - t} patches, {k} boundaries]")
            out.append("" if color else "|" if s.boundary[end - 1] else "")
            t = end
            continue
        text = strings[t].replace("\n", "↵\n")
        if color:
            out.append(f"{ANSI_BG[cid[t] % len(ANSI_BG)]}{text}{ANSI_RESET}")
        else:
            out.append(text + ("|" if s.boundary[t] else ""))
        t += 1
    return "".join(out)


def html_sample(s: SampleChunks, strings: list[str], idx: int, image_files: list[str]) -> str:
    parts, t, T, img_k = [], 0, len(strings), 0
    cid = s.chunk_id
    while t < T:
        if s.modality[t] == IMAGE:
            end = t
            while end < T and s.modality[end] == IMAGE:
                end += 1
            parts.append(f'<br><img src="{html.escape(image_files[img_k])}" alt="image {img_k}" class="map"><br>')
            img_k += 1
            t = end
            continue
        cls = "tok b" if s.boundary[t] else "tok"
        bg = HTML_BG[cid[t] % len(HTML_BG)]
        text = html.escape(strings[t]).replace("\n", "↵<br>")
        parts.append(f'<span class="{cls}" style="background:{bg}" title="p = {s.p[t]:.2f}, chunk {cid[t]}">'
                     f'{text}</span>')
        t += 1
    c = s.counts()
    stats = ", ".join(f"{k}: {n} tokens / {b} boundaries = {n / max(b, 1):.2f}" for k, (n, b) in c.items() if n)
    return f'<h2>Sample {idx}</h2><p class="stats">{stats}</p><div class="text">{"".join(parts)}</div>'


HTML_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>Chunk boundaries</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.9}}
.text{{font-family:monospace;white-space:pre-wrap;word-break:break-all}}
.tok{{padding:1px 0}} .tok.b{{border-right:3px solid #c00}} .map{{margin:.5em 0;max-width:48em}}
.stats{{color:#444}} .legend span{{padding:2px 6px;margin-right:4px}}</style></head><body>
<h1>How {model} chunks its input</h1>
<p>The model groups consecutive tokens into <b>chunks</b> (concepts); the expensive middle of the model
then runs once per chunk instead of once per token. Each chunk below has its own background colour
(the colours cycle). A <span style="border-right:3px solid #c00">red bar</span> marks a <b>boundary
token</b>: the last token of its chunk. Hover over a token to see its boundary probability p (a token
is a boundary when p &ge; 0.5); &#8629; is a line break, &#10216;bos&#10217;/&#10216;eos&#10217; start
and end a document, &#10216;img&#10217;/&#10216;/img&#10217; enclose an image.</p>
<p>Images are shown as pictures with their <b>chunk map</b>: each image token covers one cell of the
grid; cells of the same colour belong to one chunk, white lines separate different chunks, and a dot
marks a boundary patch. The compression ratio of a modality is its tokens divided by its boundaries
(higher = more compression).</p>
<p class="legend">Summary over {n} samples: {summary}. See compression.json and the PNG plots for the
distributions.</p>
"""


# ----------------------------------------------------------------------------- plots

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
    starts = np.flatnonzero((s.modality == IMAGE) & (np.r_[TEXT, s.modality[:-1]] != IMAGE))
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
        code = TEXT if m == "text" else IMAGE
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
    # chunk lengths
    fig, axes = plt.subplots(1, len(mods), figsize=(4.5 * len(mods), 3.5), squeeze=False)
    for ax, m in zip(axes[0], mods):
        h = summary["modalities"][m]["chunk_length"]["histogram"]
        ax.bar([int(k) for k in h], list(h.values()), color="#9cc3e6" if m == "text" else "#f4b183")
        ax.set_xlabel(f"{m} tokens in the chunk")
        ax.set_ylabel("chunks")
        ax.set_title(f"{m}: chunk lengths (mean {summary['modalities'][m]['chunk_length']['mean']:.2f})", fontsize=9)
    fig.suptitle(f"{label}: how many tokens each chunk holds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "chunk_lengths.png", dpi=100)
    plt.close(fig)
    paths["chunk_lengths_png"] = str(out / "chunk_lengths.png")
    # boundary probabilities
    fig, axes = plt.subplots(1, len(mods), figsize=(4.5 * len(mods), 3.5), squeeze=False)
    for ax, m in zip(axes[0], mods):
        bp = summary["modalities"][m]["boundary_prob"]
        edges = np.array(bp["bin_edges"])
        ax.bar(edges[:-1], bp["counts"], width=np.diff(edges), align="edge",
               color="#9cc3e6" if m == "text" else "#f4b183", edgecolor="white")
        ax.axvline(0.5, color="red", ls="--", label="threshold 0.5")
        ax.set_xlabel("boundary probability p")
        ax.set_ylabel("tokens")
        ax.set_title(f"{m}: p ≥ 0.5 for {bp['fraction_at_or_above_0.5']:.0%} of tokens", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{label}: boundary probabilities (forced boundaries have p = 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "boundary_probs.png", dpi=100)
    plt.close(fig)
    paths["boundary_probs_png"] = str(out / "boundary_probs.png")
    return paths


# ----------------------------------------------------------------------------- entry point

def inspect_model(model_dir: str | Path, data: list[str], out_dir: str | Path, num_samples: int = 64, show: int = 4,
                  color: bool = True, quiet: bool = False, runner: ModelRunner | None = None) -> dict[str, Any]:
    """Run the inspection; returns compression.json's content (plus the written paths)."""
    from vision.transforms import image_mean_std

    runner = runner or ModelRunner.load(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = analyse(runner, load_samples(data, num_samples))
    grid = runner.model.cfg.image_grid
    summary = summarise(samples, grid)
    summary["model"] = str(model_dir)
    chunk_cfg = runner.model.cfg.model.chunk
    summary["chunking_enabled"] = chunk_cfg.enabled
    targets = chunk_cfg.targets() if chunk_cfg.enabled else {}
    label = Path(str(model_dir)).name if model_dir else "model"
    if Path(str(model_dir)).name == "final":
        label = Path(str(model_dir)).parent.name
    paths = summary_plots(summary, samples, out, label, targets)
    with (out / "samples.jsonl").open("w") as f:
        for i, s in enumerate(samples):
            f.write(json.dumps({"sample": i, "modality": s.modality.tolist(),
                                "boundary": s.boundary.astype(int).tolist(),
                                "p": [round(float(x), 4) for x in s.p],
                                "counts": {k: {"tokens": t, "boundaries": b} for k, (t, b) in s.counts().items()}}) + "\n")
    mean_std = image_mean_std(runner.model.vision)
    html_parts = []
    for i, s in enumerate(samples[:show]):
        strings = token_strings(runner, s.input_ids)
        files = []
        for k in range(len(s.images)):
            name = f"sample_{i}_image_{k}.png"
            counts = s.counts()["image"]
            image_chunk_map(s, k, grid, mean_std, out / name,
                            f"{label}, sample {i}, image {k}: {grid[0]}×{grid[1]} patch tokens "
                            f"(sample image ratio {counts[0] / max(counts[1], 1):.2f})")
            files.append(name)
        paths[f"sample_{i}_images"] = [str(out / f) for f in files]
        view = ansi_view(s, strings, color=True)
        (out / f"sample_{i}.ansi.txt").write_text(view + "\n")
        if not quiet:
            print(f"--- sample {i} " + "-" * 40)
            print(view if color else ansi_view(s, strings, color=False))
        html_parts.append(html_sample(s, strings, i, files))
    mods = summary["modalities"]
    summ = ", ".join(f"{m} ratio {mods[m]['ratio']:.2f}" for m in ("all", "text", "image") if mods[m]["tokens"])
    head = HTML_HEAD.format(model=html.escape(label), n=len(samples), summary=summ)
    (out / "samples.html").write_text(head + "\n".join(html_parts) + "</body></html>\n")
    paths.update({"html": str(out / "samples.html"), "json": str(out / "compression.json"),
                  "samples_jsonl": str(out / "samples.jsonl")})
    summary["files"] = paths
    (out / "compression.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cmoe_vlm.inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    ap.add_argument("--data", required=True, nargs="+", help="shard folders/patterns, 'builtin', or files")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--show", type=int, default=4, help="samples rendered as HTML/terminal text/image maps")
    ap.add_argument("--no-color", action="store_true", help="terminal view with | after boundaries instead of colours")
    ap.add_argument("--quiet", action="store_true", help="do not print the sample views")
    args = ap.parse_args(argv)
    summary = inspect_model(args.model, args.data, args.out, args.num_samples, args.show,
                            color=not args.no_color and sys.stdout.isatty(), quiet=args.quiet)
    mods = summary["modalities"]
    for m in ("all", "text", "image"):
        if mods[m]["tokens"]:
            sp = mods[m]["ratio_per_sample"]
            print(f"{m:>5}: ratio {mods[m]['ratio']:.2f} (per sample {sp['mean']:.2f} ± {sp['std']:.2f}, "
                  f"{sp['min']:.2f}-{sp['max']:.2f}), mean p {mods[m]['mean_p']:.2f}, "
                  f"chunk length {mods[m]['chunk_length']['mean']:.2f}")
    print(f"tokens joining no concept (the other modality's tail before a switch): "
          f"{summary['tokens_left_out_before_modality_switch']}")
    print(f"wrote {args.out}/compression.json, samples.html and PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

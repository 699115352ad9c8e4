"""Text views of a sample's chunks: ANSI for a terminal, HTML for the report."""
from __future__ import annotations

import html
from typing import Any

from cmoe_base import Modality

from ..inference.runner import ModelRunner
from .analysis import SampleChunks

ANSI_BG = ("\033[48;5;153m", "\033[48;5;223m", "\033[48;5;194m", "\033[48;5;225m")  # cycled per chunk
ANSI_RESET = "\033[0m"
HTML_BG = ("#cfe2ff", "#ffe5c2", "#d3f5d3", "#fbd3f2")


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


def image_run_end(s: SampleChunks, t: int) -> int:
    """The end (exclusive) of the image run that starts at token t."""
    end = t
    while end < len(s.modality) and s.modality[end] == Modality.IMAGE:
        end += 1
    return end


def ansi_view(s: SampleChunks, strings: list[str], color: bool = True) -> str:
    """Text with each chunk on a cycling background (or `|` after each boundary without colour);
    an image block is summarised as [image: P patches, K boundaries]."""
    out, t, T = [], 0, len(strings)
    cid = s.chunk_id
    while t < T:
        if s.modality[t] == Modality.IMAGE:
            end = image_run_end(s, t)
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
        if s.modality[t] == Modality.IMAGE:
            end = image_run_end(s, t)
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


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def html_overview(summary: dict[str, Any], plots: list[str], images: list[tuple[str, dict[str, Any]]]) -> str:
    """The report's top: per-modality compression, what the image chunker does with changing and
    repeating content, the summary plots, and the chosen image maps (file, image record)."""
    mods = summary["modalities"]
    rows = []
    for m in ("all", "text", "image"):
        e = mods[m]
        if e["tokens"]:
            sp = e["ratio_per_sample"]
            rows.append(f"<tr><td>{m}</td><td>{e['tokens']}</td><td>{e['boundaries']}</td>"
                        f"<td><b>{e['ratio']:.2f}</b></td><td>{sp['min']:.2f} / {sp['median']:.2f} / {sp['max']:.2f}"
                        f"</td><td>{e['mean_p']:.2f}</td></tr>")
    parts = ['<h2>Compression</h2><table class="t"><tr><th></th><th>tokens</th><th>boundaries</th>'
             '<th>ratio</th><th>per sample min / median / max</th><th>mean p</th></tr>' + "".join(rows) + "</table>"]
    img = mods["image"]
    if img.get("images"):
        items = []
        c = img.get("content")
        if c:
            ch, rp = c["changing"], c["repeating"]
            q = c["rate_changing_over_repeating"]
            items.append(f"<li>Boundary rate on <b>changing</b> image tokens {_rate(ch['rate'])} "
                         f"({ch['boundaries']} of {ch['tokens']}), on <b>repeating</b> ones {_rate(rp['rate'])} "
                         f"({rp['boundaries']} of {rp['tokens']}); changing / repeating = "
                         f"{'n/a' if q is None else f'{q:.2f}'}. A token repeats when its pixel cell differs from "
                         f"the cell the chunker scores it against ({html.escape(summary['image_chunking'])} scan) "
                         f"by at most {c['tolerance']:g} in mean absolute value of their {c['cell_blocks']}×"
                         f"{c['cell_blocks']} block means ([0, 1] RGB, the image as the model saw it); the first "
                         f"token of each image ({c['first_tokens_excluded']}) is a forced boundary and left out.</li>")
        items.append(f"<li><b>Degenerate images</b>: {img['degenerate_fraction']:.0%} of {img['images']} "
                     f"({img['images_one_chunk']} one chunk, {img['images_all_boundaries']} every token a "
                     f"boundary).</li>")
        sd = img["within_image_p_std"]
        items.append(f"<li><b>Within-image spread of p</b> (std over each image's non-forced tokens): median "
                     f"{sd['median']:.3f}, range {sd['min']:.3f}-{sd['max']:.3f}; near 0 means the chunker scores "
                     f"every patch of an image alike (all-or-nothing images).</li>")
        counts = ", ".join(f"{r} &times; {n}" for r, n in img["per_image_ratio"].items())
        items.append(f"<li>Per-image ratios (ratio &times; images): {counts}.</li>")
        parts.append("<h2>Images</h2><ul>" + "".join(items) + "</ul>")
    parts.append("".join(f'<img src="{html.escape(p)}" alt="{html.escape(p)}" class="plot">' for p in plots))
    if images:
        parts.append(f"<h2>{len(images)} images, most compressed first</h2><p>Chosen over all "
                     f"{summary['num_samples']} samples to cover the range of per-image ratios. Each shows the "
                     "image as the model saw it, its chunk map (one colour and outline per chunk, &#9679; = "
                     "boundary token), the boundary probability per token and which tokens change or repeat "
                     "their predecessor's pixels.</p>")
        for name, r in images:
            parts.append(f'<p class="stats">sample {r["sample"]}, image {r["image"]}: ratio {r["ratio"]:.2f}, '
                         f'p spread {r["p_std"]:.3f}{", " + r["degenerate"] if r["degenerate"] else ""}</p>'
                         f'<img src="{html.escape(name)}" alt="{html.escape(name)}" class="map">')
    return "\n".join(parts) + "<h2>Samples</h2>\n"


HTML_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>Chunk boundaries</title>
<style>body{{font-family:sans-serif;max-width:80em;margin:2em auto;line-height:1.9}}
.text{{font-family:monospace;white-space:pre-wrap;word-break:break-all}}
.tok{{padding:1px 0}} .tok.b{{border-right:3px solid #c00}} .map{{margin:.5em 0;width:100%;max-width:64em}}
.plot{{max-width:100%;margin:.5em 0}} .t td,.t th{{padding:2px 10px;text-align:right}}
.stats{{color:#444}} .legend span{{padding:2px 6px;margin-right:4px}}</style></head><body>
<h1>How {model} chunks its input</h1>
<p>The model groups consecutive tokens into <b>chunks</b> (concepts); the expensive middle of the model
then runs once per chunk instead of once per token. Each chunk below has its own background colour
(the colours cycle). A <span style="border-right:3px solid #c00">red bar</span> marks a <b>boundary
token</b>: the last token of its chunk. Hover over a token to see its boundary probability p (a token
is a boundary when p &ge; 0.5); &#8629; is a line break, &#10216;bos&#10217;/&#10216;eos&#10217; start
and end a document, &#10216;img&#10217;/&#10216;/img&#10217; enclose an image.</p>
<p>Images are shown as pictures with their <b>chunk map</b>: each image token covers one cell of the
grid; cells of one colour, inside one outline, belong to one chunk, and a dot marks a boundary token.
The compression ratio of a modality is its tokens divided by its boundaries (higher = more compression).</p>
<p class="legend">Summary over {n} samples: {summary}. compression.json has every number below.</p>
"""

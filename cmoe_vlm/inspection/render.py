"""Text views of a sample's chunks: ANSI for a terminal, HTML for the report."""
from __future__ import annotations

import html

from cmoe_base import Modality

from ..runner import ModelRunner
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

"""`inspect_model`: run the analysis on a checkpoint and write the whole report to a folder."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..inference.runner import ModelRunner
from .analysis import analyse, images_to_show, summarise
from .image_content import REPEAT_TOLERANCE
from .plots import image_chunk_map, summary_plots
from .render import HTML_HEAD, ansi_view, html_overview, html_sample, token_strings
from .samples import load_samples


def inspect_model(model_dir: str | Path, data: list[str], out_dir: str | Path, num_samples: int = 64, show: int = 4,
                  images: int = 6, terminal: bool = False, color: bool = True,
                  tolerance: float = REPEAT_TOLERANCE, runner: ModelRunner | None = None) -> dict[str, Any]:
    """Run the inspection; returns compression.json's content (plus the written paths). `show`
    samples get text views, `images` images chosen over all samples (most compressed first, then a
    spread: `images_to_show`) get their maps; `terminal`: also print the text views (ANSI colours
    if `color`)."""
    from vision.transforms import image_mean_std

    runner = runner or ModelRunner.load(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = analyse(runner, load_samples(data, num_samples))
    grid = runner.model.cfg.image_grid
    summary = summarise(samples, grid, tolerance)
    summary["model"] = str(model_dir)
    chunk_cfg = runner.model.cfg.model.chunk
    summary["chunking_enabled"] = chunk_cfg.enabled
    summary["image_chunking"] = chunk_cfg.image_chunking
    targets = chunk_cfg.targets() if chunk_cfg.enabled else {}
    label = Path(str(model_dir)).name if model_dir else "model"
    if Path(str(model_dir)).name == "final":
        label = Path(str(model_dir)).parent.name
    paths: dict[str, Any] = summary_plots(summary, samples, out, label, targets)
    with (out / "samples.jsonl").open("w") as f:
        for i, s in enumerate(samples):
            f.write(json.dumps({"sample": i, "modality": s.modality.tolist(),
                                "boundary": s.boundary.astype(int).tolist(),
                                "p": [round(float(x), 4) for x in s.p],
                                "counts": {k: {"tokens": t, "boundaries": b} for k, (t, b) in s.counts().items()}}) + "\n")

    mean_std = image_mean_std(runner.model.vision)
    records = summary["modalities"]["image"].get("per_image", [])
    drawn: dict[tuple[int, int], str] = {}

    def draw(i: int, k: int) -> str:  # each image's map once, named by its sample and place
        if (i, k) not in drawn:
            r = next(r for r in records if (r["sample"], r["image"]) == (i, k))
            state = f", degenerate: {r['degenerate']}" if r["degenerate"] else ""
            name = f"sample_{i}_image_{k}.png"
            image_chunk_map(samples[i], k, grid, mean_std, out / name,
                            f"{label}, sample {i}, image {k}: ratio {r['ratio']:.2f} ({r['boundaries']} of "
                            f"{r['grid'][0] * r['grid'][1]} tokens are boundaries{state})", tolerance)
            drawn[(i, k)] = name
        return drawn[(i, k)]

    shown = [(draw(r["sample"], r["image"]), r) for r in images_to_show(records, images)]
    paths["images_shown"] = [str(out / name) for name, _ in shown]
    html_parts, plain_views = [], []
    for i, s in enumerate(samples[:show]):
        strings = token_strings(runner, s.input_ids)
        files = [draw(i, k) for k in range(len(s.images))]
        paths[f"sample_{i}_images"] = [str(out / f) for f in files]
        (out / f"sample_{i}.ansi.txt").write_text(ansi_view(s, strings, color=True) + "\n")
        plain_views.append(f"--- sample {i} " + "-" * 40 + "\n" + ansi_view(s, strings, color=False))
        if terminal:
            print(f"--- sample {i} " + "-" * 40)
            print(ansi_view(s, strings, color=color))
        html_parts.append(html_sample(s, strings, i, files))
    (out / "samples.txt").write_text("\n".join(plain_views) + "\n")
    mods = summary["modalities"]
    summ = ", ".join(f"{m} ratio {mods[m]['ratio']:.2f}" for m in ("all", "text", "image") if mods[m]["tokens"])
    head = HTML_HEAD.format(model=html.escape(label), n=len(samples), summary=summ)
    overview = html_overview(summary, [Path(paths[f"{n}_png"]).name for n in ("compression", "chunk_lengths",
                                                                              "boundary_probs")], shown)
    (out / "samples.html").write_text(head + overview + "\n".join(html_parts) + "</body></html>\n")
    paths.update({"html": str(out / "samples.html"), "json": str(out / "compression.json"),
                  "samples_jsonl": str(out / "samples.jsonl"), "samples_txt": str(out / "samples.txt")})
    summary["files"] = paths
    (out / "compression.json").write_text(json.dumps(summary, indent=2))
    return summary

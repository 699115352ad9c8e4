"""`inspect_model`: run the analysis on a checkpoint and write the whole report to a folder."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..runner import ModelRunner
from .analysis import analyse, summarise
from .plots import image_chunk_map, summary_plots
from .render import HTML_HEAD, ansi_view, html_sample, token_strings
from .samples import load_samples


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

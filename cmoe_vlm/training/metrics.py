"""Training metrics: JSONL file, TensorBoard scalars, and the progress-bar summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Writes one JSON object per logged step to OUT/metrics.jsonl and scalars to TensorBoard (rank 0).

    A run that starts at `start_step` (a resume; 0 for a fresh start) first drops the rows of later
    steps, which it is about to log again: the file keeps one row per step."""

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _step(line) is not None
                    and _step(line) <= start_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(path)
        self.file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # events of the steps about to be logged again are hidden (TensorBoard's purge_step)
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a crash mid-write


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in values.items()}

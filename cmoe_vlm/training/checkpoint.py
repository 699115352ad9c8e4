"""Atomic, rotating checkpoints through DeepSpeed, plus our own per-rank state.

Layout: OUT/checkpoints/step_00000100/ holds DeepSpeed's files (model, optimizer shards, scheduler)
and, per rank, `rank{r}.pt` with the step, the data-loader position and the RNG states. A
checkpoint is written under OUT/checkpoints/.staging/ and renamed into place only when every rank
has finished writing, so a crash mid-write never leaves a directory that looks complete.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep_last: int, rank: int):
        self.root = Path(out_dir) / "checkpoints"
        self.staging = self.root / ".staging"
        self.keep_last, self.rank = keep_last, rank

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine, step: int, extra: dict[str, Any]) -> Path:
        """Save engine + this rank's `extra` state (loader position, counters) atomically."""
        tag = f"step_{step:08d}"
        if self.rank == 0:
            shutil.rmtree(self.staging / tag, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.staging), tag=tag, save_latest=False)
        torch.save({"step": step, "rng": rng_state(), **extra}, self.staging / tag / f"rank{self.rank}.pt")
        _barrier()
        final = self.root / tag
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            (self.staging / tag).rename(final)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Restore the engine (model, optimizer, scheduler) and return this rank's saved state."""
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        state = torch.load(path / f"rank{self.rank}.pt", weights_only=False)
        set_rng_state(state["rng"])
        return state

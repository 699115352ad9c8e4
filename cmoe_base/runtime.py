"""Process-wide defaults that must be in the environment before torch (OpenMP) or DeepSpeed load.

`import cmoe_base` applies them, and every package of the project imports it first, so direct
commands (`python train_vlm.py`, `python -m cmoe_vlm.eval`, console commands) get what the
Makefile used to set. A value already in the environment wins.

- OMP_WAIT_POLICY=PASSIVE: OpenMP threads otherwise spin-wait between parallel regions; on a
  shared 2-core machine a tiny model's 24-token generation took 18 s instead of 0.8 s, and training
  steps several times longer (measured, docs/design.md §12).
- DS_ACCELERATOR: `cuda` where nvidia-smi exists, else `cpu`; DeepSpeed otherwise probes every
  accelerator package it knows and warns that it fell back to the CPU.
"""
from __future__ import annotations

import os
import shutil


def apply_runtime_defaults() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if shutil.which("nvidia-smi") else "cpu")

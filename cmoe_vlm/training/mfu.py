"""Model FLOPs utilisation: the FLOPs a training step realized, over its time, over the device's peak.

    flops = step_flops(model, batch, out)          # host arithmetic on host counts: no device read
    peak, source = peak_flops(device, bf16=True)    # FLOP/s, and where the figure comes from
    mfu = flops / seconds / peak

A step is credited with what it ran (`cmoe_vlm.flops.realized_flops`): the LM's token-level work
for each real token, concept-level work for each concept the merger made, attention maps at the
documents' own lengths (causal), the vision tower on the images present; training = 3 × forward
(activation checkpointing's recomputation is not credited, as usual for MFU). Padding is not.

Peaks: accelerators from a table of dense tensor-core peaks (`PEAK_TFLOPS`); a CPU's is measured
once (a short matmul benchmark at the current thread count) and cached in
$XDG_CACHE_HOME/cmoe-vlm/peak_flops.json (default ~/.cache; $CMOE_CACHE_DIR replaces the folder), keyed
by CPU model, threads and dtype, with the time and load average of the measurement (both shown in
summary.json's `peak_source`). `train.peak_tflops` overrides both. On a shared machine the measured
peak is what the machine gave at that moment: delete the cache file to measure again.
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch
from torch import nn

from cmoe_base import Batch

from .. import flops

# Dense (no structured sparsity) peaks in TFLOP/s: (bf16 tensor core, fp32). A key matches whole words of
# the device name ("L4" is not "L40"); the first match wins, so longer names come first.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 67.0), "H100 PCIe": (756.0, 51.0), "H100 NVL": (835.0, 60.0), "H100": (989.0, 67.0),
    "A100": (312.0, 19.5), "L40S": (362.0, 91.6), "L40": (181.0, 90.5), "L4": (121.0, 30.3), "A10": (125.0, 31.2),
}


def accelerator_peak(name: str, bf16: bool) -> float | None:
    """FLOP/s of a GPU named `name` (torch.cuda.get_device_name), or None if it is not in the table."""
    for key, (p_bf16, p_fp32) in PEAK_TFLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return (p_bf16 if bf16 else p_fp32) * 1e12
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_file() -> Path:
    """$CMOE_CACHE_DIR/peak_flops.json, else under $XDG_CACHE_HOME/cmoe-vlm (default ~/.cache/cmoe-vlm)."""
    folder = os.environ.get("CMOE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmoe-vlm"
    return Path(folder) / "peak_flops.json"


def measure_matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 0.25) -> float:
    """FLOP/s of a (size × size) @ (size × size) matmul on the CPU at the current thread count: the
    best of three timed runs of ~`seconds / 3` each, after a warm-up. Its own generator: a training run
    that measures (an empty cache) must draw the same random numbers as one that reads the cache."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 3:
            a @ b
            n += 1
        best = max(best, 2 * size ** 3 * n / elapsed)
    return best


def cpu_peak(bf16: bool) -> tuple[float, str]:
    """The CPU's matmul FLOP/s in the training dtype, measured on first use and cached, with when and
    under what load (1-minute load average) it was measured: the figure MFU is divided by."""
    key = f"{cpu_model()} | threads={torch.get_num_threads()} | {'bf16' if bf16 else 'fp32'}"
    path = cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float))):  # older caches: a bare number
        cached = cached if isinstance(cached, dict) else {}
        load = os.getloadavg()[0]
        cached[key] = {"flops": measure_matmul_peak(torch.bfloat16 if bf16 else torch.float32),
                       "measured": time.strftime("%Y-%m-%d %H:%M"), "load": round(load, 2)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: measure again next time
    entry = cached[key]
    return float(entry["flops"]), f"measured {entry['measured']} at load average {entry['load']}"


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for training on `device` in bf16 or fp32; None when unknown
    (an accelerator missing from PEAK_TFLOPS: set train.peak_tflops)."""
    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = accelerator_peak(name, bf16)
        return peak, f"table ({name})" if peak else f"unknown GPU {name!r}: set train.peak_tflops"
    peak, when = cpu_peak(bf16)
    return peak, (f"measured matmul ({cpu_model()}, {torch.get_num_threads()} threads, {when}, cached in "
                  f"{cache_file()}: delete it to measure again)")


def vision_flops_per_image(model: nn.Module, size: tuple[int, int] | None = None) -> float:
    """Forward FLOPs of the vision tower on one image (of `size` (H, W); None = img_size), as 2 ×
    parameters × the tokens each part runs on (ViT: patches and prefix tokens; projector: its output
    tokens); the ViT's attention map is left out (64 patches at the default image size: under 1% of the tower)."""
    vit = model.vision.vit
    if size is None:
        patches, out_tokens = model.vision.num_patches, model.cfg.tokens_per_image
    else:
        rows, cols = model.vision.grid_for(*size)
        out_rows, out_cols = model.projector.output_grid((rows, cols))
        patches, out_tokens = rows * cols, out_rows * out_cols
    tokens = patches + vit.num_prefix_tokens
    vit_params = sum(p.numel() for p in vit.parameters())
    proj_params = sum(p.numel() for p in model.projector.parameters())
    return 2.0 * (vit_params * tokens + proj_params * out_tokens)


def forward_flops(model: nn.Module, batch: Batch, concept_lengths) -> float:
    """Realized forward FLOPs of a ConceptMoEVLM (or a bare ConceptMoE) on `batch`; host data only.
    Images at their own size (batch.image_sizes) count each image's own patches and tokens."""
    lm = getattr(model, "lm", model)
    total = flops.realized_flops(lm.cfg, batch.layout.lengths, concept_lengths)["total"]
    if hasattr(model, "vision") and batch.images is not None:
        if batch.image_sizes is None:
            total += vision_flops_per_image(model) * batch.images.shape[0]
        else:
            total += sum(vision_flops_per_image(model, size) for size in batch.image_sizes)
    return total


def step_flops(model: nn.Module, batch: Batch, out) -> float:
    """Training FLOPs (3 × forward) a step realized on `batch`, whose forward returned `out`."""
    return 3.0 * forward_flops(model, batch, out.concept_lengths)

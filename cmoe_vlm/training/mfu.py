"""Model FLOPs utilisation: the FLOPs a training step realized, over its time, over the device's peak.

    flops = step_flops(model, batch, out)          # host arithmetic on host counts: no device read
    peak, source = peak_flops(device, bf16=True)    # FLOP/s, and where the figure comes from
    mfu = flops / seconds / peak

A step is credited with what it ran (`cmoe_vlm.flops.realized_flops`): the LM's token-level work
for each real token, concept-level work for each concept the merger made, attention maps at the
documents' own lengths (causal), the vision tower on the images present; training = 3 × forward
(activation checkpointing's recomputation is not credited, as usual for MFU). Padding is not.

Peaks: accelerators from a table of dense tensor-core peaks (`PEAK_TFLOPS`). A CPU's is the fp32 (or
bf16) matmul rate at the current thread count, measured before the data loader's workers start, ~3 s
over three sizes (median per size, best size; `measure_matmul_peak`), and cached in
$XDG_CACHE_HOME/cmoe-vlm/peak_flops.json (default ~/.cache; $CMOE_CACHE_DIR replaces the folder), keyed
by CPU model, threads and dtype, with the time and load it was measured at. Only a quiet measurement
is cached (the threads ran >= 90% of the wall time: other jobs did not hold the cores), and only
when higher than the cached one; entries expire after 30 days. When a window of steps realizes more
than the peak in use, it is measured again and raised (`raised_peak`): no MFU above 100% is reported.
`train.peak_tflops` overrides all of it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
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


PEAK_SIZES = (1024, 2048, 3072)  # square fp32/bf16 matmuls timed for a CPU peak: the best size wins
QUIET_UTILISATION = 0.9          # a measurement is cached only if its threads ran at least this share of the time
CACHE_DAYS = 30                  # a cached peak older than this is measured again


@dataclass
class Peak:
    """A CPU peak measurement: FLOP/s, and the conditions it was taken in."""
    flops: float
    measured_at: float     # Unix time
    load: tuple[float, float, float]  # os.getloadavg() just before
    utilisation: float     # process CPU time / (wall time × threads) while timing: < 1 when other jobs took the cores
    threads: int

    @property
    def quiet(self) -> bool:
        return self.utilisation >= QUIET_UTILISATION

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.measured_at))
        return (f"measured matmul ({cpu_model()}, {self.threads} threads, {when}, load {self.load[0]:.1f}, "
                f"utilisation {self.utilisation:.2f}{'' if self.quiet else ', contended: not cached'})")


def measure_matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = PEAK_SIZES, seconds: float = 3.0) -> Peak:
    """The CPU's matmul FLOP/s at the current thread count: for each size n (n × n @ n × n) a warm-up,
    then repeated timed matmuls for ~`seconds / len(sizes)`; a size's rate is the median over its
    matmuls, the peak the best size's. Also records the load and how much of the wall time the threads
    actually ran (process CPU time / wall / threads), which tells a contended measurement from a quiet
    one. Its own generator: a training run that measures (an empty cache) must draw the same random
    numbers as one that reads the cache."""
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    load = os.getloadavg()
    best, wall, cpu = 0.0, 0.0, 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        a @ b
        rates = []
        t_end = time.perf_counter() + seconds / len(sizes)
        while not rates or time.perf_counter() < t_end:
            t0, c0 = time.perf_counter(), time.process_time()
            a @ b
            dt = time.perf_counter() - t0
            wall, cpu = wall + dt, cpu + time.process_time() - c0
            rates.append(2 * n ** 3 / dt)
        best = max(best, statistics.median(rates))
    return Peak(best, time.time(), load, min(cpu / max(wall * threads, 1e-9), 1.0), threads)


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _store(path: Path, key: str, peak: Peak) -> None:
    """Cache `peak` under `key` if it was measured quietly and beats what is cached (see `cpu_peak`)."""
    if not peak.quiet:
        return
    cached = _read_cache(path)
    old = cached.get(key)
    if isinstance(old, dict) and old.get("flops", 0) >= peak.flops and time.time() - old.get("measured_at", 0) < CACHE_DAYS * 86400:
        return
    cached[key] = dataclasses.asdict(peak)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measure again next time


def cpu_peak(bf16: bool, fresh: bool = False) -> Peak:
    """The CPU's matmul peak in the training dtype: the cached one (quiet, at most CACHE_DAYS old), else
    measured now. A measurement is cached only when quiet (utilisation >= QUIET_UTILISATION) and
    higher than the cached one: a peak taken while other jobs held the cores is used for this run but
    never becomes the machine's. `fresh` measures even with a cached peak (and returns the higher)."""
    key = f"{cpu_model()} | threads={torch.get_num_threads()} | {'bf16' if bf16 else 'fp32'}"
    path = cache_file()
    old = _read_cache(path).get(key)
    cached = None
    if isinstance(old, dict) and time.time() - old.get("measured_at", 0) < CACHE_DAYS * 86400:
        try:
            cached = Peak(float(old["flops"]), float(old["measured_at"]), tuple(old["load"]), float(old["utilisation"]),
                          int(old["threads"]))
        except (KeyError, TypeError, ValueError):
            cached = None  # an older format (a bare number, measured in 0.25 s): measure again
    if cached is not None and not fresh:
        return cached
    peak = measure_matmul_peak(torch.bfloat16 if bf16 else torch.float32)
    _store(path, key, peak)
    return peak if cached is None or peak.flops > cached.flops else cached


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for training on `device` in bf16 or fp32; None when unknown
    (an accelerator missing from PEAK_TFLOPS: set train.peak_tflops)."""
    if override_tflops:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = accelerator_peak(name, bf16)
        return peak, f"table ({name})" if peak else f"unknown GPU {name!r}: set train.peak_tflops"
    peak = cpu_peak(bf16)
    return peak.flops, f"{peak.describe()}, cache {cache_file()}"


def raised_peak(achieved: float, bf16: bool) -> tuple[float, str]:
    """A CPU step realized `achieved` FLOP/s, more than the peak in use: measure again (cached if quiet)
    and return the larger of the new peak and `achieved`, so that no MFU above 100% is reported."""
    peak = cpu_peak(bf16, fresh=True)
    if peak.flops >= achieved:
        return peak.flops, f"re-{peak.describe()} after a step exceeded the earlier peak"
    return achieved, f"a step's achieved FLOP/s (above a fresh {peak.describe()})"


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

"""Training metrics: the record of a logged step, the JSONL file, trackers (TensorBoard, Weights & Biases),
the progress-bar summary.

    window.add(tokens, flops, seconds, out.compression)            # every step (host numbers)
    record = step_record(losses, out, window, ...)                  # on log steps: the flat record
    logger.log(step, record)                                        # metrics.jsonl and the trackers

OUT/metrics.jsonl keeps the flat keys of each logged step. Trackers get them under namespaces:
`train/` (losses, lr, grad norm, throughput, expert load, skipped samples), `compression/` (ratios,
token and concept counts, targets, the ratio controller; the held-out boundary-probability and
chunk-length histograms per modality) and `eval/` (the held-out evaluation: LM loss, bits per
token, per-modality ratio and mean p with the evaluation threshold).

Weights & Biases is an optional extra (`pip install 'cmoe-vlm[wandb]'`, `train.wandb=true`);
`train.wandb_mode=offline` writes the run under OUT/wandb for a later `wandb sync`. A resumed run
continues the same W&B run (its id is kept in OUT/wandb_run_id).
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmoe_base import IGNORE_INDEX, Batch, Modality

from ..model.compression import ModalityStats
from ..model.conceptmoe import ModelOutput
from ..objective import Losses, RatioController

COMPRESSION_KEY = re.compile(r"^(ratio_(all|text|image)$|ratio_window_|tokens_(all|text|image)$|concepts_|"
                             r"target_ratio_|ratio_integral_|forced_boundary_prob$|source_.+_(ratio|tokens)$)")


def tracker_tag(key: str) -> str:
    """A metrics.jsonl key -> its tracker tag: `compression/...` or `train/...`."""
    return f"compression/{key}" if COMPRESSION_KEY.match(key) else f"train/{key}"


@dataclass
class Window:
    """Host sums over the steps since the last log step: a step reads the device only for the gradient-norm
    check of fp32 ZeRO-0; losses, compression and expert counts are read on log steps."""
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    compression: list[dict[str, ModalityStats]] = field(default_factory=list)  # one per step, for the monitor

    def add(self, tokens: int, flops: float, seconds: float, compression: dict[str, ModalityStats]) -> None:
        self.tokens += tokens
        self.flops += flops
        self.seconds += seconds
        self.compression.append(compression)


def throughput(window: Window, world: int, peak: float | None) -> dict[str, float]:
    """tokens/s (all ranks), training FLOPs per token and TFLOP/s (this rank) and MFU over the steps
    of `window`."""
    seconds = max(window.seconds, 1e-9)
    rate = window.flops / seconds
    return {"tokens_per_s": window.tokens * world / seconds,
            "flops_per_token": window.flops / max(window.tokens, 1), "tflops": rate / 1e12,
            **({"mfu": rate / peak} if peak else {})}


def expert_load(tokens_per_expert: list[torch.Tensor]) -> dict[str, float]:
    """Max/mean assignments per expert, averaged over MoE layers (1 = perfectly balanced)."""
    imbalance = [float(c.max()) / max(float(c.float().mean()), 1e-9) for c in tokens_per_expert if c.numel()]
    return {"max_over_mean": sum(imbalance) / max(len(imbalance), 1)}


def compression_summary(stats: dict[str, ModalityStats]) -> dict[str, float]:
    """ratio, tokens and concepts of each token set with tokens in the batch."""
    out = {}
    for k, s in stats.items():
        if float(s.tokens):
            out[f"ratio_{k}"], out[f"tokens_{k}"], out[f"concepts_{k}"] = s.ratio, int(s.tokens), int(s.concepts)
    return out


def source_metrics(out: ModelOutput, batch: Batch, names: list[str]) -> dict[str, float]:
    """Per mixture source (`data.mixture`, more than one source) in a micro-batch: its LM loss over the
    predicted tokens of its documents (`source_<name>_lm_loss`), its tokens and its compression
    (`source_<name>_ratio`: tokens / concepts, with chunking). {} with one source or no source ids."""
    if len(names) < 2 or batch.source_ids is None or batch.labels is None:
        return {}
    src = batch.source_ids.reshape(-1)
    labels = batch.labels.reshape(-1)
    n = len(names)
    predicted = (labels != IGNORE_INDEX) & (src >= 0)
    logits = out.logits.detach().reshape(-1, out.logits.shape[-1])[predicted].float()  # (N, V): predicted only
    nll = F.cross_entropy(logits, labels[predicted], reduction="none")
    loss_sum = torch.zeros(n, device=src.device).index_add_(0, src[predicted], nll)
    counts = torch.bincount(src[predicted], minlength=n)
    tokens = torch.bincount(src[src >= 0], minlength=n)
    record: dict[str, float] = {}
    concepts = None
    if out.boundaries is not None:
        b = out.boundaries.reshape(-1) & (src >= 0)
        concepts = torch.bincount(src[b], minlength=n)
    for i, name in enumerate(names):
        if int(tokens[i]):
            record[f"source_{name}_tokens"] = int(tokens[i])
        if int(counts[i]):
            record[f"source_{name}_lm_loss"] = float(loss_sum[i] / counts[i])
        if concepts is not None and int(concepts[i]):
            record[f"source_{name}_ratio"] = int(tokens[i]) / int(concepts[i])
    return record


def step_record(losses: Losses, out: ModelOutput, window: Window, *, lr: float, world: int, peak: float | None,
                windowed_ratios: dict[str, float], targets: dict[str, float], skipped_samples: dict[str, int],
                skipped_steps: int, grad_norm: float | None, controller: RatioController | None = None,
                forced_boundary_prob: float | None = None, compiled_graphs: int | None = None,
                sources: dict[str, float] | None = None) -> dict[str, Any]:
    """The flat record of a logged step: its last micro-batch's losses and compression (also per mixture
    source: `source_metrics`), the window's
    throughput, the collapse monitor's windowed ratios, expert load, skip counters, the compression
    targets and controller, the conversion ramp's forced-boundary probability, compile graphs."""
    record = {
        "loss": losses.total.item(), "lm_loss": losses.lm.item(), "ratio_loss": losses.ratio.item(),
        "lb_loss": losses.balance.item(), "lr": lr, **throughput(window, world, peak),
        **compression_summary(out.compression), **{f"ratio_window_{k}": v for k, v in windowed_ratios.items()},
        **flatten("expert_load", expert_load(out.tokens_per_expert)),
        **flatten("skipped_samples", skipped_samples), "skipped_steps": skipped_steps,
        **{f"target_ratio_{k}": v for k, v in targets.items()},
        **({"forced_boundary_prob": forced_boundary_prob} if forced_boundary_prob is not None else {}),
        **({f"ratio_integral_{k}": float(mu) for k, mu in zip(targets, controller.mu)} if controller else {}),
        **({"compiled_graphs": compiled_graphs} if compiled_graphs is not None else {}),
        **(sources or {}),
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


def progress_postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's fields: LM loss, tokens/s, MFU, and the text and image ratios pooled over the
    collapse monitor's window (a batch without images has no image ratio)."""
    ratios = {short: record.get(f"ratio_window_{k}") for short, k in (("R_txt", "text"), ("R_img", "image"))}
    return {"loss": f"{record['lm_loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}",
            **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
            **{k: "-" if v is None else f"{v:.2f}" for k, v in ratios.items()}}


@dataclass
class WandbRun:
    """Where a run goes in Weights & Biases (train.wandb_*)."""
    project: str
    name: str | None = None
    mode: str = "online"
    config: dict[str, Any] = field(default_factory=dict)


class TensorBoardTracker:
    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # events of the steps about to be logged again are hidden (TensorBoard's purge_step)
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        for tag, value in values.items():
            self.writer.add_histogram(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, run: WandbRun):
        import wandb
        self.wandb = wandb
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        id_file.write_text(run_id)
        self.run = wandb.init(project=run.project, name=run.name or out.name, dir=str(out), config=run.config,
                              id=run_id, resume="allow", mode=run.mode)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        self.run.log({tag: self.wandb.Histogram(v.float().cpu().numpy()) for tag, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Writes one JSON object per logged step to OUT/metrics.jsonl and the same values to the trackers
    (rank 0).

    A run that starts at `start_step` (a resume; 0 for a fresh start) first drops the rows of later
    steps, which it is about to log again: the file keeps one row per step."""

    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool, start_step: int = 0,
                 wandb: WandbRun | None = None):
        self.enabled = enabled
        self.file = None
        self.trackers: list[TensorBoardTracker | WandbTracker] = []
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
            self.trackers.append(TensorBoardTracker(out / "tensorboard", start_step))
        if wandb is not None:
            self.trackers.append(WandbTracker(out, wandb))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        scalars = {tracker_tag(k): v for k, v in metrics.items() if isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.scalars(step, scalars)

    def log_eval(self, step: int, heldout: dict[str, Any], histograms: dict[str, torch.Tensor]) -> None:
        """The held-out evaluation (`evaluate.evaluate`'s result) under eval/, its histograms under compression/."""
        if not self.enabled:
            return
        scalars = {f"eval/{k}": v for k, v in heldout.items() if isinstance(v, (int, float))}
        for name, stats in heldout.get("compression", {}).items():
            scalars.update({f"eval/ratio_{name}": stats["ratio"], f"eval/mean_p_{name}": stats["mean_p"]})
        for tracker in self.trackers:
            tracker.scalars(step, scalars)
            tracker.histograms(step, {f"compression/eval_{k}": v for k, v in histograms.items() if v.numel()})

    def close(self) -> None:
        if self.file:
            self.file.close()
        for tracker in self.trackers:
            tracker.close()


def compression_histograms(p: torch.Tensor, b: torch.Tensor, modality: torch.Tensor, starts: torch.Tensor,
                           valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per modality, the boundary probabilities of its tokens and the lengths of its chunks, from one
    batch's (B, T) boundary probabilities p, boundaries b, modality, document starts and validity.
    A chunk is the tokens after the previous boundary of its document up to its boundary, and has the
    modality of its boundary token; tokens after a document's last boundary make no chunk yet."""
    b = b & valid
    pos = torch.arange(b.shape[1], device=b.device).expand_as(b)
    doc_start = torch.where(starts, pos, 0).cummax(dim=1).values
    last = torch.where(b, pos, -1).cummax(dim=1).values  # latest boundary at or before each position
    before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
    length = pos - torch.maximum(before, doc_start - 1)
    out = {}
    for m in Modality:
        here = (modality == m) & valid
        out[f"boundary_p_{m.label}"] = p[here].detach().float().cpu()
        out[f"chunk_length_{m.label}"] = length[here & b].float().cpu()
    return out


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a crash mid-write


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in values.items()}

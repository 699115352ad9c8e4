"""The training loop: packed batches → DeepSpeed engine → losses → logs and checkpoints."""
from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from cmoe_base import IGNORE_INDEX, Batch
from data_pipelines.loader import StreamingLoader
from vision import build_image_transform

from ..boundaries import BoundaryPolicy, ConversionRamp
from ..chunking import CollapseMonitor, ModalityStats
from ..config import to_dict
from ..export import save_pretrained
from ..vlm import ConceptMoEVLM
from . import compute, mfu, resume
from .checkpoint import Checkpointer
from .config import ExperimentConfig, check_experiment, training_data
from .engine import build_engine, collective_device, setup_distributed, use_bf16
from .expert_parallel import plain_state_dict, swap_in_deepspeed_moe
from .init import fit_vocab, load_initial_weights
from .metrics import MetricsLogger, WandbRun, compression_histograms, flatten
from .optim import apply_hyperparameters
from .stages import apply_freeze


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def forever(loader: StreamingLoader) -> Iterator[Batch]:
    """Batches across epochs (each epoch reshuffles its shards)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"data.shards = {loader.cfg.shards!r} yielded no batch in a whole epoch "
                               f"(skipped: {loader.skipped})")


def expert_load(tokens_per_expert: list[torch.Tensor]) -> dict[str, float]:
    """Max/mean assignments per expert, averaged over MoE layers (1 = perfectly balanced)."""
    imbalance = [float(c.max()) / max(float(c.float().mean()), 1e-9) for c in tokens_per_expert if c.numel()]
    return {"max_over_mean": sum(imbalance) / max(len(imbalance), 1)}


def grad_norm(model: torch.nn.Module) -> float | None:
    """Global L2 norm of the gradients held on the parameters, before clipping (ZeRO-0, where
    DeepSpeed reports none); None when no parameter has a gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@torch.no_grad()
def evaluate(model: ConceptMoEVLM, loader: StreamingLoader, max_batches: int,
             histograms: dict[str, torch.Tensor] | None = None, boundaries: BoundaryPolicy | None = None
             ) -> dict[str, Any]:
    """Held-out LM loss, bits per byte-token, and per-modality compression with the eval threshold
    (or the boundaries of the policy `boundaries`). Without a single predicted token there is no
    loss to report: only `predicted_tokens` = 0. A given `histograms` dict receives the per-modality
    boundary probabilities and chunk lengths (trackers)."""
    was_training = model.training
    model.eval()
    nll = n_tok = 0.0
    totals: dict[str, list[float]] = {}
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        out = model(batch, boundaries=boundaries)
        mask = batch.labels != IGNORE_INDEX
        nll += float(out.lm_loss) * int(mask.sum())
        n_tok += int(mask.sum())
        if histograms is not None:
            for k, v in compression_histograms(out.boundary_probs, out.boundaries, batch.modality,
                                               batch.layout.starts, batch.layout.valid).items():
                histograms[k] = torch.cat([histograms[k], v]) if k in histograms else v
        for name, s in out.compression.items():
            acc = totals.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += float(s.tokens)
            acc[1] += float(s.concepts)
            acc[2] += float(s.p_sum)
    model.train(was_training)
    if not n_tok:
        return {"predicted_tokens": 0}
    loss = nll / n_tok
    compression = {name: {"tokens": int(t), "concepts": int(c), "ratio": t / max(c, 1), "mean_p": p / max(t, 1)}
                   for name, (t, c, p) in totals.items() if t}
    return {"lm_loss": loss, "bits_per_token": loss / math.log(2), "predicted_tokens": int(n_tok),
            "compression": compression}


def compression_summary(stats: dict[str, ModalityStats]) -> dict[str, float]:
    out = {}
    for k, s in stats.items():
        if float(s.tokens):
            out[f"ratio_{k}"], out[f"tokens_{k}"], out[f"concepts_{k}"] = s.ratio, int(s.tokens), int(s.concepts)
    return out


def throughput(window: dict[str, Any], world: int, peak: float | None) -> dict[str, float]:
    """tokens/s (all ranks), training FLOPs per token and TFLOP/s (this rank) and MFU over the steps
    of `window` (host sums: tokens, realized FLOPs, seconds)."""
    seconds = max(window["seconds"], 1e-9)
    rate = window["flops"] / seconds
    return {"tokens_per_s": window["tokens"] * world / seconds,
            "flops_per_token": window["flops"] / max(window["tokens"], 1), "tflops": rate / 1e12,
            **({"mfu": rate / peak} if peak else {})}


def sync_step(stop: bool, skip: bool, controller: list[torch.Tensor], world: int) -> tuple[bool, bool]:
    """Make the per-step decisions global with one all-reduce (world > 1; none on one process): stop when
    any rank got a signal, skip the update when any rank found a non-finite gradient, and average the
    ratio controller's buffers, which each rank's forward updated from its own batch. Returns (stop, skip)."""
    if world == 1:
        return stop, skip
    flat = torch.cat([torch.tensor([float(stop), float(skip)], device=collective_device()),
                      *[b.detach().float().reshape(-1).to(collective_device()) for b in controller]])
    dist.all_reduce(flat)
    offset = 2
    for b in controller:
        b.copy_((flat[offset:offset + b.numel()] / world).view_as(b))
        offset += b.numel()
    return bool(flat[0] > 0), bool(flat[1] > 0)


def train(exp: ExperimentConfig) -> dict[str, Any]:
    """Train per `exp`; returns the final summary (also written to OUT/summary.json).

    Everything is validated (`check_experiment`) and a resume checked against the checkpoint's config
    (`resume`) before the model is built; both raise a ConfigError naming the fields."""
    cfg = exp.train
    rank, world = setup_distributed()
    out_dir = Path(cfg.out_dir)
    tokenizer = check_experiment(exp, world)
    exp = fit_vocab(exp, tokenizer)  # with train.init_from, model.vocab_size follows the tokenizer
    ckpt = Checkpointer(out_dir, cfg.keep_last, rank)
    record = resume.experiment_record(exp, world)
    latest = ckpt.latest() if cfg.resume else None
    diff = None
    if latest is not None:
        diff = resume.compare(Checkpointer.experiment(latest), record)
        resume.check_resume(latest, diff)
    elif ckpt.latest() is not None:  # train.resume = false: start over, the previous run kept aside
        if rank == 0:
            aside = resume.set_aside(out_dir)
            warnings.warn(f"train.resume = false: starting {out_dir} over; the previous run's files are in {aside}",
                          stacklevel=2)
        if world > 1:
            dist.barrier()

    torch.manual_seed(cfg.seed)
    model = ConceptMoEVLM(exp.vlm)
    if cfg.init_from and latest is None:  # a resume takes the checkpoint's weights
        load_initial_weights(model, cfg.init_from)
    apply_freeze(model, cfg.freeze)  # before the optimizer: frozen parameters are left out of it
    if cfg.ep_size > 1:
        swap_in_deepspeed_moe(model.lm, cfg.ep_size)
    transform = build_image_transform(model.vision, train=True)
    data_cfg = training_data(exp, world)
    if data_cfg is not exp.data and rank == 0:
        # Every rank must run the same number of steps; without data.steps_per_epoch that needs
        # resampled shards. Say so rather than change the sampling silently.
        warnings.warn(f"{world} processes and no data.steps_per_epoch: streaming shards resampled (with "
                      f"replacement) so that every rank runs the same steps; set data.steps_per_epoch to "
                      f"keep epoch order", stacklevel=2)
    loader = StreamingLoader(data_cfg, tokenizer=tokenizer, image_transform=transform, rank=rank, world_size=world)
    engine, _, scheduler = build_engine(model, cfg, exp.data.batch_size)
    applied = compute.prepare(engine.module, cfg, engine.device)
    bf16 = use_bf16(cfg)
    peak, peak_source = mfu.peak_flops(engine.device, bf16, cfg.peak_tflops) if rank == 0 else (None, "")

    step, skipped_steps, consecutive_bad = 0, 0, 0
    if latest is not None:
        state = ckpt.load(engine, latest)
        apply_hyperparameters(scheduler, cfg)  # lr, betas, weight decay as configured now
        step, skipped_steps = state["step"], state["skipped_steps"]
        same_stream = loader.load_state_dict(state["loader"])
        if rank == 0:
            print(f"resumed from {latest} at step {step}")
            if diff["applied"] or diff["ignored"]:
                note = "" if same_stream else "; the data position was saved for other shards: this epoch starts over"
                warnings.warn(resume.describe(diff, step, out_dir) + note, stacklevel=2)
                resume.record(out_dir, step, diff)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if latest is None or diff["applied"] or diff["ignored"]:  # the run's config as it is from now on
            (out_dir / "config.json").write_text(json.dumps(to_dict(exp), indent=2, default=str))
    wandb = WandbRun(cfg.wandb_project, cfg.wandb_name, cfg.wandb_mode, to_dict(exp)) if cfg.wandb else None
    logger = MetricsLogger(out_dir, enabled=rank == 0, tensorboard=cfg.tensorboard, start_step=step, wandb=wandb)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    monitor = CollapseMonitor(exp.model.chunk.targets() if exp.model.chunk.enabled else {})
    # fp32 ZeRO-0: DeepSpeed steps our AdamW itself, with no non-finite check: the loop checks the gradient
    # norm and sets the optimizer's `overflow` (ZeRO-1/2 and bf16 optimizers check on their own)
    checks_gradients = engine.optimizer is scheduler.optimizer
    controller = [b for name, b in engine.module.named_buffers() if name.endswith("ratio_mu")]
    batches = forever(loader)
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    summary: dict[str, Any] = {}
    stopping = False
    t_data = t_step = t_after = 0.0  # data wait (inside steps), step time, logging + checkpoints after steps
    saved_step = step
    # since the last log step (host numbers: a step reads the device only for the gradient-norm check of
    # fp32 ZeRO-0; losses, compression and expert counts are read on log steps)
    window = {"tokens": 0, "flops": 0.0, "seconds": 0.0, "compression": []}

    def save() -> None:
        nonlocal saved_step
        ckpt.save(engine, step, {"loader": loader.state_dict(), "skipped_steps": skipped_steps}, record)
        saved_step = step

    try:
        while step < cfg.steps and not stopping:
            t0 = time.perf_counter()
            ramp = None  # the conversion ramp's boundary policy at this step: a function of the step, resumes exactly
            if exp.model.chunk.enabled and cfg.ratio_ramp_steps:
                ramp = ConversionRamp(cfg.ratio_ramp_steps, step)
                # the achieved R is below target by design while boundaries are forced: no collapse alarm
                monitor.targets = {} if ramp.probability > 0 else exp.model.chunk.targets()
            controller_before = [b.clone() for b in controller]
            tokens, step_flops, parts, norm = 0, 0.0, [], None
            for micro in range(cfg.grad_accum):
                t1 = time.perf_counter()
                batch = next(batches).to(engine.device)
                t_data += time.perf_counter() - t1
                with compute.autocast(engine.device, bf16):
                    out = engine(batch, boundaries=ramp)
                # A non-finite loss goes through backward and step like any other, as NaN gradients (a host
                # sync-free factor, exactly 1 otherwise): DeepSpeed's accumulation stays in phase
                # (micro_steps = global_steps x grad_accum), the whole group's update is skipped, and with
                # several processes the gradient reduction carries the NaN to every rank, so all skip it.
                engine.backward(out.loss * torch.where(torch.isfinite(out.loss), 1.0, math.nan))
                if micro == cfg.grad_accum - 1:
                    if checks_gradients:
                        norm = grad_norm(engine.module)
                    bad_gradient = checks_gradients and (norm is None or not math.isfinite(norm))
                    stopping, skip = sync_step(stop["signal"] is not None, bad_gradient, controller, world)
                    if checks_gradients:
                        engine.optimizer.overflow = skip
                engine.step()
                tokens += batch.num_tokens()
                step_flops += mfu.step_flops(engine.module, batch, out)
                parts.append(out)
            if not engine.was_step_applied():  # a non-finite loss or gradient in the group, on some rank
                for b, before in zip(controller, controller_before):
                    b.copy_(before)
                skipped_steps += 1
                consecutive_bad += 1
                if consecutive_bad >= cfg.max_nonfinite:
                    raise NonFiniteError(f"{consecutive_bad} consecutive steps had a non-finite loss or gradient "
                                         f"(step {step}); lower train.lr or check the data")
                continue
            consecutive_bad = 0
            step += 1
            dt = time.perf_counter() - t0
            t_step += dt
            t1 = time.perf_counter()
            out = parts[-1]
            for key, value in (("tokens", tokens), ("flops", step_flops), ("seconds", dt)):
                window[key] += value
            window["compression"].append(out.compression)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps or stopping:
                windowed = {}
                for stats in window["compression"]:  # the collapse monitor pools every step, read now
                    windowed = monitor.update(stats)
                metrics = {
                    "loss": out.loss.item(), "lm_loss": out.lm_loss.item(), "ratio_loss": out.ratio_loss.item(),
                    "lb_loss": out.lb_loss.item(), "lr": scheduler.get_last_lr()[0],
                    **throughput(window, world, peak),
                    **compression_summary(out.compression), **{f"ratio_window_{k}": v for k, v in windowed.items()},
                    **flatten("expert_load", expert_load(out.tokens_per_expert)),
                    **flatten("skipped_samples", loader.skipped), "skipped_steps": skipped_steps,
                    **({f"target_ratio_{k}": v for k, v in exp.model.chunk.targets().items()}
                       if exp.model.chunk.enabled else {}),
                    **({"forced_boundary_prob": ramp.probability} if ramp is not None else {}),
                    **({f"ratio_integral_{k}": float(mu) for k, mu in zip(exp.model.chunk.targets(), model.lm.ratio_mu)}
                       if hasattr(model.lm, "ratio_mu") else {}),
                    **({"compiled_graphs": compute.compiled_graphs()} if applied["compiled"] else {}),
                }
                if norm is None:  # ZeRO-1/2: DeepSpeed computes the norm while stepping
                    norm = engine.get_global_grad_norm()
                if norm is not None:
                    metrics["grad_norm"] = float(norm)
                logger.log(step, metrics)
                # compression pooled over the monitor's window: a batch without images has no image ratio
                r = {short: metrics.get(f"ratio_window_{k}") for short, k in (("R_txt", "text"), ("R_img", "image"))}
                bar.set_postfix(loss=f"{metrics['lm_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                **({"mfu": f"{metrics['mfu']:.1%}"} if "mfu" in metrics else {}),
                                **{k: "-" if v is None else f"{v:.2f}" for k, v in r.items()})
                summary = metrics
                window = {"tokens": 0, "flops": 0.0, "seconds": 0.0, "compression": []}
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                save()
            t_after += time.perf_counter() - t1
        if stopping and saved_step != step:
            save()  # stopped right after a skipped step
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    summary = {"step": step, "train": summary, "skipped_steps": skipped_steps,
               "data_wait_fraction": t_data / max(t_step, 1e-9),
               # the loop's own cost (data wait, metrics, logging, checkpoints) as a share of wall time
               "loop_overhead_fraction": (t_data + t_after) / max(t_step + t_after, 1e-9),
               "interrupted": stopping, "peak_tflops": peak / 1e12 if peak else None, "peak_source": peak_source,
               **applied}
    if cfg.heldout_shards and not stopping:  # every rank: expert-parallel layers are collective
        eval_cfg = replace(exp.data, shards=cfg.heldout_shards, num_workers=0, shuffle_buffer=0, resampled=False,
                           steps_per_epoch=None)
        eval_loader = StreamingLoader(eval_cfg, tokenizer=tokenizer,
                                      image_transform=build_image_transform(model.vision, train=False))
        histograms: dict[str, torch.Tensor] = {}
        summary["heldout"] = evaluate(model, eval_loader, cfg.eval_batches, histograms)
        logger.log_eval(step, summary["heldout"], histograms)
        if not summary["heldout"]["predicted_tokens"]:
            summary["heldout"]["error"] = (f"train.heldout_shards = {cfg.heldout_shards!r} gave no token to predict "
                                           f"(skipped: {eval_loader.skipped}): no held-out loss")
            if rank == 0:
                warnings.warn(summary["heldout"]["error"], stacklevel=2)
    if not stopping:
        state = plain_state_dict(engine.module)  # collective: gathers expert-parallel shards
        if rank == 0:
            summary["exported"] = str(save_pretrained(engine.module, out_dir / "final", exp.data.tokenizer, state=state))
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return summary

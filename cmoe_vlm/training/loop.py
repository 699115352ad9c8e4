"""The training loop: packed batches → DeepSpeed engine → objective → logs and checkpoints.

    tokenizer = check_experiment(exp, world)    # every config check, before anything is built
    with run_lock(out_dir, rank, world):       # train.out_dir owned by this run (a second one refuses)
        run = setup_run(exp, tokenizer, rank, world)   # resume point, model, loader, engine, objective, logger
    train_step(run, ...)            # one optimizer step over train.grad_accum micro-batches
    log_step(run, result, bar)      # on log steps: the metrics record (metrics.py) to the JSONL and trackers
    save(run)                       # a checkpoint (checkpoint.py), with the loader and controller states
    finish(run)                     # held-out evaluation, export, OUT/summary.json

What the run owns besides the engine: the ratio controller (objective.py: saved with every checkpoint,
averaged over ranks, restored on a skipped step), the data position, the skip counters.
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from cmoe_base import Batch, ConfigError
from cmoe_base.commands import InputError
from cmoe_base.outputs import FolderLock
from data_pipelines.loader import StreamingLoader
from data_pipelines.tokenizer import Tokenizer

from ..checkpoints.export import save_pretrained
from ..config import to_dict
from ..model.boundaries import ConversionRamp
from ..model.conceptmoe import ModelOutput
from ..model.vlm import ConceptMoEVLM
from ..objective import Losses, Objective, RatioController
from . import mfu, resume
from .checkpoint import Checkpointer, legacy_ratio_controller
from .collapse import CollapseMonitor
from .config import ExperimentConfig, TrainConfig, check_experiment, training_data
from .engine import StepGuard, build_engine, setup_distributed
from .evaluate import evaluate
from .expert_parallel import plain_state_dict, swap_in_deepspeed_moe
from .initial_weights import fit_vocab, load_initial_weights
from .metrics import MetricsLogger, WandbRun, Window, progress_postfix, source_metrics, step_record
from .optim import apply_hyperparameters
from .prepare import Prepared, compiled_graphs, prepare_model, use_bf16
from .stages import apply_freeze, previous_stages, stage, stage_change


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class Timing:
    """Seconds spent waiting for data (inside steps), in steps, and after steps (logging, checkpoints)."""
    data: float = 0.0
    step: float = 0.0
    after: float = 0.0


@dataclass
class Run:
    """A training run: what `setup_run` builds and the steps advance."""
    exp: ExperimentConfig
    rank: int
    world: int
    tokenizer: Tokenizer
    engine: Any                          # the DeepSpeed engine around the ConceptMoEVLM
    scheduler: torch.optim.lr_scheduler.LambdaLR
    guard: StepGuard
    prepared: Prepared
    loader: StreamingLoader
    batches: Iterator[Batch]
    objective: Objective
    controller: RatioController | None
    checkpointer: Checkpointer
    record: dict[str, Any]               # the config and topology saved with every checkpoint
    monitor: CollapseMonitor
    peak: float | None                   # FLOP/s for MFU (rank 0)
    peak_source: str
    logger: MetricsLogger = field(init=False)  # opened once the resumed step is known
    stages: list[dict[str, Any]] = field(default_factory=list)  # earlier stages (train.init_from's export)
    step: int = 0
    skipped_steps: int = 0
    consecutive_bad: int = 0
    saved_step: int = 0
    stopping: bool = False
    window: Window = field(default_factory=Window)
    timing: Timing = field(default_factory=Timing)
    last_record: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> TrainConfig:
        return self.exp.train

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)


@dataclass
class StepResult:
    """An applied optimizer step: its last micro-batch (batch, output, losses), and the step's host counts."""
    batch: Batch
    out: ModelOutput
    losses: Losses
    ramp: ConversionRamp | None
    tokens: int
    flops: float
    seconds: float


def train(exp: ExperimentConfig) -> dict[str, Any]:
    """Train per `exp`; returns the final summary (also written to OUT/summary.json).

    Everything is validated (`check_experiment`) and a resume checked against the checkpoint's config
    (`resume`) before the model is built; both raise a ConfigError naming the fields."""
    rank, world = setup_distributed()
    tokenizer = check_experiment(exp, world)
    with run_lock(exp.train.out_dir, rank, world):
        return run_training(setup_run(exp, tokenizer, rank, world))


def run_training(run: Run) -> dict[str, Any]:
    bar = tqdm(total=run.cfg.steps, initial=run.step, disable=run.rank != 0, desc="train", dynamic_ncols=True)
    with stop_signals() as stop_requested, contextlib.closing(bar):
        while run.step < run.cfg.steps and not run.stopping:
            result = train_step(run, stop_requested)
            if result is None:  # the update was skipped
                continue
            t0 = time.perf_counter()
            run.window.add(result.tokens, result.flops, result.seconds, result.out.compression)
            bar.update(1)
            if run.step % run.cfg.log_every == 0 or run.step == run.cfg.steps or run.stopping:
                log_step(run, result, bar)
            if run.step % run.cfg.ckpt_every == 0 or run.step == run.cfg.steps or run.stopping:
                save(run)
            run.timing.after += time.perf_counter() - t0
        if run.stopping and run.saved_step != run.step:
            save(run)  # stopped right after a skipped step
    return finish(run)


# ------------------------------------------------------------------------------------------- set-up

@contextlib.contextmanager
def run_lock(out_dir: str, rank: int, world: int) -> Iterator[None]:
    """train.out_dir locked by rank 0 while the run owns it; a second run refuses (ConfigError naming
    the holder) on every rank."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = FolderLock(out_dir, "train.out_dir")
        except (InputError, OSError) as e:
            refusal = str(e)
    if world > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise ConfigError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def setup_run(exp: ExperimentConfig, tokenizer: Tokenizer, rank: int, world: int) -> Run:
    """Find the resume point, build the model, loader, engine and objective, and restore the
    checkpoint's state (`exp` checked by `check_experiment`, which gave `tokenizer`)."""
    cfg = exp.train
    exp = fit_vocab(exp, tokenizer)  # with train.init_from, model.vocab_size follows the tokenizer
    checkpointer = Checkpointer(cfg.out_dir, cfg.keep_last, rank)
    record = resume.experiment_record(exp, world)
    latest, diff = resume_point(exp, checkpointer, record, rank, world)

    torch.manual_seed(cfg.seed)
    model = ConceptMoEVLM(exp.vlm)
    if cfg.init_from and latest is None:  # a resume takes the checkpoint's weights
        load_initial_weights(model, cfg.init_from)
    apply_freeze(model, cfg.freeze)  # before the optimizer: frozen parameters are left out of it
    if cfg.ep_size > 1:
        swap_in_deepspeed_moe(model.lm, cfg.ep_size)
    # the peak before anything of ours runs beside it (the loader's workers, the engine's threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    peak, peak_source = mfu.peak_flops(device, use_bf16(cfg), cfg.peak_tflops) if rank == 0 else (None, "")
    loader = training_loader(exp, tokenizer, model, rank, world)
    engine, _, scheduler = build_engine(model, cfg, exp.data.batch_size)
    prepared = prepare_model(engine.module, cfg, engine.device)
    controller = RatioController.of(exp.model, engine.device)
    run = Run(exp=exp, rank=rank, world=world, tokenizer=tokenizer, engine=engine, scheduler=scheduler,
              guard=StepGuard(engine, scheduler.optimizer), prepared=prepared, loader=loader,
              batches=forever(loader), objective=Objective(exp.model, controller), controller=controller,
              checkpointer=checkpointer, record=record, peak=peak, peak_source=peak_source,
              monitor=CollapseMonitor(exp.model.chunk.targets() if exp.model.chunk.enabled else {}))
    if latest is not None:
        restore(run, latest, diff)
    run.stages = previous_stages(cfg.init_from)
    if rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        change = stage_change(run.stages, cfg.freeze, cfg.lr_scale) if latest is None else {}
        if change:  # a new stage from the previous stage's export: recorded, not refused
            print(f"new stage from {cfg.init_from}: " + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in change.items()))
            resume.record(run.out_dir, 0, {"applied": change, "ignored": {}})
        if latest is None or diff["applied"] or diff["ignored"]:  # the run's config as it is from now on
            (run.out_dir / "config.json").write_text(json.dumps(to_dict(exp), indent=2, default=str))
    wandb = WandbRun(cfg.wandb_project, cfg.wandb_name, cfg.wandb_mode, to_dict(exp)) if cfg.wandb else None
    run.logger = MetricsLogger(run.out_dir, enabled=rank == 0, tensorboard=cfg.tensorboard, start_step=run.step,
                               wandb=wandb)
    return run


def resume_point(exp: ExperimentConfig, checkpointer: Checkpointer, record: dict[str, Any], rank: int, world: int,
                 ) -> tuple[Path | None, dict[str, list] | None]:
    """The checkpoint to resume from (train.resume) and how the requested config differs from its
    (refused changes raise a ConfigError); with train.resume = false an earlier run is set aside."""
    out_dir = Path(exp.train.out_dir)
    latest = checkpointer.latest_intact(world) if exp.train.resume else checkpointer.latest()
    if latest is not None and exp.train.resume:
        diff = resume.compare(Checkpointer.experiment(latest), record)
        resume.check_resume(latest, diff)
        return latest, diff
    if latest is not None:  # train.resume = false: start over, the previous run kept aside
        if rank == 0:
            aside = resume.set_aside(out_dir)
            warnings.warn(f"train.resume = false: starting {out_dir} over; the previous run's files are in {aside}",
                          stacklevel=3)
        if world > 1:
            dist.barrier()
    return None, None


def training_loader(exp: ExperimentConfig, tokenizer: Tokenizer, model: ConceptMoEVLM, rank: int,
                    world: int) -> StreamingLoader:
    """The streaming loader of this rank, with the model's training image transform."""
    data_cfg = training_data(exp, world)
    if data_cfg is not exp.data and rank == 0:
        # Every rank must run the same number of steps; without data.steps_per_epoch that needs
        # resampled shards. Say so rather than change the sampling silently.
        warnings.warn(f"{world} processes and no data.steps_per_epoch: streaming shards resampled (with "
                      f"replacement) so that every rank runs the same steps; set data.steps_per_epoch to "
                      f"keep epoch order", stacklevel=3)
    transform = model.image_transform(train=True)
    return StreamingLoader(data_cfg, tokenizer=tokenizer, image_transform=transform, rank=rank, world_size=world)


def restore(run: Run, latest: Path, diff: dict[str, list]) -> None:
    """Load checkpoint `latest` into the run: engine (model, optimizer, schedule), RNG, step and skip
    counters, data position, ratio controller; then the configured hyperparameters apply."""
    state = run.checkpointer.load(run.engine, latest)
    apply_hyperparameters(run.scheduler, run.cfg)  # lr, betas, weight decay as configured now
    run.step = run.saved_step = state["step"]
    run.skipped_steps = state["skipped_steps"]
    same_stream = run.loader.load_state_dict(state["loader"])
    if run.controller is not None:  # checkpoints of main 69f0ad8 and earlier kept it in the model
        saved = state.get("ratio_controller") or legacy_ratio_controller(latest)
        if saved is not None:
            run.controller.load_state_dict(saved)
    if run.rank == 0:
        print(f"resumed from {latest} at step {run.step}")
        if diff["applied"] or diff["ignored"]:
            note = "" if same_stream else "; the data position was saved for other shards: this epoch starts over"
            warnings.warn(resume.describe(diff, run.step, run.out_dir) + note, stacklevel=3)
            resume.record(run.out_dir, run.step, diff)


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


@contextlib.contextmanager
def stop_signals() -> Iterator[Callable[[], bool]]:
    """While inside, SIGTERM and SIGINT ask the run to stop (it checkpoints and exits after the step)
    instead of killing it; yields whether one arrived. The previous handlers come back afterwards."""
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(caught)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------------- steps

def train_step(run: Run, stop_requested: Callable[[], bool]) -> StepResult | None:
    """One optimizer step over train.grad_accum micro-batches; None when its update was skipped (a
    non-finite loss or gradient in the group on some rank: counted, the controller restored)."""
    t0 = time.perf_counter()
    ramp = conversion_ramp(run)
    controller_before = run.controller.state_dict() if run.controller else None
    shared = [run.controller.mu] if run.controller else []  # averaged over ranks before the update
    tokens, flops = 0, 0.0
    for micro in range(run.cfg.grad_accum):
        t1 = time.perf_counter()
        batch = next(run.batches).to(run.engine.device)
        run.timing.data += time.perf_counter() - t1
        with run.prepared.autocast(run.engine.device):
            out = run.engine(batch, boundaries=ramp)
            losses = run.objective(out, batch)
        if run.controller is not None:
            run.controller.update(out.own_boundaries, batch)
        run.guard.backward(losses.total)
        if micro == run.cfg.grad_accum - 1:
            run.stopping = run.guard.before_update(stop_requested(), shared, run.world)
        run.engine.step()
        tokens += batch.num_tokens()
        flops += mfu.step_flops(run.engine.module, batch, out)
    if not run.guard.update_applied():
        skip_step(run, controller_before)
        return None
    run.consecutive_bad = 0
    run.step += 1
    seconds = time.perf_counter() - t0
    run.timing.step += seconds
    return StepResult(batch, out, losses, ramp, tokens, flops, seconds)


def conversion_ramp(run: Run) -> ConversionRamp | None:
    """The conversion ramp's boundary policy at this step (train.ratio_ramp_steps; a function of the step,
    so it resumes exactly). While it forces boundaries the achieved R is below target by design: the
    collapse monitor stands down."""
    chunk = run.exp.model.chunk
    if not (chunk.enabled and run.cfg.ratio_ramp_steps):
        return None
    ramp = ConversionRamp(run.cfg.ratio_ramp_steps, run.step)
    run.monitor.targets = {} if ramp.probability > 0 else chunk.targets()
    return ramp


def skip_step(run: Run, controller_before: dict[str, list[float]] | None) -> None:
    """Count a skipped update and put the controller back; stop the run after train.max_nonfinite in a row."""
    if run.controller is not None:
        run.controller.load_state_dict(controller_before)
    run.skipped_steps += 1
    run.consecutive_bad += 1
    if run.consecutive_bad >= run.cfg.max_nonfinite:
        raise NonFiniteError(f"{run.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                             f"(step {run.step}); lower train.lr or check the data")


def log_step(run: Run, result: StepResult, bar: tqdm) -> None:
    """The metrics record of this step (and of the window since the last log) to the logger and the bar."""
    windowed = {}
    for stats in run.window.compression:  # the collapse monitor pools every step, read now
        windowed = run.monitor.update(stats)
    achieved = run.window.flops / max(run.window.seconds, 1e-9)
    if run.peak and achieved > run.peak and run.peak_source.startswith("measured"):  # a CPU peak measured too low
        run.peak, run.peak_source = mfu.raised_peak(achieved, run.prepared.bf16)
    chunk = run.exp.model.chunk
    record = step_record(
        result.losses, result.out, run.window, lr=run.scheduler.get_last_lr()[0], world=run.world, peak=run.peak,
        windowed_ratios=windowed, targets=chunk.targets() if chunk.enabled else {},
        skipped_samples=run.loader.skipped, skipped_steps=run.skipped_steps, grad_norm=run.guard.grad_norm(),
        controller=run.controller, forced_boundary_prob=result.ramp.probability if result.ramp else None,
        sources=source_metrics(result.out, result.batch, [s.name for s in run.exp.data.sources]),
        compiled_graphs=compiled_graphs() if run.prepared.compiled else None)
    run.logger.log(run.step, record)
    bar.set_postfix(**progress_postfix(record))
    run.last_record = record
    run.window = Window()


def save(run: Run) -> None:
    """A checkpoint of this step: the engine, and this rank's loader position, counters and controller."""
    state = {"loader": run.loader.state_dict(), "skipped_steps": run.skipped_steps,
             **({"ratio_controller": run.controller.state_dict()} if run.controller else {})}
    run.checkpointer.save(run.engine, run.step, state, run.record)
    run.saved_step = run.step


# ------------------------------------------------------------------------------------------- the end

def finish(run: Run) -> dict[str, Any]:
    """The run's summary, with the held-out evaluation and the export unless it was interrupted;
    written to OUT/summary.json."""
    t, peak = run.timing, run.peak
    summary = {"step": run.step, "train": run.last_record, "skipped_steps": run.skipped_steps,
               "data_wait_fraction": t.data / max(t.step, 1e-9),
               # the loop's own cost (data wait, metrics, logging, checkpoints) as a share of wall time
               "loop_overhead_fraction": (t.data + t.after) / max(t.step + t.after, 1e-9),
               "interrupted": run.stopping, "peak_tflops": peak / 1e12 if peak else None,
               "peak_source": run.peak_source, "checkpointed_blocks": run.prepared.checkpointed_blocks,
               "compiled": run.prepared.compiled}
    if run.cfg.heldout_shards and not run.stopping:  # every rank: expert-parallel layers are collective
        summary["heldout"] = heldout_evaluation(run)
    if not run.stopping:
        state = plain_state_dict(run.engine.module)  # collective: gathers expert-parallel shards
        if run.rank == 0:
            stages = run.stages + [stage(run.cfg.freeze, run.cfg.lr_scale, run.step)]
            summary["exported"] = str(save_pretrained(run.engine.module, run.out_dir / "final",
                                                      run.exp.data.tokenizer, state=state, extra={"stages": stages}))
    if run.rank == 0:
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    run.logger.close()
    return summary


def heldout_evaluation(run: Run) -> dict[str, Any]:
    """`evaluate` on train.heldout_shards, logged under eval/ with its histograms."""
    cfg, model = run.cfg, run.engine.module
    eval_cfg = replace(run.exp.data, shards=cfg.heldout_shards, num_workers=0, shuffle_buffer=0, resampled=False,
                       steps_per_epoch=None)
    loader = StreamingLoader(eval_cfg, tokenizer=run.tokenizer,
                             image_transform=model.image_transform(train=False))
    histograms: dict[str, torch.Tensor] = {}
    heldout = evaluate(model, loader, cfg.eval_batches, histograms)
    run.logger.log_eval(run.step, heldout, histograms)
    if not heldout["predicted_tokens"]:
        heldout["error"] = (f"train.heldout_shards = {cfg.heldout_shards!r} gave no token to predict "
                            f"(skipped: {loader.skipped}): no held-out loss")
        if run.rank == 0:
            warnings.warn(heldout["error"], stacklevel=3)
    return heldout

"""DeepSpeed: distributed environment, generated DeepSpeed config, engine, and the protocol a training
step follows with it for non-finite steps (`StepGuard`)."""
from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig, user_deepspeed_config
from .optim import build_optimizer


def setup_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed. A plain `python train_vlm.py` run (no launcher)
    gets a one-process environment; under `deepspeed` the launcher's variables are used.
    Returns (rank, world_size)."""
    import deepspeed

    if not torch.cuda.is_available() and os.environ.get("CMOE_DS_SHM_COMM") != "1":
        # On CPU DeepSpeed JIT-builds and loads a shared-memory allreduce op at every start, behind
        # torch's extension file lock; concurrent or killed starts left runs waiting on that lock
        # forever (seen here). gloo's allreduce does the job; CMOE_DS_SHM_COMM=1 restores the op.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def collective_device() -> torch.device:
    """Where small tensors for a collective live: the GPU with nccl, else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down. Exiting with gloo's threads still
    alive aborted a rank at interpreter exit ('terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def deepspeed_config(cfg: TrainConfig, micro_batch: int) -> dict:
    """The DeepSpeed JSON generated from our config; a user's `deepspeed_config` file overrides keys."""
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": False},  # bf16 is autocast over fp32 master weights (training/prepare.py)
        "zero_allow_untested_optimizer": True,  # our AdamW param groups, created below
        "steps_per_print": 10**9,
    }
    ds.update(user_deepspeed_config(cfg))
    return ds


def build_engine(model: nn.Module, cfg: TrainConfig, micro_batch: int):
    """Wrap the model in a DeepSpeed engine with our optimizer and schedule."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, micro_batch))
    return engine, optimizer, scheduler


def grad_norm(model: nn.Module) -> float | None:
    """Global L2 norm of the gradients held on the parameters, before clipping (ZeRO-0, where
    DeepSpeed reports none); None when no parameter has a gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def sync_step(stop: bool, skip: bool, shared: list[torch.Tensor], world: int) -> tuple[bool, bool]:
    """Make the per-step decisions global with one all-reduce (world > 1; none on one process): stop when
    any rank got a signal, skip the update when any rank found a non-finite gradient, and average the
    `shared` state tensors (the ratio controller's, which each rank updated from its own batch) in place.
    Returns (stop, skip)."""
    if world == 1:
        return stop, skip
    flat = torch.cat([torch.tensor([float(stop), float(skip)], device=collective_device()),
                      *[b.detach().float().reshape(-1).to(collective_device()) for b in shared]])
    dist.all_reduce(flat)
    offset = 2
    for b in shared:
        b.copy_((flat[offset:offset + b.numel()] / world).view_as(b))
        offset += b.numel()
    return bool(flat[0] > 0), bool(flat[1] > 0)


class StepGuard:
    """How a step skips a non-finite update under DeepSpeed, whichever ZeRO stage runs it.

    A non-finite loss goes through backward and step like any other, as NaN gradients (`backward`: a
    factor exactly 1 otherwise, with no host sync): DeepSpeed's accumulation stays in phase (micro_steps =
    global_steps × grad_accum), the whole group's update is skipped, and with several processes the
    gradient reduction carries the NaN to every rank, so all skip it. Before the group's update
    (`before_update`) the ranks agree on stopping and on the shared state; with fp32 ZeRO-0 DeepSpeed
    steps our AdamW itself with no non-finite check, so the guard checks the gradient norm and sets the
    optimizer's `overflow` (ZeRO-1/2 and bf16 optimizers check on their own)."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer):
        self.engine = engine
        self.checks_gradients = engine.optimizer is optimizer  # DeepSpeed steps our optimizer unwrapped
        self.norm: float | None = None

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * torch.where(torch.isfinite(loss), 1.0, math.nan))

    def before_update(self, stop: bool, shared: list[torch.Tensor], world: int) -> bool:
        """At the group's last micro-batch, before `engine.step()`: decide the skip on every rank and average
        `shared`; returns whether any rank asked to stop."""
        self.norm = grad_norm(self.engine.module) if self.checks_gradients else None
        bad_gradient = self.checks_gradients and (self.norm is None or not math.isfinite(self.norm))
        stop, skip = sync_step(stop, bad_gradient, shared, world)
        if self.checks_gradients:
            self.engine.optimizer.overflow = skip
        return stop

    def update_applied(self) -> bool:
        """False when the last group's update was skipped (a non-finite loss or gradient on some rank)."""
        return self.engine.was_step_applied()

    def grad_norm(self) -> float | None:
        """The last update's gradient norm before clipping: ours (ZeRO-0), else DeepSpeed's."""
        return self.norm if self.norm is not None else self.engine.get_global_grad_norm()

"""DeepSpeed set-up: distributed environment, generated DeepSpeed config, engine."""
from __future__ import annotations

import os
import socket

import torch
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

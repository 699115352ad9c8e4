"""Atomic, rotating checkpoints through DeepSpeed, plus our own per-rank state, loaded without running code.

Layout: OUT/checkpoints/step_00000100/ holds DeepSpeed's files (model, optimizer shards, scheduler),
`experiment.json` (the run's config and topology, read before anything is built on resume) and, per
rank, `rank{r}.safetensors`: the RNG states as tensors and, as JSON in its metadata, the step, the
counters and the data-loader position. A checkpoint is written under OUT/checkpoints/.staging/ and
renamed into place only when every rank has finished writing, so a crash mid-write never leaves a
directory that looks complete; a failed write (a full disk) removes the staging folder and leaves the
previous checkpoints as they were.

What a resume trusts: our own files hold no code (safetensors + JSON). DeepSpeed's files are
pickles; they are read with `torch.load(weights_only=True)`, which only rebuilds tensors, plain
containers and the few DeepSpeed classes of `deepspeed_globals` (the ZeRO optimizer state files need
them), so a crafted file is refused instead of run. Checkpoints of the older pickle format (`rank*.pt`)
are refused with the way out.

    python -m cmoe_vlm.training.checkpoint runs/x/checkpoints/step_00000100 --out runs/x/export
writes a checkpoint's weights as an export folder (`train.init_from` takes it, e.g. to continue with
another number of processes or expert-parallel size, which a resume cannot).
"""
from __future__ import annotations

import errno
import json
import pickle
import random
import re
import shutil
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from cmoe_base.commands import InputError, Parser, command
from cmoe_base.outputs import check_output

STEP_DIR = re.compile(r"^step_(\d{8})$")
EXPERIMENT = "experiment.json"
FORMAT = 2  # 1: rank*.pt pickles (refused); 2: rank*.safetensors + experiment.json
LOW_SPACE = 64 * 2**20  # bytes: a failed write with less than this free is reported as a full disk


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says why and what to do."""


def deepspeed_globals() -> list[type]:
    """The classes DeepSpeed 0.19.8's checkpoint files hold besides tensors and plain containers, found
    by reading every file of fp32 runs with ZeRO 0/1/2 x ep_size 1/2: all three sit in the ZeRO optimizer
    state files (model, expert and ZeRO-0 optimizer files need none). bf16 runs (GPU) were not checked;
    a class missing here is refused by name, not run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_deepspeed_file(path: str | Path, map_location=None) -> Any:
    """torch.load of one DeepSpeed checkpoint file without running code from it (see the module docstring)."""
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if "GLOBAL" in line] or str(e).strip().splitlines()[:1]
        raise CheckpointError(f"{path}: refused to load (it holds more than tensors and DeepSpeed's checkpoint "
                              f"types, so unpickling it could run code): {lines[0].strip()}") from None


# ----------------------------------------------------------------------------------------- RNG state

def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch, CUDA, numpy and Python generator states as (tensors, JSON-able scalars)."""
    version, py_keys, gauss_next = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(py_keys, dtype=torch.int64),
               "numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python": [version, gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------- helpers

def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank (one all-reduce; the barrier after writing)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    from .engine import collective_device

    flag = torch.tensor([0.0 if ok else 1.0], device=collective_device())
    dist.all_reduce(flag)
    return float(flag) == 0


def _write_failure(e: BaseException, where: Path) -> str:
    """What went wrong writing a checkpoint, naming a full disk as such (torch's own writer reports one
    as 'basic_ios::clear: iostream error' or 'unexpected pos', without an errno)."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e) or (
        free is not None and free < LOW_SPACE)
    cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if full:
        return f"no space left on the device of {where} ({free / 2**20:.1f} MiB free; {cause})"
    return cause


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

    def save(self, engine, step: int, state: dict[str, Any], experiment: dict[str, Any]) -> Path:
        """Save engine + this rank's `state` (JSON-able: loader position, counters) atomically; rank 0
        also writes `experiment` (the config and topology). On a failed write on any rank the staging
        folder is removed and a CheckpointError raised on every rank; earlier checkpoints stay."""
        tag = f"step_{step:08d}"
        staged = self.staging / tag
        if self.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)
        _barrier()
        failure = None
        try:
            engine.save_checkpoint(str(self.staging), tag=tag, save_latest=False)
            tensors, scalars = rng_state()
            meta = {"format": FORMAT, "step": step, "rng": scalars, **state}
            save_file(tensors, str(staged / f"rank{self.rank}.safetensors"), metadata={"state": json.dumps(meta)})
            if self.rank == 0:
                (staged / EXPERIMENT).write_text(json.dumps({"format": FORMAT, **experiment}, indent=1, default=str))
        except (OSError, RuntimeError) as e:
            failure = _write_failure(e, self.root)
        if not _all_ok(failure is None):
            if self.rank == 0:
                shutil.rmtree(staged, ignore_errors=True)
            previous = self.latest()
            raise CheckpointError(f"writing checkpoint {tag} failed on rank {self.rank}: "
                                  f"{failure or 'another rank failed'}; removed the partial {staged}, "
                                  f"{'kept ' + previous.name if previous else 'no earlier checkpoint'}")
        final = self.root / tag
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            staged.rename(final)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    @staticmethod
    def experiment(path: Path) -> dict[str, Any]:
        """The config and topology saved with checkpoint `path` (cheap: read before building anything)."""
        if not (path / EXPERIMENT).is_file():
            if list(path.glob("rank*.pt")):
                raise CheckpointError(
                    f"{path} is in the older pickle format, which is not loaded because unpickling can run code; "
                    f"start a new run (another train.out_dir, or train.resume=false to overwrite this one)")
            raise CheckpointError(f"{path}: no {EXPERIMENT}; not a checkpoint written by train_vlm.py")
        try:
            return json.loads((path / EXPERIMENT).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / EXPERIMENT}: not JSON ({e})") from None

    @staticmethod
    def damage(path: Path, world: int) -> str | None:
        """Why checkpoint `path` cannot be resumed by `world` processes (a missing, empty or truncated
        file, an unreadable experiment.json), from cheap checks; None when none is found."""
        try:
            Checkpointer.experiment(path)
        except CheckpointError as e:
            return str(e)
        for name in ["mp_rank_00_model_states.pt"] + [f"rank{r}.safetensors" for r in range(world)]:
            if not (path / name).is_file() or (path / name).stat().st_size == 0:
                return f"{path / name} is missing or empty"
        for f in sorted(path.glob("*.pt")):
            if not zipfile.is_zipfile(f):
                return f"{f} is truncated or not a torch file"
        return None

    def latest_intact(self, world: int) -> Path | None:
        """The newest checkpoint without `damage`; each newer damaged one is skipped with a warning
        naming it. A CheckpointError when every checkpoint is damaged."""
        done = self.complete()
        reasons = []
        for path in reversed(done):
            reason = self.damage(path, world)
            if reason is None:
                for skipped in reasons:
                    warnings.warn(f"checkpoint skipped: {skipped}; resuming from {path.name} (remove the damaged "
                                  f"folder to silence this)", stacklevel=3)
                return path
            reasons.append(reason)
        if reasons:
            raise CheckpointError(f"no intact checkpoint in {self.root}: {'; '.join(reasons)}. Remove the damaged "
                                  "folders, or start over with train.resume=false")
        return None

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Restore the engine (model, optimizer, scheduler) and the RNG states; returns this rank's state."""
        mine = path / f"rank{self.rank}.safetensors"
        if not mine.is_file():
            self.experiment(path)  # names the old format when that is the reason
            raise CheckpointError(f"{path}: no {mine.name}; was it written by fewer processes?")
        engine.checkpoint_engine.load = load_deepspeed_file  # every DeepSpeed read goes through it
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        with safe_open(str(mine), "pt") as f:
            state = json.loads(f.metadata()["state"])
            set_rng_state({k: f.get_tensor(k) for k in f.keys()}, state.pop("rng"))
        return state


# ----------------------------------------------------------------------------------------- export

def deepspeed_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DeepSpeed checkpoint folder in our plain layout (the export's): with
    expert parallelism, DeepSpeed MoE's router and per-expert files are stacked back into ours."""
    module = dict(load_deepspeed_file(path / "mp_rank_00_model_states.pt", map_location="cpu")["module"])
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for f in sorted(path.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for key, value in load_deepspeed_file(f, map_location="cpu").items():
            m = re.match(r"^(.*)\.layer\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w13|w2)\.weight$", key)
            if m is None:
                raise CheckpointError(f"{f}: unexpected expert weight {key}")
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = value
    state = {}
    for key, value in module.items():
        m = re.match(r"^(.*)\.layer\.deepspeed_moe\.gate\.wg\.weight$", key)
        state[f"{m[1]}.router.weight" if m else key] = value
    for prefix, by_expert in experts.items():
        for w in ("w13", "w2"):  # DeepSpeed keeps each expert as a Linear (out, in): ours stack (E, in, out)
            state[f"{prefix}.experts.{w}"] = torch.stack([by_expert[e][w].T for e in sorted(by_expert)])
    return state


def legacy_ratio_controller(path: Path) -> dict[str, list[float]] | None:
    """The ratio controller's state in a checkpoint written while the model held it as the buffer
    `lm.ratio_mu` (main 69f0ad8 and earlier; now the loop's, saved in the rank files), in
    `RatioController.state_dict` form; None when the checkpoint has none."""
    module = load_deepspeed_file(path / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    mu = module.get("lm.ratio_mu")
    return None if mu is None else {"mu": mu.tolist()}


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write checkpoint `path`'s weights and model config as an export folder (see `save_pretrained`)."""
    from ..checkpoints.export import save_pretrained
    from ..config import from_dict
    from ..model.vlm import ConceptMoEVLM, VLMConfig

    path = Path(path)
    reason = Checkpointer.damage(path, 1)
    if reason is not None:
        raise CheckpointError(f"{path} cannot be exported: {reason}")
    exp = Checkpointer.experiment(path)["config"]
    cfg = from_dict(VLMConfig, {k: exp[k] for k in ("model", "vision", "projector")})
    model = ConceptMoEVLM(replace(cfg, vision=replace(cfg.vision, pretrained=False, checkpoint_path=None)))
    state = deepspeed_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: its weights do not match its config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return save_pretrained(model, out_dir, exp["data"]["tokenizer"], extra={"from_checkpoint": str(path)})


@command("python -m cmoe_vlm.training.checkpoint")
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m cmoe_vlm.training.checkpoint",
                    description="Export a training checkpoint's weights (for train.init_from).")
    parser.add_argument("checkpoint", help="OUT/checkpoints/step_NNNNNNNN")
    parser.add_argument("--out", required=True, help="export folder to write (config.json + model.safetensors; new "
                                                     "or empty, see --replace)")
    parser.add_argument("--replace", action="store_true", help="replace a non-empty --out folder (whole, atomically)")
    args = parser.parse_args(argv)
    check_output(args.out, [args.checkpoint], args.replace)
    try:
        print(export_checkpoint(args.checkpoint, args.out))
    except CheckpointError as e:
        raise InputError(str(e)) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

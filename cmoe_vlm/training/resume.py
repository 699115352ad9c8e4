"""What a resume may change: the requested config against the checkpoint's, before anything is built.

- Refused (a ConfigError naming the fields and the ways out): the model (`model`, `vision`,
  `projector`) and what the checkpoint's layout or the data position depend on: the number of
  processes, `train.ep_size`, the ZeRO stage, bf16, `data.num_workers`, `data.seed`, `data.tokenizer`,
  `data.image_size`, `train.freeze` and which components `train.lr_scale` names (the optimizer's
  parameter groups). DeepSpeed cannot load a checkpoint into another layout, and its universal
  checkpoint does not cover DeepSpeed MoE's expert files; the route is an export of the checkpoint's
  weights into `train.init_from` (optimizer state and data position start afresh).
- Applied from the resumed step, with a warning, and recorded in OUT/config_changes.jsonl: everything
  else (schedule, lr, batch size, seq_len, shards, ...). A position saved for other shards starts its
  epoch over on the new ones.
- Ignored (they only matter at a run's start): `train.seed`, `train.init_from`, `vision.pretrained`,
  `vision.checkpoint_path`.

`train.resume=false` in a folder with checkpoints starts over there: the previous run's files are moved
into OUT/previous-<time>/ first, so its checkpoints neither get mixed with the new run's nor lost.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from cmoe_base.outputs import FolderLock

from ..config import ConfigError, to_dict
from .config import ExperimentConfig
from .engine import deepspeed_config

REFUSED_PREFIXES = ("model.", "vision.", "projector.", "topology.")
REFUSED = {"train.ep_size", "data.num_workers", "data.seed", "data.tokenizer", "data.image_size",
           "data.tokens_per_image", "data.image_token_unit", "train.freeze"}
IGNORED = {"train.seed", "train.init_from", "train.resume", "train.out_dir", "vision.pretrained",
           "vision.checkpoint_path"}
CHANGES = "config_changes.jsonl"


def experiment_record(exp: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The config and topology stored with every checkpoint (plain JSON data)."""
    ds = deepspeed_config(exp.train, exp.data.batch_size)
    topology = {"world_size": world_size, "zero_stage": ds["zero_optimization"]["stage"],
                "bf16": ds["bf16"]["enabled"]}
    return json.loads(json.dumps({"config": to_dict(exp), "topology": topology}, default=str))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def removed_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted names of the fields removed from a config's classes (their `legacy_keys`), with the value
    the code has kept since."""
    out = {f"{prefix}{k}": kept for k, (kept, _why) in getattr(type(config), "legacy_keys", {}).items()}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(removed_fields(value, f"{prefix}{f.name}."))
    return out


def compare(saved: dict[str, Any], requested: dict[str, Any]) -> dict[str, dict[str, list]]:
    """Differences between two `experiment_record`s: {"refused" | "applied" | "ignored": {field: [old, new]}}.

    A field the saved record lacks (a checkpoint written before the field existed) counts as its
    default, the behaviour the older code had: only a value other than the default is a change. A
    field removed since, saved with the value the code kept, is no change either."""
    defaults = _flat(json.loads(json.dumps(to_dict(ExperimentConfig()), default=str)))
    removed = removed_fields(ExperimentConfig())
    old = {**defaults, **_flat(saved["config"]), **_flat(saved["topology"], "topology.")}
    old = {k: v for k, v in old.items() if k not in removed or v != removed[k]}
    new = {**_flat(requested["config"]), **_flat(requested["topology"], "topology.")}
    out: dict[str, dict[str, list]] = {"refused": {}, "applied": {}, "ignored": {}}
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        regrouped = key.startswith("train.lr_scale") and None in (old.get(key), new.get(key))  # a component added or dropped
        kind = ("ignored" if key in IGNORED else
                "refused" if key in REFUSED or key.startswith(REFUSED_PREFIXES) or regrouped else "applied")
        out[kind][key] = [old.get(key), new.get(key)]
    return out


def _shown(key: str, values: list) -> str:
    name = {"topology.world_size": "number of processes", "topology.zero_stage": "ZeRO stage",
            "topology.bf16": "bf16"}.get(key, key)
    return f"{name} ({values[0]!r} -> {values[1]!r})"


def check_resume(checkpoint: Path, diff: dict[str, dict[str, list]]) -> None:
    """Refuse a resume that changes the model or the checkpoint's layout, in one line with the ways out."""
    refused = diff["refused"]
    if not refused:
        return
    fields = ", ".join(_shown(k, v) for k, v in refused.items())
    raise ConfigError(
        f"cannot resume {checkpoint} with a different {fields}: use another train.out_dir (or train.resume=false "
        f"to start this one over), or continue from its weights with train.init_from=DIR after "
        f"`python -m cmoe_vlm.training.checkpoint {checkpoint} --out DIR` (optimizer state and data position start afresh)")


def describe(diff: dict[str, dict[str, list]], step: int, out_dir: Path) -> str:
    parts = []
    if diff["applied"]:
        parts.append(f"applied from step {step}: " + ", ".join(_shown(k, v) for k, v in diff["applied"].items()))
    if diff["ignored"]:
        parts.append("ignored on resume: " + ", ".join(_shown(k, v) for k, v in diff["ignored"].items()))
    return f"resuming with a changed config; {'; '.join(parts)} (recorded in {out_dir / CHANGES})"


def record(out_dir: Path, step: int, diff: dict[str, dict[str, list]]) -> None:
    """Append the changes of a resume to OUT/config_changes.jsonl."""
    line = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "applied": diff["applied"],
            "ignored": diff["ignored"]}
    with open(out_dir / CHANGES, "a") as f:
        f.write(json.dumps(line) + "\n")


def set_aside(out_dir: Path) -> Path:
    """Move everything in `out_dir` (but earlier set-aside runs and the run's lock) into out_dir/previous-<time>/."""
    into = out_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    into.mkdir()
    for entry in out_dir.iterdir():
        if entry != into and not entry.name.startswith("previous-") and entry.name != FolderLock.NAME:
            shutil.move(str(entry), str(into / entry.name))
    return into

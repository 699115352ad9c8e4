"""Training stages: which components train, and at what learning rate (`train.freeze`, `train.lr_scale`).

A component is a named set of parameters of the VLM, by parameter name:

    vision     the ViT                        projector  the projector
    embed      token embeddings, final norm, LM head
    encoder    encoder blocks                 chunk      the chunk module (W_q, W_k)
    concept    concept-model blocks           decoder    decoder blocks (with joint decoding)
    experts    every MoE expert weight        router     every MoE router

The last two cut across the stacks. `train.freeze: [vision, embed, encoder, chunk, concept, decoder]`
trains only the projector (LLaVA's alignment stage); `train.lr_scale: {vision: 0.1, chunk: 2}`
multiplies those components' learning rates (H-Net's per-stage rates); a parameter in several
components gets the product of their scales. Frozen parameters get no gradient and are left out of
the optimizer. The next stage starts from the previous stage's export (`train.init_from`). An export
records its stages in config.json (`stages`: each stage's freeze, lr_scale and steps, earlier stages
first, carried over from the export it started from); a run that starts a new stage from an export
whose last stage differs records the change in OUT/config_changes.jsonl (step 0) and says so. A resume
that changes `train.freeze` or which components `train.lr_scale` names is refused (the optimizer's
parameter groups would change: start the stage from an export instead); one that changes only the
scales' values is applied and recorded like any other schedule change (training/resume.py).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..config import check

COMPONENTS: dict[str, Callable[[str], bool]] = {
    "vision": lambda n: n.startswith("vision."),
    "projector": lambda n: n.startswith("projector."),
    "embed": lambda n: n.startswith(("lm.embed.", "lm.lm_head.", "lm.norm.")),
    "encoder": lambda n: n.startswith("lm.encoder."),
    "chunk": lambda n: n.startswith("lm.chunk."),
    "concept": lambda n: n.startswith("lm.concept."),
    "decoder": lambda n: n.startswith("lm.decoder."),
    "experts": lambda n: ".experts." in n,
    "router": lambda n: ".router." in n or ".gate.wg." in n,  # ours, or DeepSpeed MoE's gate (ep_size > 1)
}


def check_stage_fields(freeze: list[str], lr_scale: dict[str, float]) -> None:
    """ConfigErrors naming `train.freeze` / `train.lr_scale` and the allowed component names."""
    names = ", ".join(COMPONENTS)
    for name in freeze:
        check(name in COMPONENTS, "freeze", name, f"is not a component; components: {names}")
    for name, scale in lr_scale.items():
        check(name in COMPONENTS, "lr_scale", name, f"is not a component; components: {names}")
        check(isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0, f"lr_scale.{name}", scale,
              "must be a finite number > 0 (freeze a component with train.freeze instead of a scale of 0)")


def components_of(param_name: str) -> list[str]:
    return [c for c, match in COMPONENTS.items() if match(param_name)]


def apply_freeze(model: nn.Module, freeze: list[str]) -> int:
    """requires_grad False on every parameter of a frozen component; returns how many were frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if set(components_of(name)) & set(freeze):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def stage(freeze: list[str], lr_scale: dict[str, float], steps: int) -> dict[str, Any]:
    """One stage as an export records it."""
    return {"freeze": sorted(freeze), "lr_scale": dict(sorted(lr_scale.items())), "steps": steps}


def previous_stages(init_from: str | None) -> list[dict[str, Any]]:
    """The stages recorded by the export a run starts from ([] without one, or for an export that
    records none: a conversion, an import, an older version)."""
    config = Path(init_from) / "config.json" if init_from else None
    if config is None or not config.is_file():
        return []
    return list(json.loads(config.read_text()).get("stages", []))


def stage_change(before: list[dict[str, Any]], freeze: list[str], lr_scale: dict[str, float]) -> dict[str, list]:
    """{"train.freeze" | "train.lr_scale": [previous stage's, this run's]} where they differ."""
    if not before:
        return {}
    last, now = before[-1], stage(freeze, lr_scale, 0)
    return {f"train.{k}": [last.get(k), now[k]] for k in ("freeze", "lr_scale") if last.get(k) != now[k]}

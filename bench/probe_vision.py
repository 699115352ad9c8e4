#!/usr/bin/env python
"""Can the vision tower see it at all? Train the tower + projector of a config alone on easy-VQA labels.

Separates "the tower cannot extract shape from these pixels" from "the LM does not use what the tower
extracts": the configured VisionEncoder and Projector (exactly as the VLM builds them, same image
transform), pooled (mean and max, or --pool attention), with a linear head per label (shape: 3 classes, colour: 8), trained by
AdamW on the easy-VQA train images that have both a shape and a colour question (2,435 of 4,000),
scored on such test images (603 of 1,000).

    python bench/probe_vision.py --config configs/easyvqa.yaml --out bench/results/probe_vision.json \
        --variant shipped= --variant conv=vision.stem=conv

Writes OUT (JSON: test accuracy per label and variant, seconds) and prints a table. Measured (2-core CPU,
configs/easyvqa.yaml, 20 epochs): shape 0.959 / colour 0.992 read by mean+max pooling; 0.426 / 0.995 by
one attention query per label (`--pool attention`): docs/design.md §7b.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_image_adaptivity import parse_variants  # noqa: E402
from easyvqa_data import image_labels  # noqa: E402


class TowerProbe(nn.Module):
    """images (N, 3, H, W) -> {label: logits (N, classes)} through the VLM's own tower and projector."""

    def __init__(self, model, classes: dict[str, int], pool: str = "meanmax"):
        super().__init__()
        self.vision, self.projector, self.pool = model.vision, model.projector, pool
        dim = model.cfg.model.dim
        # attention: one learned query per label over the tokens (softmax-weighted mean, as an LM's
        # answer position reads an image); meanmax: mean and max over tokens (centring zeroes the mean)
        self.queries = nn.ParameterDict({k: nn.Parameter(torch.zeros(dim)) for k in classes}) if pool == "attention" else None
        width = dim if pool == "attention" else 2 * dim
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.projector(self.vision(images), self.vision.grid_size)  # (N, T, d)
        if self.pool == "attention":
            out = {}
            for k, head in self.heads.items():
                weights = (tokens @ self.queries[k] / tokens.shape[-1] ** 0.5).softmax(dim=1)  # (N, T)
                out[k] = head((weights[..., None] * tokens).sum(1))
            return out
        pooled = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)
        return {k: head(pooled) for k, head in self.heads.items()}


def train_probe(name: str, config: str, overrides: list[str], data: dict, epochs: int, batch: int = 64,
                lr: float = 3e-3, seed: int = 0, save_tower: Path | None = None, model=None,
                pool: str = "meanmax") -> dict:
    """Train the tower + projector of `config` (+ overrides) with a linear head per label on data["train"],
    score data["train"] and data["test"]; with `save_tower`, write the trained tower there (timm format).
    `model`: a ConceptMoEVLM whose tower and projector to train in place (default: a new one)."""
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from cmoe_vlm.training.config import load_experiment

    torch.manual_seed(seed)
    if model is None:
        model = ConceptMoEVLM(load_experiment(config, list(overrides)).vlm)
    transform = model.image_transform(train=False)
    tensors = {split: torch.stack([transform(im) for im in imgs]) for split, (imgs, _) in data.items()}
    classes = {k: int(v.max()) + 1 for k, v in data["train"][1].items()}
    probe = TowerProbe(model, classes, pool)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    x, labels = tensors["train"], data["train"][1]
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            out = probe(x[idx])
            loss = sum(nn.functional.cross_entropy(out[k], labels[k][idx]) for k in out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"[{name}] epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    probe.eval()
    res = {"variant": name, "overrides": overrides, "steps": steps, "train_seconds": round(time.time() - t0, 1),
           "tower_params": sum(p.numel() for p in model.vision.parameters()),
           "tokens_per_image": model.cfg.tokens_per_image}
    with torch.no_grad():
        for split in ("train", "test"):
            out = probe(tensors[split])
            res[split] = {k: round((out[k].argmax(-1) == v).float().mean().item(), 4)
                          for k, v in data[split][1].items()}
    if save_tower is not None:
        from safetensors.torch import save_file
        save_tower.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.vision.vit.state_dict().items()}, str(save_tower))
        res["tower"] = str(save_tower)
    print(f"[{name}] test {res['test']}  train {res['train']}  ({res['train_seconds']} s)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/easyvqa.yaml")
    ap.add_argument("--variant", action="append", default=[], help="name=key=value[,key=value] (repeatable)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", choices=("meanmax", "attention"), default="meanmax",
                    help="how the head reads an image's tokens: mean and max, or one learned attention query per label")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--save-towers", type=Path, help="write each variant's trained tower to DIR/<variant>.safetensors "
                    "(a timm checkpoint: vision.pretrained=true vision.checkpoint_path=...)")
    args = ap.parse_args()
    data = {split: image_labels(split) for split in ("train", "test")}
    variants = parse_variants(args.variant or ["shipped="])
    rows = [train_probe(name, args.config, ov, data, args.epochs, args.batch, args.lr, args.seed,
                        args.save_towers / f"{name}.safetensors" if args.save_towers else None, pool=args.pool)
            for name, ov in variants.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "epochs": args.epochs, "lr": args.lr, "rows": rows},
                                   indent=1))
    for r in rows:
        print(f"{r['variant']:>16}: " + "  ".join(f"{k} {v:.3f}" for k, v in r["test"].items()))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Content-adaptive image chunking on built-in data: where does the chunker put image boundaries?

Trains a ConceptMoE VLM (configs/tiny.yaml plus overrides) once per variant and seed, and every
--eval-every steps measures on held-out built-in images with object masks
(cmoe_vlm.eval.adaptivity): the boundary rate on tokens whose content changes against tokens
that repeat flat background, the fraction of degenerate images (one chunk, or every token a
boundary), the within-image spread of p and the evaluation-time (p >= 0.5) ratio per modality.
Writes JSON (curves and final figures per run) and a PNG of the curves.

    python bench/bench_image_adaptivity.py --out bench/results/adaptivity.json
    python bench/bench_image_adaptivity.py --seeds 3 --variant joint= \\
        --variant pm=model.chunk.ratio_mode=per_modality

The loop is the training loop's math without DeepSpeed (`train_steps`), so curves can be taken mid-run.
`joint` / `per_modality` run configs/tiny.yaml as shipped (projector.center, image margin on);
the `_paper` variants turn both off.

Measured (2-core CPU shared with other jobs, load 3-10; 300 steps, 64 held-out images, 3 seeds):
  tiny.yaml size, joint R=2, paper chunker: change/repeat 1.20-1.26, degenerate 0.17-0.33,
      within-image std of p <= 0.011, image 1.35-1.41 vs text 2.03-2.09 at evaluation;
  same with center + margin 0.1: change/repeat 46-468, degenerate 0.19-0.23 (scenes 0.00, rendered
      text 0.75), std of p 0.26-0.30, image 3.02-3.08 vs text 1.96-2.20.
  --base small, per-modality 1.5 / 3, center + margin: change/repeat 8.8-10.6, degenerate 0.00,
      image 2.75-2.83, text 1.51-1.59 (paper chunker: 0.20-1.87, 0.06-0.16, image 2.18-5.42).
The cause, by cosine between adjacent image tokens (printed per run): after the projector the
tokens of an image share one large component (cosine 0.999 on changing tokens, joint mode), and
where content survives (per-modality mode), W_q/W_k turn q_n ⊥ k_(n-1) for every image token
(p = 0.5 ± 0.01), which sharpened sampling (τ = 6: 0.11 or 0.89) lets the ratio loss accept.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch

# Smaller than tiny.yaml (as bench_compression_control): ~4x cheaper steps; the chunker, vision
# tower and data are the same.
SMALL = ["model.dim=64", "model.moe.expert_hidden=128", "model.encoder_layers=1", "model.concept_layers=1",
         "model.decoder_layers=1", "vision.depth=1", "vision.embed_dim=48", "data.seq_len=256", "data.batch_size=8",
         "data.shuffle_buffer=100", "data.num_workers=0", "train.warmup_steps=10", "train.lr=3e-3"]
PER_MODALITY = ["model.chunk.ratio_mode=per_modality", "model.chunk.text_ratio=1.5", "model.chunk.image_ratio=3"]
PAPER = ["projector.center=false", "model.chunk.image_margin_weight=0", "model.chunk.detach_images=false"]  # the paper's chunker, no image options
VARIANTS = {"joint": [], "per_modality": PER_MODALITY, "joint_paper": PAPER, "per_modality_paper": PER_MODALITY + PAPER}
BASES = {"small": SMALL, "tiny": ["data.num_workers=0"]}


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """name=key=value[,key=value] -> {name: overrides}; `name=` alone: no overrides."""
    return {v.split("=", 1)[0]: [x for x in v.partition("=")[2].split(",") if x] for v in specs}


def stage_similarity(runner, num_images: int, text_chars: int, grounded: bool) -> dict:
    """Mean cosine between each image token and its predecessor, per content kind (change / repeat),
    at each stage that feeds the chunker: projector output, encoder output h (the chunk module's
    input), and q_n vs k_(n-1) (the score itself). Where change and repeat stop differing is where
    content is lost."""
    from cmoe_vlm.eval.adaptivity import KINDS, heldout_documents, token_contents, token_kinds

    model = runner.model
    grid = model.cfg.image_grid
    P = grid[0] * grid[1]
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.lm.chunk.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))]
    docs = [d for d in heldout_documents(num_images, model.vision.img_size[0], text_chars=text_chars,
                                         grounded=grounded) if d[1]]
    sims: dict[str, dict[str, list]] = {s: {k: [] for k in KINDS.values()} for s in ("projector", "h", "qk")}
    with torch.no_grad():
        for pieces, drawings in docs:
            seq = runner.sequence(pieces, add_eos=True)
            _, batch = runner.forward([seq])
            feats = model.projector(model.vision(batch.images), model.vision.grid_size)  # (N, P, d)
            h = seen["h"][0]
            q = torch.nn.functional.normalize(model.lm.chunk.q_proj(h), dim=-1)
            k = torch.nn.functional.normalize(model.lm.chunk.k_proj(h), dim=-1)
            for j, ((start, _), drawing) in enumerate(zip(seq.image_spans, drawings)):
                kinds = token_kinds(token_contents(drawing, grid))
                sl = slice(start + 1, start + 1 + P)
                stages = {"projector": torch.nn.functional.cosine_similarity(feats[j, 1:], feats[j, :-1], dim=-1),
                          "h": torch.nn.functional.cosine_similarity(h[sl][1:], h[sl][:-1], dim=-1),
                          "qk": (q[sl][1:] * k[sl][:-1]).sum(-1)}
                for stage, cos in stages.items():
                    for kind, name in KINDS.items():
                        sims[stage][name] += cos[torch.from_numpy(kinds[1:] == kind)].tolist()
    for hk in hooks:
        hk.remove()
    model.train()
    return {stage: {k: (sum(v) / len(v) if v else None) for k, v in d.items()} for stage, d in sims.items()}


def train_steps(model, exp, on_step: Callable[[int, Any, Any], None] | None = None, boundaries=None) -> None:
    """exp.train.steps steps of the training loop's math without DeepSpeed (the objective with its ratio
    controller, AdamW with the same parameter groups, warmup + cosine schedule, gradient clipping; one
    process), so benches can measure mid-run; on_step(step, output, losses) after each step.
    `boundaries`: a boundary policy."""
    from cmoe_vlm.objective import Objective, RatioController
    from cmoe_vlm.training.optim import build_optimizer
    from cmoe_vlm.training.stages import apply_freeze
    from data_pipelines.loader import StreamingLoader
    from vision import build_image_transform

    cfg = exp.train
    apply_freeze(model, cfg.freeze)
    opt, sched = build_optimizer(model, cfg)
    controller = RatioController.of(exp.model)
    objective = Objective(exp.model, controller)
    loader = StreamingLoader(exp.data, image_transform=build_image_transform(model.vision, train=True))
    step = 0
    model.train()
    while step < cfg.steps:
        for batch in loader:
            out = model(batch, boundaries=boundaries)
            losses = objective(out, batch)
            if controller is not None:
                controller.update(out.own_boundaries, batch)
            opt.zero_grad(set_to_none=True)
            losses.total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step, out, losses)
            if step >= cfg.steps:
                break


def ensure_builtin_data(root: Path, num_train: int, text_chars: int, grounded: bool) -> None:
    """Write the built-in dataset under `root` unless there is one (builtin.json records how)."""
    from data_pipelines.builtin import write_builtin_dataset

    if not (root / "builtin.json").exists():
        write_builtin_dataset(root, num_train=num_train, text_chars=text_chars, grounded=grounded)
        (root / "builtin.json").write_text(json.dumps({"num_train": num_train, "text_chars": text_chars,
                                                       "grounded": grounded}))


def merge_reports(files: list[str], summarise: Callable[[dict], dict]) -> dict:
    """The runs of earlier reports in one report (the first one's settings), summarised again."""
    reports = [json.loads(Path(f).read_text()) for f in files]
    runs = {k: v for r in reports for k, v in r["runs"].items()}
    return {**reports[0], "runs": runs, "merged_from": files, "summary": summarise(runs)}


def run_one(exp, data_root: Path, eval_every: int, eval_images: int, final_images: int,
            save: Path | None = None) -> dict:
    """Train `exp` with curves of the adaptivity measurement; returns the run's record."""
    from cmoe_vlm.eval.adaptivity import measure_adaptivity
    from cmoe_vlm.inference.runner import ModelRunner
    from cmoe_vlm.training.evaluate import evaluate
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from data_pipelines.loader import StreamingLoader
    from data_pipelines.tokenizer import load_tokenizer
    from vision import build_image_transform

    cfg = exp.train
    torch.manual_seed(cfg.seed)
    model = ConceptMoEVLM(exp.vlm)
    runner = ModelRunner(model, load_tokenizer(exp.data.tokenizer), batch_size=8)
    written = json.loads((data_root / "builtin.json").read_text())
    text_chars, grounded = written["text_chars"], written.get("grounded", False)

    def measure(num_images: int) -> dict:
        rep = measure_adaptivity(runner, num_images=num_images, text_chars=text_chars, grounded=grounded)
        rep["similarity"] = stage_similarity(runner, 16, text_chars, grounded)
        model.train()
        return rep

    steps, curve = [], []

    def record(step: int, out, losses) -> None:
        rec = {"step": step, "lm_loss": losses.lm.item(), "ratio_loss": losses.ratio.item()}
        for k, s in out.compression.items():
            rec[f"tokens_{k}"], rec[f"concepts_{k}"] = int(s.tokens), int(s.concepts)
        steps.append(rec)
        if step % eval_every == 0 and step < cfg.steps:
            curve.append({"step": step, **measure(eval_images)})

    t0 = time.perf_counter()
    train_steps(model, exp, record)
    step = cfg.steps
    final = {"step": step, **measure(final_images)}
    curve.append(final)
    if save is not None:
        from cmoe_vlm.checkpoints.export import save_pretrained
        save_pretrained(model, save)
    from dataclasses import replace
    held_cfg = replace(exp.data, shards=str(data_root / "heldout"), shuffle_buffer=0, num_workers=0)
    held = evaluate(model, StreamingLoader(held_cfg, image_transform=build_image_transform(model.vision, train=False)),
                    cfg.eval_batches)
    window = {k: (sum(r.get(f"tokens_{k}", 0) for r in steps[-20:]), sum(r.get(f"concepts_{k}", 0) for r in steps[-20:]))
              for k in ("text", "image", "all")}
    return {"seconds": time.perf_counter() - t0, "final": final, "curve": curve, "steps": steps,
            "train_window20": {k: t / max(c, 1) for k, (t, c) in window.items() if t},
            "heldout_lm_loss": held["lm_loss"], "heldout_compression": held["compression"]}


def summarise_runs(runs: dict) -> dict:
    """Per variant: each final figure as [seed values] and the targets met by every seed."""
    out: dict[str, dict] = {}
    for run in runs.values():
        f = run["final"]
        v = out.setdefault(run["variant"], {"seeds": [], "change_over_repeat": [], "degenerate_fraction": [],
                                            "within_image_p_std": [], "eval_ratio_text": [], "eval_ratio_image": [],
                                            "heldout_lm_loss": []})
        v["seeds"].append(run["seed"])
        v["change_over_repeat"].append(f["change_over_repeat"])
        v["degenerate_fraction"].append(f["degenerate_fraction"])
        v["within_image_p_std"].append(f["within_image_p_std"]["mean"])
        v["eval_ratio_text"].append(f["eval_ratio"].get("text"))
        v["eval_ratio_image"].append(f["eval_ratio"].get("image"))
        v["heldout_lm_loss"].append(run["heldout_lm_loss"])
        v.setdefault("_beats", []).append(f["change_beats_repeat_by_1.5"])
    for v in out.values():
        v["all_seeds_change_over_repeat_>=1.5"] = all(v.pop("_beats"))
        v["all_seeds_degenerate_<=0.2"] = all(x <= 0.2 for x in v["degenerate_fraction"])
        v["images_compressed_more_than_text"] = [i > t for i, t in zip(v["eval_ratio_image"], v["eval_ratio_text"])]
    return out


def plot(report: dict, path: Path) -> None:
    """Curves per run (one colour per variant, one line per seed) of the adaptivity figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("change_over_repeat", "boundary rate: change / repeat (log)", 1.5),
              ("auc_change_vs_repeat", "AUC of p, change vs repeat", 0.5),
              ("degenerate_fraction", "degenerate images", 0.2),
              ("within_image_p_std", "within-image std of p", None),
              ("eval_ratio.image", "eval-time image ratio", None),
              ("eval_ratio.text", "eval-time text ratio", None)]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    names = list(dict.fromkeys(r["variant"] for r in report["runs"].values()))
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}

    def get(c: dict, field: str) -> float:
        v = c
        for part in field.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if isinstance(v, dict):
            v = v.get("mean")
        if v is None and field == "change_over_repeat":  # no boundary on any repeat token
            v = 1e3
        return math.nan if v is None else v

    for run in report["runs"].values():
        xs = [c["step"] for c in run["curve"]]
        for ax, (field, title, target) in zip(axes.flat, panels):
            ax.plot(xs, [get(c, field) for c in run["curve"]], color=colours[run["variant"]], alpha=0.8, lw=1.2,
                    label=run["variant"] if field == panels[0][0] and run["seed"] == min(
                        r["seed"] for r in report["runs"].values() if r["variant"] == run["variant"]) else None)
            ax.set_title(title, fontsize=9)
            if target is not None:
                ax.axhline(target, ls="--", color="gray", lw=0.8)
    axes.flat[0].set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("training step")
    fig.legend(loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.suptitle("Image chunking on held-out built-in images (one line per seed; dashed: target or chance)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/adaptivity.json")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--base", choices=sorted(BASES), default="small", help="overrides applied before each variant's")
    ap.add_argument("--data", default="data/builtin_adaptivity", help="built-in dataset root (written if missing)")
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--grounded", action="store_true", help="built-in data with object positions in the text")
    ap.add_argument("--text-chars", type=int, default=3000, help="long text documents (the demo's length)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-images", type=int, default=32, help="held-out images per curve point")
    ap.add_argument("--final-images", type=int, default=64, help="held-out images for the final figures")
    ap.add_argument("--variant", action="append", default=[], help="name=key=value[,key=value]")
    ap.add_argument("--seeds", type=int, default=1, help="runs per variant (train.seed 0..N-1)")
    ap.add_argument("--seed0", type=int, default=0, help="first seed")
    ap.add_argument("--save", default=None, help="save each final model under SAVE/<variant>_seed<N>")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no training: merge the runs of earlier reports into --out (JSON + PNG)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        report = merge_reports(args.merge, summarise_runs)
        out.write_text(json.dumps(report, indent=1))
        plot(report, out.with_suffix(".png"))
        return report

    from cmoe_vlm.training.config import load_experiment

    root = Path(args.data)
    ensure_builtin_data(root, args.num_train, args.text_chars, args.grounded)
    variants = parse_variants(args.variant) if args.variant else VARIANTS
    report = {"config": args.config, "base": BASES[args.base], "steps": args.steps, "runs": {}}
    for name, extra in variants.items():
        for seed in range(args.seed0, args.seed0 + args.seeds):
            exp = load_experiment(args.config, BASES[args.base] + extra + [
                f"train.steps={args.steps}", f"train.seed={seed}", f"data.seed={seed}",
                f"data.shards={root / 'train'}"])
            save = Path(args.save) / f"{name}_seed{seed}" if args.save else None
            rec = run_one(exp, root, args.eval_every, args.eval_images, args.final_images, save)
            report["runs"][f"{name}/seed{seed}"] = {"variant": name, "seed": seed, "overrides": extra, **rec}
            f = rec["final"]
            print(f"{name}/seed{seed}: change/repeat {f['change_over_repeat']}, auc {f['auc_change_vs_repeat']}, "
                  f"degenerate {f['degenerate_fraction']:.2f}, p_std {f['within_image_p_std']['mean']:.3f}, "
                  f"eval ratio {json.dumps({k: round(v, 2) for k, v in f['eval_ratio'].items()})}, "
                  f"train20 {json.dumps({k: round(v, 2) for k, v in rec['train_window20'].items()})}, "
                  f"heldout lm {rec['heldout_lm_loss']:.3f}, {rec['seconds']:.0f}s", flush=True)
            print("  cos(token, predecessor) by stage:", json.dumps(
                {st: {k: None if v is None else round(v, 3) for k, v in d.items()} for st, d in f["similarity"].items()}))
            out.write_text(json.dumps(report, indent=1))
    report["summary"] = summarise_runs(report["runs"])
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()

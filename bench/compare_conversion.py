#!/usr/bin/env python
"""Continual-training conversion, end to end (issue 9): baseline → convert → continue, side by side.

    python bench/compare_conversion.py [--quick] [--out bench/results/conversion]
    python bench/compare_conversion.py --data pydoc --baseline hf-mixtral ...   # from a transformers model

1. trains a baseline MoE (chunking off) on the built-in data; or, with `--baseline hf-mixtral`,
   pre-trains transformers' own `MixtralForCausalLM` (its code, byte-level ids) on the same text,
   saves it as a transformers folder (OUT/hf_mixtral) and imports that with `cmoe_vlm.cli.hf_import`
   (docs/design.md §16): every later run builds the import's model (its train_overrides.txt);
2. converts its final export with `cmoe_vlm.cli.convert` for each strategy (default: more experts and
   looped concept layers), activated FLOPs matched at the target R;
3. continues training the baseline and every converted model for the same number of steps on the
   same data (same packed rows per step, so the same token budget), the converted ones with the
   compression ramped from R = 1 (`train.ratio_ramp_steps`: boundaries forced with probability 1 − s/N);
4. writes `OUT/conversion.md` and `OUT/conversion.json` (held-out LM loss, its gap to the continued
   baseline, achieved compression, FLOPs ratio, last train losses) and `OUT/conversion_loss.png`.

`--quick` shrinks the model and the step counts so the whole thing runs in a couple of minutes on
2 CPU cores: a smoke test of the pipeline, not a result.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmoe_vlm.checkpoints.conversion import convert, overrides_for  # noqa: E402
from cmoe_vlm.cli.hf_import import main as hf_import_main  # noqa: E402
from cmoe_vlm.checkpoints.export import load_pretrained, save_pretrained  # noqa: E402
from cmoe_vlm.training.config import load_experiment  # noqa: E402
from cmoe_vlm.training.loop import train  # noqa: E402
from data_pipelines.builtin import write_builtin_dataset  # noqa: E402
from data_pipelines.shards import write_shards  # noqa: E402

QUICK = ["model.dim=64", "model.moe.expert_hidden=64", "model.moe.num_experts=8", "model.encoder_layers=1",
         "model.concept_layers=4", "model.decoder_layers=1", "vision.depth=1", "vision.embed_dim=48",
         "data.seq_len=256", "data.batch_size=4", "data.shuffle_buffer=50", "data.num_workers=0"]


def pydoc_split() -> dict[str, list[str]]:
    """CPython's pydoc topics (pydoc_data.topics: 79 help pages of real English and code, in every
    Python install): every 10th topic by sorted name held out (8), the rest train (71). Unlike the
    templated built-in text, its loss stays well above zero, so relative gaps mean something.
    (Topics "if" and "else" share one page, so one held-out page also appears in training.)"""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return {"train": [topics[k] for i, k in enumerate(names) if i % 10 != 0],
            "heldout": [topics[k] for i, k in enumerate(names) if i % 10 == 0]}


def write_pydoc_dataset(out_dir: Path) -> None:
    """`pydoc_split` as text shards."""
    for split, texts in pydoc_split().items():
        write_shards([{"txt": t.encode()} for t in texts], out_dir / split, total=len(texts), desc=f"pydoc {split}")


def pretrain_hf_mixtral(out: Path, steps: int, seq_len: int, batch_size: int, lr: float, seed: int = 0) -> None:
    """Pre-train a transformers MixtralForCausalLM (dim 128, 6 layers, 8 experts top-2, byte ids) on the
    pydoc training topics (random windows of `seq_len` tokens, one document each) with AdamW and a
    cosine schedule, and save it with its (byte) tokenizer as a transformers folder at `out`."""
    import math

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from data_pipelines.tokenizer import ByteTokenizer, save_byte_tokenizer

    tok = ByteTokenizer()
    docs = [torch.tensor(tok.encode(t)) for t in pydoc_split()["train"]]
    docs = [d for d in docs if len(d) > seq_len]
    config = MixtralConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                           output_router_logits=True, router_aux_loss_coef=0.01, bos_token_id=tok.bos_id,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        rows = []
        for i in torch.randint(len(docs), (batch_size,), generator=g).tolist():
            start = int(torch.randint(len(docs[i]) - seq_len, (1,), generator=g))
            rows.append(docs[i][start:start + seq_len])
        ids = torch.stack(rows)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"hf-mixtral pre-training step {step}: loss {loss.item():.4f}", flush=True)
    model.config.output_router_logits = False
    model.eval().save_pretrained(out)
    save_byte_tokenizer(out)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def moving_average(xs: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - n] if i >= n else 0.0)
        out.append(acc / min(i + 1, n))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--out", default="bench/results/conversion")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test of the pipeline")
    ap.add_argument("--base-steps", type=int, default=None, help="baseline pre-training steps (default 400; quick 30)")
    ap.add_argument("--cont-steps", type=int, default=None, help="continued-training steps (default 300; quick 20)")
    ap.add_argument("--ramp-steps", type=int, default=None, help="R ramp length (default cont-steps/4)")
    ap.add_argument("--ratio", type=float, default=1.5, help="target R of the converted models")
    ap.add_argument("--data", choices=("builtin", "pydoc"), default="builtin",
                    help="built-in VLM data, or CPython's pydoc topics as text (written to OUT/data once)")
    ap.add_argument("--encoder-layers", type=int, default=1,
                    help="baseline layers that become the encoder (default 1: tiny stacks need >= 3 concept "
                         "layers for looping to fit at R = 1.5)")
    ap.add_argument("--decoder-layers", type=int, default=1, help="baseline layers that become the decoder (default 1)")
    ap.add_argument("--strategies", default="more_experts,looped", help="comma-separated: more_experts,looped,none")
    ap.add_argument("--cont-lr", type=float, default=None, help="continued-training LR (default: half the config's)")
    ap.add_argument("--ratio-loss-weight", type=float, default=None, help="default: the config's")
    ap.add_argument("--baseline", choices=("ours", "hf-mixtral"), default="ours",
                    help="pre-train our baseline MoE, or transformers' MixtralForCausalLM (then imported)")
    ap.add_argument("--reuse-baseline", action="store_true",
                    help="skip pre-training when OUT/baseline/final exists (e.g. to try longer continuations)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_steps = args.base_steps or (30 if args.quick else 400)
    cont_steps = args.cont_steps or (20 if args.quick else 300)
    ramp = args.ramp_steps if args.ramp_steps is not None else cont_steps // 4
    data_root = out / "data"
    if not (data_root / "train" / "manifest.json").exists():
        if args.data == "pydoc":
            write_pydoc_dataset(data_root)
        else:
            small = dict(num_train=300, num_heldout=40, maxcount=60, text_chars=1500) if args.quick else {}
            write_builtin_dataset(data_root, **small)
    common = (QUICK if args.quick else []) + [
        f"data.shards={data_root / 'train'}", f"train.heldout_shards={data_root / 'heldout'}",
        "train.tensorboard=false", "train.resume=false", f"train.ckpt_every={10 ** 6}", *args.overrides]
    probe = load_experiment(args.config, common)
    cont_lr = args.cont_lr or probe.train.lr / 2
    n_enc, n_dec = args.encoder_layers, args.decoder_layers
    timings: dict[str, float] = {}

    def run(name: str, extra: list[str]) -> dict:
        t0 = time.perf_counter()
        summary = train(load_experiment(args.config, common + extra + [f"train.out_dir={out / name}"]))
        timings[name] = time.perf_counter() - t0
        if summary.get("interrupted"):  # train() turns SIGINT/SIGTERM into a checkpoint and a clean return
            raise SystemExit(f"{name}: interrupted; stopping the comparison")
        return summary

    base_export = out / "baseline" / "final"
    if args.reuse_baseline and (base_export / "config.json").exists():
        print(f"== baseline pre-training: reusing {base_export}")
    elif args.baseline == "hf-mixtral":
        print(f"== transformers MixtralForCausalLM pre-training: {base_steps} steps, then cmoe_vlm.cli.hf_import")
        t0 = time.perf_counter()
        if args.data != "pydoc":
            raise SystemExit("--baseline hf-mixtral pre-trains on text: use it with --data pydoc")
        pretrain_hf_mixtral(out / "hf_mixtral", base_steps, probe.data.seq_len, probe.data.batch_size, probe.train.lr)
        timings["baseline"] = time.perf_counter() - t0
        if hf_import_main([str(out / "hf_mixtral"), "--out", str(base_export)]) != 0:
            raise SystemExit("the import failed")
    else:
        print(f"== baseline pre-training: {base_steps} steps")
        run("baseline", ["model.chunk.enabled=false", f"train.steps={base_steps}"])
    baseline, meta = load_pretrained(base_export)
    if "imported_from" in meta:  # every run builds the imported model: its overrides join the common ones
        common += (base_export / "train_overrides.txt").read_text().split()

    cont = [f"train.steps={cont_steps}", f"train.lr={cont_lr}", f"train.warmup_steps={max(1, cont_steps // 20)}"]
    runs = {"baseline continued": ("baseline_continued", ["model.chunk.enabled=false",
                                                          f"train.init_from={base_export}"] + cont, None)}
    flops_rows = {"baseline continued": None}
    for strategy in [s for s in args.strategies.split(",") if s]:
        try:
            model, rows = convert(baseline, n_enc, n_dec, strategy, args.ratio)
        except ValueError as e:
            print(f"== {strategy}: skipped ({e})")
            continue
        conv_dir = out / f"converted_{strategy}"
        save_pretrained(model, conv_dir, meta.get("tokenizer", "byte"))
        over = overrides_for(model.cfg)
        if args.ratio_loss_weight is not None:
            over.append(f"model.chunk.ratio_loss_weight={args.ratio_loss_weight}")
        name = f"converted {strategy}"
        runs[name] = (f"{strategy}_continued", over + [f"train.init_from={conv_dir}",
                                                       f"train.ratio_ramp_steps={ramp}"] + cont, rows[1])
        flops_rows[name] = rows[1]
        print(f"== converted ({strategy}): {rows[1].note}, FLOPs/token ×{rows[1].flops_ratio:.3f} of the baseline")

    results = {}
    for name, (folder, extra, row) in runs.items():
        print(f"== {name}: {cont_steps} steps")
        summary = run(folder, extra)
        metrics = read_metrics(out / folder)
        held = summary.get("heldout", {})
        tail = [m["lm_loss"] for m in metrics[-max(1, cont_steps // 10):]]
        cfg = load_experiment(args.config, common + extra).model
        results[name] = {
            "run": folder, "heldout_lm_loss": held.get("lm_loss"),
            "heldout_ratio": held.get("compression", {}).get("all", {}).get("ratio"),
            "train_lm_loss_last": sum(tail) / len(tail), "concept_top_k": cfg.concept_moe_cfg.top_k,
            "loop_layers": cfg.loop_layers, "target_ratio": cfg.chunk.target_ratio if cfg.chunk.enabled else 1.0,
            "flops_ratio": row.flops_ratio if row else 1.0, "seconds": timings[folder],
            "tokens": cont_steps * probe.data.batch_size * probe.data.seq_len,
            "curve": [(m["step"], m["lm_loss"]) for m in metrics],
        }
    ref = results["baseline continued"]["heldout_lm_loss"]
    for r in results.values():
        r["gap_pct"] = 100 * (r["heldout_lm_loss"] / ref - 1) if ref and r["heldout_lm_loss"] else None

    head = ("| run | concept top_k | loop | target R | held-out R | FLOPs/tok ×base | held-out LM loss | "
            "vs baseline | last train LM loss | time (s) |")
    lines = [f"# Conversion comparison ({'quick smoke test' if args.quick else 'full'})", "",
             f"config {args.config}{' + quick overrides' if args.quick else ''}; baseline pre-training "
             f"{base_steps} steps; continued {cont_steps} steps each (≈{results['baseline continued']['tokens']} "
             f"token slots); R ramped 1 → {args.ratio} over {ramp} steps (forced boundaries); continued LR {cont_lr:g}; "
             f"split {n_enc} encoder / {n_dec} decoder layers.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for name, r in results.items():
        lines.append(f"| {name} | {r['concept_top_k']} | {r['loop_layers']} | {r['target_ratio']:g} | "
                     f"{fmt(r['heldout_ratio'], '.2f')} | {r['flops_ratio']:.3f} | "
                     f"{fmt(r['heldout_lm_loss'], '.4f')} | "
                     f"{fmt(r['gap_pct'], '+.2f')}% | {r['train_lm_loss_last']:.4f} | {r['seconds']:.0f} |")
    (out / "conversion.md").write_text("\n".join(lines) + "\n")
    (out / "conversion.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                     "flops": {k: v.summary() if v else None
                                                               for k, v in flops_rows.items()}}, indent=2))
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        ax.plot(steps, moving_average(list(losses), max(1, cont_steps // 20)), label=name)
    if ramp:
        ax.axvline(ramp, color="gray", ls=":", lw=1, label=f"R ramp ends ({ramp})")
    ax.set_xlabel("continued-training step")
    ax.set_ylabel("train LM loss (moving average)")
    ax.set_title(f"Continual training after conversion, R = {args.ratio:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "conversion_loss.png", dpi=120)
    print(f"wrote {out / 'conversion.md'}, {out / 'conversion.json'}, {out / 'conversion_loss.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

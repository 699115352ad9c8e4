#!/usr/bin/env python
"""Our layers against transformers' own MoE classes, on identical weights (issue 28).

For each family (Mixtral, Qwen2-MoE, OLMoE shapes) a tiny-but-real model is built from transformers'
config class (`--dim`, `--layers`, `--experts` top-`--top-k`, GQA `--heads`/`--kv-heads`, `--vocab`),
saved with `save_pretrained`, and imported with `cmoe-hf-import` (cmoe_vlm/checkpoints/from_transformers.py).
Before any timing the bench checks that our import gives transformers' logits (fp32, max |diff| below
1e-4; it stops otherwise). Then, in fp32 and bf16 (autocast over fp32 weights, as our trainer and
transformers' Trainer run bf16), it times, interleaved (A B A B ...), medians of `--reps` (wall time,
and process CPU time beside it: less swayed by other jobs on a shared machine):

- train: one step, forward + cross-entropy + backward + AdamW, B `--batch` x T `--seq`;
- prefill: `--batch` prompts of `--seq` tokens into an empty cache, the last token's logits
  (ours: `InferenceSession.prefill`; transformers: `model(ids, use_cache=True, logits_to_keep=1)`);
- decode: batch 1, `--new-tokens` greedy tokens after a `--prompt-len` prompt, tokens/s of the whole
  `generate` call, through our generator and through transformers' `generate()` both on transformers'
  model and on our export (`AutoModelForCausalLM` on the import folder, our concept cache);
- with `--concept` (Mixtral only), the ConceptMoE converted from the import (encoder 1 / decoder 1
  layers around the concept layers, `convert(..., target_ratio=2)`: more active experts in the concept
  layers, activated FLOPs matched at R 2; FixedStride(2) boundaries) in the train and prefill rows.

Peak memory: one untimed extra run of each arm with a thread sampling the process RSS every 2 ms;
reported as the peak above the RSS before the run (MiB). The load average is recorded before and
after, and per family. Usage:

    python bench/bench_peers.py [--out bench/results/peers.json] [--plot bench/results/peers.png] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cmoe_base  # noqa: E402,F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cmoe_base import Batch  # noqa: E402
from cmoe_vlm.checkpoints.conversion import convert  # noqa: E402
from cmoe_vlm.checkpoints.export import load_pretrained  # noqa: E402
from cmoe_vlm.checkpoints.from_transformers import import_checkpoint  # noqa: E402
from cmoe_vlm.inference.generation import generate  # noqa: E402
from cmoe_vlm.inference.session import InferenceSession  # noqa: E402
from cmoe_vlm.model.boundaries import FixedStride  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
LOGIT_TOL = 1e-4


def hf_model(family: str, a: argparse.Namespace):
    """transformers' own model of `family` at the bench's shape, random weights (seed 0), eval mode."""
    import transformers

    common = dict(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                  num_key_value_heads=a.kv_heads, num_experts_per_tok=a.top_k, max_position_embeddings=8192,
                  tie_word_embeddings=False)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=a.experts, intermediate_size=a.hidden)
    elif family == "qwen2_moe":  # its shared expert (gated) at the experts' width; norm_topk_prob off (its default)
        cfg = transformers.Qwen2MoeConfig(**common, num_experts=a.experts, moe_intermediate_size=a.hidden,
                                          shared_expert_intermediate_size=a.hidden)
    else:
        cfg = transformers.OlmoeConfig(**common, num_experts=a.experts, intermediate_size=a.hidden)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    cls = {"mixtral": transformers.MixtralForCausalLM, "qwen2_moe": transformers.Qwen2MoeForCausalLM,
           "olmoe": transformers.OlmoeForCausalLM}[family]
    return cls(cfg).eval()


def import_family(family: str, a: argparse.Namespace, tmp: Path):
    """(transformers' model, our import's ConceptMoE, transformers' view of our export)."""
    from transformers import AutoModelForCausalLM

    import cmoe_vlm.hf  # noqa: F401  registers model_type cmoe_vlm

    theirs = hf_model(family, a)
    src, dst = tmp / f"{family}_src", tmp / f"{family}_import"
    theirs.save_pretrained(src)
    import_checkpoint(src, dst)
    vlm, _ = load_pretrained(dst)
    exported = AutoModelForCausalLM.from_pretrained(dst).eval()
    exported.generation_config.eos_token_id = None
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    return theirs, vlm, exported


@torch.no_grad()
def logits_diff(theirs, ours, ids: torch.Tensor, boundaries=None) -> float:
    """Max |logit difference| between transformers' model and ours on `ids` (B, T), fp32."""
    want = theirs(ids).logits
    got = ours(Batch.of(ids), boundaries=boundaries).logits
    return (want - got).abs().max().item()


def interleaved(arms: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                ) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds per call of each arm, alternating arms (order reversed every other
    repetition). CPU time (both threads' work, system time included) is less swayed by other jobs
    than wall time on a shared machine."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in arms}
    names = list(arms)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            arms[name]()
            times[name]["cpu"].append(time.process_time() - c0)
            times[name]["wall"].append(time.perf_counter() - t0)
    return times


def peak_rss_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory above the level before `fn()` (MiB), sampled every 2 ms by a thread."""
    proc, stop, peak = psutil.Process(), threading.Event(), [0]
    base = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(peak[0] - base, 0) / 2 ** 20


def train_step(model, hf: bool, ids: torch.Tensor, bf16: bool, boundaries=None) -> Callable[[], float]:
    """A closure running one training step (fwd + CE + bwd + AdamW) of `model` on ids (B, T)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = Batch.of(ids)
    labels = ids[:, 1:].reshape(-1)

    def step() -> float:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits if hf else model(batch, boundaries=boundaries).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def prefill(model, hf: bool, ids: torch.Tensor, bf16: bool, boundaries=None) -> Callable[[], torch.Tensor]:
    """A closure prefilling ids (B, T) into an empty cache; returns the last token's logits (B, V)."""
    batch = Batch.of(ids)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if hf:
                return model(ids, use_cache=True, logits_to_keep=1).logits[:, -1]
            return InferenceSession(model, boundaries=boundaries).prefill(batch)
    return run


def decoders(theirs, ours, exported, prompt: torch.Tensor, new: int, bf16: bool) -> dict[str, Callable[[], list]]:
    """Closures generating `new` greedy tokens after prompt (1, P): ours, transformers' generate on
    their model and on our export. Each returns the new tokens."""
    def ours_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return generate(ours, Batch.of(prompt), new)[0]

    def hf_fn(m):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return m.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, prompt.shape[1]:].tolist()
        return run
    return {"ours": ours_fn, "transformers": hf_fn(theirs), "transformers_on_ours": hf_fn(exported)}


def summarise(times: dict[str, dict[str, list[float]]], work: float) -> dict[str, dict]:
    """Median wall seconds, work/s (work = tokens per call) and median CPU seconds per arm."""
    return {k: {"median_s": statistics.median(v["wall"]), "per_s": work / statistics.median(v["wall"]),
                "median_cpu_s": statistics.median(v["cpu"]), "times_s": v["wall"], "cpu_s": v["cpu"]}
            for k, v in times.items()}


def bench_family(family: str, a: argparse.Namespace, tmp: Path) -> dict:
    theirs, vlm, exported = import_family(family, a, tmp)
    ours = vlm.lm
    gen = torch.Generator().manual_seed(1)
    check_ids = torch.randint(0, a.vocab, (2, 64), generator=gen)
    diffs = {"import": logits_diff(theirs, ours, check_ids)}
    concept = None
    if a.concept and family == "mixtral":
        converted, _ = convert(vlm, 1, 1, target_ratio=2.0)
        concept = converted.lm  # more active experts in its concept layers: not the import's logits at R = 1
    for k, d in diffs.items():
        print(f"{family}: logits max |diff| ({k}) {d:.2e}", flush=True)
        if d > LOGIT_TOL:
            raise SystemExit(f"{family}: {k} logits differ from transformers' by {d:.2e} > {LOGIT_TOL}: not timing")
    row: dict = {"family": family, "logits_max_diff": diffs, "load_before": os.getloadavg()}
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)
    prompt = torch.randint(0, a.vocab, (1, a.prompt_len), generator=gen)
    stride = FixedStride(2)
    for dtype in a.dtypes:
        bf16 = dtype == "bf16"
        res: dict = {}
        arms = {"ours": train_step(ours, False, ids, bf16), "transformers": train_step(theirs, True, ids, bf16)}
        if concept is not None:
            arms["concept_r2"] = train_step(concept, False, ids, bf16, stride)
        res["train"] = summarise(interleaved(arms, a.reps), a.batch * a.seq)
        res["train_peak_mib"] = {k: peak_rss_mib(fn) for k, fn in arms.items()}
        arms = {"ours": prefill(ours, False, ids, bf16), "transformers": prefill(theirs, True, ids, bf16)}
        if concept is not None:
            arms["concept_r2"] = prefill(concept, False, ids, bf16, stride)
        res["prefill"] = summarise(interleaved(arms, a.reps), a.batch * a.seq)
        res["prefill_peak_mib"] = {k: peak_rss_mib(fn) for k, fn in arms.items()}
        arms = decoders(theirs, ours, exported, prompt, a.new_tokens, bf16)
        outs = {k: fn() for k, fn in arms.items()}
        res["decode_same_tokens"] = len({tuple(v) for v in outs.values()}) == 1
        res["decode"] = summarise(interleaved(arms, a.reps, warmup=0), a.new_tokens)
        for phase in ("train", "prefill", "decode"):
            base = res[phase]["transformers"]["median_s"]
            res[f"{phase}_speedup"] = {k: base / v["median_s"] for k, v in res[phase].items() if k != "transformers"}
            base_cpu = res[phase]["transformers"]["median_cpu_s"]
            res[f"{phase}_cpu_speedup"] = {k: base_cpu / v["median_cpu_s"] for k, v in res[phase].items()
                                           if k != "transformers"}
            print(f"{family} {dtype} {phase}: " + ", ".join(
                f"{k} {v['per_s']:.0f} tok/s" for k, v in res[phase].items())
                + " | vs transformers: " + ", ".join(f"{k} {s:.2f}x" for k, s in res[f"{phase}_speedup"].items())
                + " (CPU time: " + ", ".join(f"{k} {s:.2f}x" for k, s in res[f"{phase}_cpu_speedup"].items()) + ")"
                + f" load {os.getloadavg()[0]:.1f}",
                flush=True)
        row[dtype] = res
    row["load_after"] = os.getloadavg()
    return row


def table(result: dict) -> str:
    """The README's markdown table: speed vs transformers per family, dtype and phase, wall (CPU time)."""
    rows = ["| family | dtype | train: ours | train: ConceptMoE R 2 | prefill: ours | decode: ours | decode: "
            "transformers generate() on our export | load |", "|---|---|---|---|---|---|---|---|"]
    for fam in result["families"]:
        for dt in result["args"]["dtypes"]:
            r = fam[dt]

            def cell(phase: str, arm: str) -> str:
                if arm not in r[f"{phase}_speedup"]:
                    return "–"
                return f"{r[f'{phase}_speedup'][arm]:.2f}× ({r[f'{phase}_cpu_speedup'][arm]:.2f}×)"
            rows.append(f"| {fam['family']} | {dt} | {cell('train', 'ours')} | {cell('train', 'concept_r2')} | "
                        f"{cell('prefill', 'ours')} | {cell('decode', 'ours')} | {cell('decode', 'transformers_on_ours')} "
                        f"| {fam['load_before'][0]:.1f}–{fam['load_after'][0]:.1f} |")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r['family']}\n{dt}", ph, arm, s) for r in result["families"] for dt in result["args"]["dtypes"]
            for ph in ("train", "prefill", "decode") for arm, s in r[dt][f"{ph}_speedup"].items()]
    groups = sorted({b[0] for b in bars}, key=[b[0] for b in bars].index)
    series = sorted({(b[1], b[2]) for b in bars})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(series)
    for j, (ph, arm) in enumerate(series):
        xs = [i + j * width for i, g in enumerate(groups)]
        ys = [next((b[3] for b in bars if b[0] == g and b[1] == ph and b[2] == arm), 0) for g in groups]
        ax.bar(xs, ys, width, label=f"{ph}: {arm}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("speed vs transformers (x)")
    la = result["load_before"]
    ax.set_title(f"vs transformers, same weights ({result['machine']}, load {la[0]:.1f})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512, help="one expert's SwiGLU width")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per row for train and prefill")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-concept", dest="concept", action="store_false", help="skip the converted ConceptMoE")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run, not a result")
    ap.add_argument("--out", default="bench/results/peers.json")
    ap.add_argument("--plot", default=None, help="PNG to write (default: next to --out)")
    a = ap.parse_args(argv)
    if a.quick:
        a.dim, a.hidden, a.layers, a.heads, a.kv_heads, a.vocab = 32, 32, 3, 4, 2, 256
        a.seq, a.prompt_len, a.new_tokens, a.reps = 32, 8, 3, 1
    a.dtypes = a.dtypes.split(",")
    torch.set_num_threads(a.threads)
    result = {"args": vars(a), "machine": f"{platform.machine()} CPU, {a.threads} threads of {os.cpu_count()} cores",
              "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "load_before": os.getloadavg(), "families": []}
    import transformers

    result["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            result["families"].append(bench_family(family, a, Path(tmp)))
    result["load_after"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, Path(a.plot) if a.plot else out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

"""transformers `generate()` vs our own `cmoe_vlm.inference.generation.generate`, same model, same prompts.

Both decode through our concept-level cache (transformers through `ConceptCache`,
cmoe_vlm/hf/generation.py); the difference is transformers' loop around it (input preparation,
logits processors, stopping criteria, concatenating ids every step). Greedy, no stop token (every row
runs `--new-tokens` steps), prompts of `--prompt-len` text tokens; batch 1 and batch 8. Checks that
both produce the same tokens, then times them interleaved (`--reps` repetitions, medians) and records
the load average before and after.

Model: configs/tiny.yaml's (random weights; decode cost does not depend on them, only the boundary
rate does, which a random chunker puts near p = 0.5). Set `--config` for another.

    python bench/bench_hf_generate.py [--out bench/results/hf_generate.json]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_core.py

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch

from cmoe_vlm.checkpoints.export import save_pretrained
from cmoe_vlm.inference.generation import generate
from cmoe_vlm.training.config import load_experiment
from cmoe_vlm.model.vlm import ConceptMoEVLM
from data_pipelines.sequence import TokenSequence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml", help="experiment YAML whose model is timed")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per setting (medians reported)")
    ap.add_argument("--out", default="bench/results/hf_generate.json", help="JSON file to write")
    args = ap.parse_args()

    import cmoe_vlm.hf  # noqa: F401  registers the Auto classes
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = ConceptMoEVLM(load_experiment(args.config).vlm).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp).eval()
    hf.generation_config.eos_token_id = None  # no stop token: every row runs --new-tokens steps
    gen = torch.Generator().manual_seed(1)
    load_before = os.getloadavg()
    results = []
    for B in map(int, args.batch_sizes.split(",")):
        ids = torch.randint(0, 256, (B, args.prompt_len), generator=gen)
        prompts = [TokenSequence(input_ids=row.tolist(), modality=[0] * args.prompt_len) for row in ids]
        ours = lambda: generate(model, prompts, args.new_tokens)  # noqa: E731
        theirs = lambda: hf.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)  # noqa: E731
        same = theirs()[:, args.prompt_len:].tolist() == ours()
        times = {"ours": [], "transformers": []}
        for rep in range(args.reps):
            for name in (("ours", "transformers") if rep % 2 == 0 else ("transformers", "ours")):
                t0 = time.perf_counter()
                (ours if name == "ours" else theirs)()
                times[name].append(time.perf_counter() - t0)
        tps = {k: B * args.new_tokens / statistics.median(v) for k, v in times.items()}
        results.append({"batch": B, "same_tokens": same, "tokens_per_s": tps,
                        "transformers_vs_ours": tps["transformers"] / tps["ours"]})
        print(f"batch {B}: ours {tps['ours']:.0f} tok/s, transformers {tps['transformers']:.0f} tok/s "
              f"({tps['transformers'] / tps['ours']:.2f}x), same tokens: {same}")
    out = {"config": args.config, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "load_before": load_before, "load_after": os.getloadavg(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

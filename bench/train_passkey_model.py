"""Train a small model to retrieve pass keys, and save it (issue 7: "passkey at short length is
solved by a model trained on built-in long documents"). `tests/assets/passkey_model` was made with
the first command below; `tests/cmoe_vlm/eval/test_long_context.py` checks it on unseen keys.

Documents are passkey documents in the built-in format (`cmoe_vlm.eval.long_context.make_probe`,
the format `data_pipelines.builtin` writes: "There is a pass key hidden in this text. ..." with
"The pass key is 48213. Remember it. 48213 is the pass key." at a random depth and "What is the
pass key? The pass key is" → " 48213" at the end), 150-224 tokens, with `--questions − 1` more
question/answer pairs inserted at random sentence ends after the needle. The loss is on the
answers only. The model: `configs/tiny.yaml` at dim 64, 1 encoder / 1 concept / 2 decoder layers,
target R 1.5 (`SMALL`); AdamW, warm-up, cosine decay, clipping at 1.0, as `train_vlm.py` does.

What was measured (2-core CPU, one thread per run; accuracy over lengths 160/224 × depths 0/0.5/1,
4 samples each; figures in the issue notes):
- answer-only, 1 question, 6000 steps (~23 min): 0.25 at 1000-2000 steps (the needle right before
  the question only), 0.75 at 3000, 0.83 at 4000, 0.92 at 6000;
- 4 questions per document: 0.67 at 2000 steps, 0.75 at 4000 and 5000 (0.39 s/step, not 0.23);
- `--needle-copy` (also supervise "Remember it. 48213"): stuck at 0.33 for 4000 steps. That copy sits
  at a fixed offset from the first mention, and so does the answer when the needle ends the
  haystack: the model learns to copy by position, solves depth 1 and nothing else;
- full LM loss on these documents: nothing retrieved after 1,600 steps (the filler is one fixed
  sentence cycle, learnt without looking back).

Why it is slow at all: the question's context "The pass key is" has to be told apart from "The sky
is" of the filler, a match over several byte tokens, not the one-token induction a copy task needs.

    python bench/train_passkey_model.py --out tests/assets/passkey_model --bf16     # ~23 min on one core
    python bench/train_passkey_model.py --out runs/passkey_base model.chunk.enabled=false

Writes the model (`save_pretrained`, loadable by `ModelRunner.load` and `python -m cmoe_vlm.eval`)
with the recipe and the learning curve in its config.json under "passkey_training".
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import cmoe_base  # noqa: F401  first: its runtime defaults (OMP_WAIT_POLICY) must precede torch
import torch

from cmoe_base import Batch
from cmoe_vlm.eval import long_context as lc
from cmoe_vlm.checkpoints.export import save_pretrained
from cmoe_vlm.inference.runner import ModelRunner
from cmoe_vlm.training.config import load_experiment
from cmoe_vlm.model.vlm import ConceptMoEVLM
from cmoe_vlm.objective import Objective, RatioController
from data_pipelines.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.dim=64", "model.moe.expert_hidden=128", "model.encoder_layers=1", "model.concept_layers=1",
         "model.decoder_layers=2", "model.chunk.target_ratio=1.5", "vision.depth=1"]
QUESTION = "What is the pass key? The pass key is"
EVAL_LENGTHS, EVAL_DEPTHS = [160, 224], (0.0, 0.5, 1.0)


def passkey_row(rng: random.Random, tok: ByteTokenizer, length: int, questions: int,
                needle_copy: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of one document (bos first) and, per token, whether it is a supervised key copy."""
    item = lc.make_probe("passkey", length, rng.random(), rng, tok)
    key = item.key
    remember = f"Remember it. {key} is the pass key. "
    cut = item.prompt.index(remember) + len("Remember it.")
    head, rest = item.prompt[:cut], item.prompt[cut + len(f" {key}"):]  # rest: " is the pass key. " ... question
    body = rest[:-len(QUESTION)]
    pieces = [(head, False), (f" {key}", needle_copy)]
    ends = [i + 1 for i, ch in enumerate(body) if ch == "." and i + 1 < len(body)]
    last = 0
    for at in sorted(rng.sample(ends, min(questions - 1, len(ends)))):
        pieces += [(body[last:at] + " " + QUESTION, False), (f" {key}", True), (".", False)]
        last = at
    pieces += [(body[last:] + QUESTION, False), (f" {key}", True)]
    ids, supervised = [tok.bos_id], [False]
    for text, sup in pieces:
        piece = tok.encode(text)
        ids += piece
        supervised += [sup] * len(piece)
    return ids, supervised


def batch(rng: random.Random, tok: ByteTokenizer, n: int, questions: int, lengths: tuple[int, int],
          needle_copy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, doc_ids) (n, T): labels −100 except at the supervised key copies; −1 doc = padding."""
    rows = [passkey_row(rng, tok, rng.randint(*lengths), questions, needle_copy) for _ in range(n)]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(n, T, dtype=torch.long)
    labels = torch.full((n, T), -100)
    doc = torch.full((n, T), -1)
    for i, (r, sup) in enumerate(rows):
        ids[i, :len(r)], doc[i, :len(r)] = torch.tensor(r), 0
        target = torch.tensor(r[1:])
        keep = torch.tensor(sup[1:])
        labels[i, :len(r) - 1] = torch.where(keep, target, -100)
    return ids, labels, doc


def evaluate(vlm: ConceptMoEVLM, tok: ByteTokenizer, samples: int = 4) -> dict:
    res = lc.run_probes(ModelRunner(vlm, tok, batch_size=8), probes=("passkey",), lengths=EVAL_LENGTHS,
                        depths=EVAL_DEPTHS, samples=samples)
    summary = res["summary"]["passkey"]
    return {"accuracy": summary["accuracy"], "token_accuracy": summary["token_accuracy"],
            "by_length": {n: sum(c["accuracy"] for c in res["cells"] if c["length"] == n) / len(EVAL_DEPTHS)
                          for n in EVAL_LENGTHS},
            "by_depth": {d: sum(c["accuracy"] for c in res["cells"] if c["depth"] == d) / len(EVAL_LENGTHS)
                         for d in EVAL_DEPTHS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the model (save_pretrained)")
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--questions", type=int, default=1, help="question/answer pairs per document")
    ap.add_argument("--needle-copy", action="store_true",
                    help="also supervise the needle's second mention of the key (a copy at a fixed offset)")
    ap.add_argument("--min-len", type=int, default=150)
    ap.add_argument("--max-len", type=int, default=224)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny matmuls: 1 is as fast as 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="store the weights in bf16 (half the file; loads into fp32)")
    ap.add_argument("overrides", nargs="*", help="config overrides after the small model's, e.g. model.chunk.enabled=false")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    exp = load_experiment(args.config, SMALL + args.overrides)
    tok = ByteTokenizer()
    torch.manual_seed(args.seed)
    vlm = ConceptMoEVLM(exp.vlm)
    lm = vlm.lm
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.0)
    controller = RatioController.of(exp.model)
    objective = Objective(exp.model, controller)
    curve = [{"step": 0, **evaluate(vlm, tok)}]
    print(f"step 0: passkey accuracy {curve[-1]['accuracy']:.3f}", flush=True)
    lm.train()
    t0, window = time.time(), []
    for step in range(args.steps):  # warm-up, cosine decay and clipping, as train_vlm.py does
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        ids, labels, doc = batch(rng, tok, args.batch_size, args.questions, (args.min_len, args.max_len),
                                 args.needle_copy)
        step_batch = Batch.of(ids, doc_ids=doc, labels=labels)
        out = lm(step_batch)
        losses = objective(out, step_batch)
        if controller is not None:
            controller.update(out.own_boundaries, step_batch)
        opt.zero_grad()
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        window.append((losses.lm.item(), float(out.compression["all"].tokens), float(out.compression["all"].concepts)))
        if (step + 1) % 100 == 0:
            loss = sum(w[0] for w in window) / len(window)
            ratio = sum(w[1] for w in window) / max(sum(w[2] for w in window), 1.0)
            print(f"step {step + 1}: loss on the supervised keys {loss:.3f}, R {ratio:.2f}, {time.time() - t0:.0f} s", flush=True)
            window = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "seconds": round(time.time() - t0), **evaluate(vlm, tok)})
            lm.train()
            print(f"step {step + 1}: passkey accuracy {curve[-1]['accuracy']:.3f} "
                  f"(answer tokens {curve[-1]['token_accuracy']:.3f}; by depth {curve[-1]['by_depth']})", flush=True)
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "bf16")}
    config = Path(args.config).resolve()
    recipe["config"] = str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else args.config
    state = {k: v.to(torch.bfloat16) if args.bf16 and v.is_floating_point() else v
             for k, v in vlm.state_dict().items()}
    path = save_pretrained(vlm.eval(), args.out, state=state, extra={"passkey_training": {
        "recipe": recipe, "config_overrides": SMALL + args.overrides, "curve": curve,
        "stored_as": "bf16 (trained in fp32)" if args.bf16 else "fp32"}})
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

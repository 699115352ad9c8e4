"""Long-context probes: exact lengths and depths, scoring checked against an oracle whose answers
are known (an induction model that copies what followed the last occurrence of the current
context), agreement of forced scoring with greedy generation, and the report files."""
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmoe_base import Batch
from cmoe_vlm.eval import long_context as lc
from cmoe_vlm.checkpoints.export import save_pretrained
from cmoe_vlm.inference.runner import ModelRunner
from cmoe_vlm.training.config import load_experiment
from cmoe_vlm.model.vlm import ConceptMoEVLM
from data_pipelines.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def small_runner(tmp_path_factory):
    exp = load_experiment(Path(__file__).resolve().parents[3] / "configs/tiny.yaml", ["model.dim=32", "model.moe.expert_hidden=32", "model.max_seq_len=1024",
                                                "model.encoder_layers=1", "model.concept_layers=1",
                                                "model.decoder_layers=1", "vision.depth=1"])
    torch.manual_seed(0)
    path = save_pretrained(ConceptMoEVLM(exp.vlm), tmp_path_factory.mktemp("m") / "final")
    return ModelRunner.load(path)


def induction_logits(ids: torch.Tensor, vocab: int, n: int = 8, wrong: bool = False) -> torch.Tensor:
    """(B, T) -> (B, T, V): at t, the token that followed the latest earlier match of ids[t-n+1..t]
    (wrong=True: that token + 1, so every copy is off by one)."""
    B, T = ids.shape
    out = torch.zeros(B, T, vocab)
    for b in range(B):
        seq = ids[b].tolist()
        for t in range(n - 1, T):
            key = seq[t - n + 1:t + 1]
            for j in range(t - 1, n - 2, -1):
                if seq[j - n + 1:j + 1] == key:
                    out[b, t, (seq[j + 1] + wrong) % vocab] = 10.0
                    break
    return out


def with_oracle(runner, monkeypatch, wrong=False):
    def fake(seqs):
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s.input_ids)
        return induction_logits(ids, runner.tok.vocab_size, wrong=wrong)
    monkeypatch.setattr(runner, "logits", fake)


@pytest.mark.parametrize("probe", lc.PROBES)
def test_probe_has_the_requested_length_and_depth(probe):
    tok = ByteTokenizer()
    for length in (200, 1024):
        positions = []
        for depth in (0.0, 0.5, 1.0):
            item = lc.make_probe(probe, length, depth, random.Random(0), tok)
            assert 1 + len(tok.encode(item.prompt + item.answer)) == length
            assert item.prompt.count(item.key) >= 1 and item.answer == f" {item.key}"
            positions.append(item.prompt.index(item.key) / len(item.prompt))
        if length >= 1024:  # short probes are mostly needle and question
            assert positions[0] < 0.1 and 0.4 < positions[1] < 0.6 and positions[2] > 0.85, positions
    with pytest.raises(ValueError, match="needs"):
        lc.make_probe(probe, 20, 0.5, random.Random(0), tok)


def test_oracle_solves_every_cell_and_a_wrong_oracle_none(small_runner, monkeypatch, tmp_path):
    with_oracle(small_runner, monkeypatch)
    res = lc.run_probes(small_runner, lengths=[256, 1024], depths=(0.0, 0.5, 1.0), samples=2)
    assert all(c["accuracy"] == 1.0 and c["token_accuracy"] == 1.0 for c in res["cells"]), res["cells"]
    with_oracle(small_runner, monkeypatch, wrong=True)
    res_wrong = lc.run_probes(small_runner, lengths=[256], depths=(0.0, 1.0), samples=2)
    assert all(c["accuracy"] == 0.0 for c in res_wrong["cells"])
    paths = lc.write_report(res, tmp_path, label="oracle")
    assert json.loads(open(paths["json"]).read())["summary"]["passkey"]["accuracy"] == 1.0
    for p in lc.PROBES:
        with Image.open(paths[f"heatmap_{p}"]) as im:
            assert im.size[0] >= 720 and im.size[1] >= 540  # readable when embedded
    assert "| 1024 | 1.00 | 1.00 | 1.00 | 1.00 |" in open(paths["markdown"]).read()


def test_lengths_default_and_limit(small_runner):
    assert lc.default_lengths(4096) == [1024, 2048, 4096]
    assert lc.default_lengths(3000) == [1024, 2048, 3000]
    with pytest.raises(ValueError, match="max_seq_len"):
        lc.run_probes(small_runner, lengths=[2048])


def test_trained_model_passkey_agrees_with_greedy_generation(runner):
    """The trained tiny model on short passkeys (the format of its long training documents).
    Forced scoring must agree with greedy decoding through the KV cache on every sample."""
    res = lc.run_probes(runner, probes=("passkey",), lengths=[192, 256], depths=(0.0, 0.5, 1.0), samples=2,
                        greedy_check=2)
    assert all(c["greedy_disagreements"] == 0 for c in res["cells"]), res["cells"]
    print(f"trained tiny model, passkey accuracy {res['summary']['passkey']['accuracy']:.2f}, "
          f"answer-token accuracy {res['summary']['passkey']['token_accuracy']:.2f}")


def test_briefly_trained_conceptmoe_copies_from_context():
    """Content-based retrieval from earlier context is learnable through the concept bottleneck: a
    small ConceptMoE (target R 1.5) trained 500 steps on "<12-24 random digits>|<the same digits>"
    (loss on the copy; the varying length rules out copying from a fixed offset) copies unseen
    strings by greedy decoding through its KV caches; untrained, it does not. (The passkey probe
    needs a longer match: its question ends in "key is", and "is" also precedes other text in the
    prompt; that takes thousands of steps, so its model is trained offline and shipped, see
    test_shipped_passkey_model_retrieves_unseen_keys.)"""
    from cmoe_vlm.inference.generation import generate
    from cmoe_vlm.model.conceptmoe import ConceptMoE
    from cmoe_vlm.objective import Objective
    from data_pipelines.sequence import build_sequence

    exp = load_experiment(Path(__file__).resolve().parents[3] / "configs/tiny.yaml", [
        "model.dim=64", "model.moe.expert_hidden=128", "model.encoder_layers=1", "model.concept_layers=1",
        "model.decoder_layers=2", "model.chunk.target_ratio=1.5"])
    tok = ByteTokenizer()
    rng = random.Random(0)

    def digits() -> str:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(12, 24)))

    def copy_rate(model: ConceptMoE) -> float:
        strings = [digits() for _ in range(8)]
        prompts = [build_sequence([s + "|"], tok, 16, add_eos=False) for s in strings]
        outs = generate(model.eval(), prompts, 24)
        return sum(a == b for s, o in zip(strings, outs) for a, b in zip(s, tok.decode(o))) / sum(map(len, strings))

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [[tok.bos_id] + tok.encode(s + "|" + s) for s in (digits() for _ in range(n))]
        T = max(map(len, rows))
        ids = torch.zeros(n, T, dtype=torch.long)
        labels = torch.full((n, T), -100)
        doc = torch.full((n, T), -1)
        for i, r in enumerate(rows):
            ids[i, :len(r)], doc[i, :len(r)] = torch.tensor(r), 0
            half = len(r) // 2  # the "|": from here on each next token is a copy
            labels[i, half:len(r) - 1] = ids[i, half + 1:len(r)]
        return ids, labels, doc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two on a shared 2-core machine
    try:
        torch.manual_seed(0)
        model = ConceptMoE(exp.model)
        before = copy_rate(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        steps, tokens, concepts = 500, 0.0, 0.0
        for step in range(steps):  # warm-up, cosine decay and clipping, as train_vlm.py does
            for g in opt.param_groups:
                g["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
            ids, labels, doc = batch(32)
            step_batch = Batch.of(ids, doc_ids=doc, labels=labels)
            out = model(step_batch)
            opt.zero_grad()
            Objective(model.cfg)(out, step_batch).total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step >= steps - 20:  # compression pooled over the last 20 steps
                tokens += float(out.compression["all"].tokens)
                concepts += float(out.compression["all"].concepts)
        ratio = tokens / concepts
        after = copy_rate(model)
    finally:
        torch.set_num_threads(threads)
    print(f"copy accuracy untrained {before:.2f}, after {steps} steps {after:.2f} (training R {ratio:.2f})")
    assert before < 0.3
    assert after > 0.9
    assert ratio > 1.2  # it compresses while it copies


PASSKEY_MODEL = Path(__file__).resolve().parents[2] / "assets" / "passkey_model"
# measured: 0.89 overall, 0.75 / 0.92 / 1.00 at depths 0 / 0.5 / 1 (36 probes; deterministic on one
# machine, the margin is for other CPUs' rounding)
PASSKEY_MIN_ACCURACY, PASSKEY_MIN_DEPTH_ACCURACY = 0.8, 0.5


def test_shipped_passkey_model_retrieves_unseen_keys():
    """tests/assets/passkey_model is the small ConceptMoE (target R 1.5) that
    bench/train_passkey_model.py trains on passkey documents in the built-in format (its config.json
    holds the recipe and the learning curve). On keys drawn from another seed than its training and
    evaluation, at short lengths and at the start, middle and end of the haystack, it answers with
    the pass key, through the chunked model (it compresses the probes), and greedy decoding through
    the KV caches agrees with forced scoring; the same architecture untrained answers none."""
    runner = ModelRunner.load(PASSKEY_MODEL)
    assert json.loads((PASSKEY_MODEL / "config.json").read_text())["passkey_training"]["curve"]
    lengths, depths = [160, 192, 224], (0.0, 0.5, 1.0)
    kwargs = dict(probes=("passkey",), lengths=lengths, depths=depths, samples=4, seed=1234)
    res = lc.run_probes(runner, greedy_check=2, **kwargs)
    summary = res["summary"]["passkey"]
    by_depth = {d: sum(c["accuracy"] for c in res["cells"] if c["depth"] == d) / len(lengths) for d in depths}
    print(f"shipped passkey model: accuracy {summary['accuracy']:.2f} (answer tokens {summary['token_accuracy']:.2f}), "
          f"by depth {by_depth}")
    assert all(c["greedy_disagreements"] == 0 for c in res["cells"]), res["cells"]
    assert summary["accuracy"] >= PASSKEY_MIN_ACCURACY and min(by_depth.values()) >= PASSKEY_MIN_DEPTH_ACCURACY

    item = lc.make_probe("passkey", 224, 0.5, random.Random(0), runner.tok)
    ids = torch.tensor([runner.sequence([item.prompt]).input_ids])
    comp = runner.model.lm(Batch.of(ids)).compression["all"]
    assert float(comp.tokens) / float(comp.concepts) > 1.2

    torch.manual_seed(0)
    untrained = ModelRunner(ConceptMoEVLM(runner.model.cfg).eval(), runner.tok)
    assert lc.run_probes(untrained, **kwargs)["summary"]["passkey"]["accuracy"] == 0.0

"""Local tasks on a tiny trained VLM: multiple choice beats chance and fails on shuffled labels;
VQA, captioning and perplexity run and give sane numbers; the CLI puts checkpoints side by side."""
import json
import random
import shutil

import pytest

from cmoe_vlm.eval import cli
from cmoe_vlm.eval.builtin_suite import parse_scene, write_builtin_suite
from cmoe_vlm.eval.tasks import Task, load_suite, normalize_answer, run_task


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = write_builtin_suite(tmp_path_factory.mktemp("suite"), num_samples=600, max_per_task=100)
    return {t.name: t for t in load_suite(path)}


def test_suite_files(suite):
    assert set(suite) == {"mc_caption", "mc_colour", "mc_count", "vqa", "caption", "text"}
    for t in suite.values():
        recs = t.records()
        assert len(recs) >= 10, t.name
        if t.type == "multiple_choice":
            assert all(0 <= r["answer"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"]) for r in recs)
    assert parse_scene("2 red circles and 1 blue square.") == [(2, "red", "circle"), (1, "blue", "square")]
    assert parse_scene('The word "cat" written in red.') is None


def test_multiple_choice_solves_what_the_model_learned_and_fails_on_wrong_labels(runner, tmp_path):
    """A task the trained tiny model can solve: the next word of the built-in filler text (which every
    long text document repeats). With the labels shuffled across records it must fall to chance."""
    from data_pipelines.builtin import FILLER

    words = (FILLER * 3).split()
    vocab = sorted({w.strip(".") for w in words})
    rng = random.Random(0)
    right, wrong = tmp_path / "multiple_choice_filler.jsonl", tmp_path / "multiple_choice_filler_wrong.jsonl"
    recs = []
    for i in range(len(words) // 3, len(words)):
        answer = words[i].strip(".")
        choices = [answer] + rng.sample([w for w in vocab if w != answer], 3)
        rng.shuffle(choices)
        recs.append({"prompt": "There is a pass key hidden in this text. " + " ".join(words[:i]),
                     "choices": choices, "answer": choices.index(answer)})
    labels = [r["answer"] for r in recs]
    rng.shuffle(labels)
    right.write_text("".join(json.dumps(r) + "\n" for r in recs))
    wrong.write_text("".join(json.dumps(dict(r, answer=a)) + "\n" for r, a in zip(recs, labels)))
    ok = run_task(runner, Task("filler", "multiple_choice", right))
    bad = run_task(runner, Task("filler_shuffled", "multiple_choice", wrong))
    assert ok["n"] == bad["n"] >= 20 and ok["chance"] == 0.25
    assert ok["acc"] >= 0.8, ok
    assert bad["acc"] <= 0.5, bad
    print(f"filler MC: acc {ok['acc']:.2f}, shuffled labels {bad['acc']:.2f} (n={ok['n']}, chance 0.25)")


def test_generation_tasks_and_perplexity(runner, suite):
    vqa = run_task(runner, suite["vqa"], limit=6)
    assert vqa["n"] == 6 and 0 <= vqa["exact_match"] <= 1 and len(vqa["examples"]) == 5
    assert all(isinstance(e["prediction"], str) for e in vqa["examples"])
    cap = run_task(runner, suite["caption"], limit=6)
    assert "metrics_unavailable" in cap or {"bleu4", "cider", "rouge_l"} <= set(cap)
    ppl = run_task(runner, suite["text"], limit=2)
    # bits per byte: the byte model beats a uniform guess over its 262 tokens (8.03 bits)
    assert 0 < ppl["bits_per_byte"] < 6, ppl


def test_normalize_answer():
    assert normalize_answer(" The Red. ") == "red"
    assert normalize_answer("a cat!") == "cat"


def test_bad_task_files_raise(tmp_path):
    path = tmp_path / "multiple_choice_bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "choices": ["a", "b"], "answer": 2}) + "\n")
    (task,) = load_suite(path)
    with pytest.raises(ValueError, match="answer 2"):
        run_task(None, task)
    with pytest.raises(FileNotFoundError):
        load_suite(tmp_path / "nope")
    with pytest.raises(ValueError, match="type"):
        Task("t", "essay", path)


def test_cli_puts_two_checkpoints_side_by_side(trained_model, suite, tmp_path):
    a, b = tmp_path / "modelA", tmp_path / "modelB"
    shutil.copytree(trained_model, a)
    shutil.copytree(trained_model, b)
    out = tmp_path / "out"
    cli.main(["--model", str(a), "--model", str(b), "--suite", str(suite["mc_colour"].data.parent / "suite.yaml"),
              "--out", str(out), "--limit", "2", "--lengths", "200", "--depths", "0", "1", "--samples", "1",
              "--compression-samples", "4"])
    res = json.loads((out / "results.json").read_text())["models"]
    assert set(res) == {"modelA", "modelB"}
    assert res["modelA"]["tasks"]["mc_colour"]["acc"] == res["modelB"]["tasks"]["mc_colour"]["acc"]
    md = (out / "results.md").read_text()
    assert "| | modelA | modelB |" in md and "passkey accuracy @ 200" in md
    assert (out / "modelA" / "long_context" / "heatmap_passkey.png").stat().st_size > 0

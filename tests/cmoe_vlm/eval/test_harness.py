"""Harness adapters: lm-evaluation-harness runs a local multiple-choice task through our model and
agrees with our own scoring; adapters raise on bad requests; lmms-eval helpers."""
import json
import random
from types import SimpleNamespace

import pytest

from cmoe_vlm.eval import harness

lm_eval = pytest.importorskip("lm_eval")


def req(*args):
    return SimpleNamespace(args=args)


def table_items(n=24, seed=0):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randint(2, 12), rng.randint(1, 10)
        wrong = rng.sample([x for x in range(2, 121) if x != a * b], 3)
        choices = [str(a * b)] + [str(x) for x in wrong]
        rng.shuffle(choices)
        items.append({"question": f"Table of {a}:\n{a} times {b} is", "choices": choices,
                      "label": choices.index(str(a * b))})
    return items


def test_lm_eval_runs_a_local_multiple_choice_task(runner, tmp_path):
    from lm_eval.tasks import TaskManager

    items = table_items()
    data = tmp_path / "tables.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    (tmp_path / "tables.yaml").write_text(
        "task: cmoe_tables\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"  # absolute: relative paths resolve from the cwd
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    lm = harness.CMoELMEval(runner)
    out = lm_eval.simple_evaluate(model=lm, tasks=["cmoe_tables"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    acc = out["results"]["cmoe_tables"]["acc,none"]
    # the same decision with our own scoring (lm-eval joins context and choice with a space)
    scores = runner.loglikelihood([[x["question"]] for x in items for _ in x["choices"]],
                                  [" " + c for x in items for c in x["choices"]])
    ours, k = 0, 0
    for x in items:
        s = [scores[k + j].logprob for j in range(len(x["choices"]))]
        ours += s.index(max(s)) == x["label"]
        k += len(x["choices"])
    assert acc == pytest.approx(ours / len(items))
    print(f"lm-eval acc on times tables: {acc:.2f} (chance 0.25)")


def test_lm_eval_adapter_methods(runner):
    lm = harness.CMoELMEval(runner)
    (ll, greedy), = lm.loglikelihood([req("2 times 3 is", " 6")])
    assert ll < 0 and isinstance(greedy, bool)
    text = "Table of 3:\n3 times 1 is 3.\n3 times 2 is 6."
    (rolling,) = lm.loglikelihood_rolling([req(text)])
    nll, n = runner.text_nll(text)
    assert rolling == pytest.approx(-nll, rel=1e-4) and n == len(text)
    (gen,) = lm.generate_until([req("Table of 3:\n3 times 1 is", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(gen, str) and "\n" not in gen and len(gen) <= 8


def test_adapters_raise_instead_of_returning_empty(runner):
    lm = harness.CMoELMEval(runner)
    with pytest.raises(ValueError, match="no tokens"):
        lm.loglikelihood([req("context", "")])
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until([req("x", {"do_sample": True, "temperature": 0.7})])
    with pytest.raises(ValueError, match="max_seq_len"):
        lm.loglikelihood([req("x" * (runner.max_len + 5), " y")])
    with pytest.raises(TypeError, match="unknown model_args"):
        harness.CMoELMEval(runner, foo=1)


def test_lmms_image_placement():
    img = object()
    assert harness._place_images("Question: q Answer:", [img]) == [img, "Question: q Answer:"]
    assert harness._place_images("<image>\nWhat?", [img]) == [img, "\nWhat?"]
    with pytest.raises(ValueError, match="markers"):
        harness._place_images("<image><image>", [img])


def test_lmms_adapter_needs_lmms_eval():
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            harness.lmms_eval_model_class()
    else:
        assert harness.lmms_eval_model_class().__name__ == "CMoELmms"

"""Harness adapters, run through the harnesses' own command lines: lm-eval (`cmoe-lm-eval`) on a local
multiple-choice and a generation task, lmms-eval 0.7.3 (its own environment, .venv-lmms) on local
image multiple-choice and VQA tasks; both agree with our own scoring and generation, sample by
sample. Generation options, batching and errors of the adapters."""
import glob
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cmoe_vlm.eval import harness
from cmoe_vlm.eval.harness import GenerationOptions
from cmoe_vlm.eval.harness_tasks import write_harness_tasks

lm_eval = pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[3]
LMMS_VENV = ROOT / ".venv-lmms"


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
                      "label": choices.index(str(a * b)), "answer": str(a * b)})
    return items


def run_cli(cmd, env_extra=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc, proc.stdout + proc.stderr


def samples(out_dir, task):
    (path,) = glob.glob(str(out_dir / "**" / f"*samples_{task}*.jsonl"), recursive=True)
    return sorted((json.loads(line) for line in Path(path).read_text().splitlines()), key=lambda s: s["doc_id"])


# ----------------------------------------------------------------------------- lm-eval

def test_lm_eval_cli_runs_local_tasks_like_our_scoring(trained_model, runner, tmp_path):
    """`cmoe-lm-eval` (lm-eval's own CLI with our model registered) with lm-eval's default device
    (cuda:0, absent here: falls back to the CPU) on a multiple-choice and a generate_until task."""
    items = table_items()
    data = tmp_path / "tables.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"  # absolute: relative
              "test_split: test\ndoc_to_text: '{{question}}'\n")                     # paths resolve from the cwd
    (tmp_path / "tables.yaml").write_text(
        "task: cmoe_tables\n" + common + "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "tables_gen.yaml").write_text(
        "task: cmoe_tables_gen\n" + common + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    # and a perplexity task from one of our task files, written by cmoe_vlm.eval.harness_tasks
    texts = [f"Table of {a}:\n" + "\n".join(f"{a} times {b} is {a * b}." for b in range(1, 11)) for a in (3, 7)]
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "perplexity_tables.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert write_harness_tasks(tmp_path / "ours" / "perplexity_tables.jsonl", tmp_path, "lm-eval") == \
        ["cmoe_perplexity_tables"]
    out = tmp_path / "out"
    proc, log = run_cli([sys.executable, "-c", "from cmoe_vlm.eval.harness import lm_eval_main; lm_eval_main()",
                         "--model", "cmoe-vlm", "--model_args", f"pretrained={trained_model}",
                         "--tasks", "cmoe_tables,cmoe_tables_gen,cmoe_perplexity_tables",
                         "--include_path", str(tmp_path),
                         "--batch_size", "5", "--output_path", str(out), "--log_samples"])
    assert proc.returncode == 0, log[-4000:]
    assert "CUDA is not available: running on the CPU" in log and "cmoe-vlm generate_until" in log, log[-3000:]
    (res_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(res_file).read_text())["results"]

    # multiple choice: the same decision as our own scoring (lm-eval joins context and choice with a space)
    scores = runner.loglikelihood([[x["question"]] for x in items for _ in x["choices"]],
                                  [" " + c for x in items for c in x["choices"]])
    ours, k = 0, 0
    for x in items:
        s = [scores[k + j].logprob for j in range(len(x["choices"]))]
        ours += s.index(max(s)) == x["label"]
        k += len(x["choices"])
    assert results["cmoe_tables"]["acc,none"] == pytest.approx(ours / len(items))
    # generation: lm-eval's batched, length-sorted requests give what our generator gives one by one
    gen = samples(out, "cmoe_tables_gen")
    assert len(gen) == len(items)
    for s, x in zip(gen, items):
        (expected,) = runner.generate([[x["question"]]], 6, stop=("\n", "."))
        assert s["resps"] == [[expected]], (s, expected)
    # rolling log-likelihood: lm-eval's bits per byte from our adapter's sums
    lls = harness.CMoELMEval(runner).loglikelihood_rolling([req(t) for t in texts])
    bpb = -sum(lls) / math.log(2) / sum(len(t.encode()) for t in texts)
    assert results["cmoe_perplexity_tables"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)
    print(f"lm-eval CLI: acc {results['cmoe_tables']['acc,none']:.2f} (chance 0.25), bits/byte {bpb:.3f}, "
          f"exact match {results['cmoe_tables_gen']['exact_match,none']:.2f}")


def test_lm_eval_registration_keeps_lm_eval_models():
    """Registering into lm-eval's empty registry must not hide its own models (it fills the registry
    only while it is empty)."""
    code = ("import cmoe_vlm.eval.harness; from lm_eval.api.registry import get_model; "
            "print(get_model('cmoe-vlm').__name__, get_model('cmoe_vlm').__name__, get_model('dummy').__name__)")
    proc, log = run_cli([sys.executable, "-c", code])
    assert proc.returncode == 0, log[-2000:]
    assert proc.stdout.split() == ["CMoELMEval", "CMoELMEval", "DummyLM"]


def test_lm_eval_adapter_methods(runner):
    lm = harness.CMoELMEval(runner)
    (ll, greedy), = lm.loglikelihood([req("2 times 3 is", " 6")])
    assert ll < 0 and isinstance(greedy, bool)
    text = "Table of 3:\n3 times 1 is 3.\n3 times 2 is 6."
    (rolling,) = lm.loglikelihood_rolling([req(text)])
    nll, n = runner.text_nll(text)
    assert rolling == pytest.approx(-nll, rel=1e-4) and n == len(text)


def test_generate_until_batched_sampling_and_order(runner):
    """Ragged batches (sorted by length, longer than one batch) return what one-by-one generation
    returns, in request order; sampling is reproducible with a seed and differs from greedy."""
    lm = harness.CMoELMEval(runner, batch_size=3)
    prompts = ["Table of 3:\n3 times 1 is", "The grass", "There is a pass key hidden in this text. The grass is",
               "Table of 12:\n12 times 7 is", "The sky is", "Here we"]
    greedy = {"until": ["\n"], "max_gen_toks": 8}
    out = lm.generate_until([req(p, greedy) for p in prompts])
    assert out == [runner.generate([[p]], 8, stop=("\n",))[0] for p in prompts]
    hot = {"max_gen_toks": 8, "do_sample": True, "temperature": 3.0, "seed": 7}
    a = lm.generate_until([req(p, hot) for p in prompts])
    assert a == lm.generate_until([req(p, hot) for p in prompts])
    assert a != lm.generate_until([req(p, dict(hot, seed=8)) for p in prompts])
    assert a != lm.generate_until([req(p, {"max_gen_toks": 8}) for p in prompts])
    mixed = lm.generate_until([req(p, greedy if i % 2 else hot) for i, p in enumerate(prompts)])
    assert [m for i, m in enumerate(mixed) if i % 2] == [o for i, o in enumerate(out) if i % 2]


def test_generation_options():
    p = GenerationOptions.parse
    assert p({}) == GenerationOptions((), harness.DEFAULT_MAX_GEN_TOKS)
    assert p({"until": "\n\n", "max_new_tokens": 5, "temperature": 0, "do_sample": False, "top_p": None,
              "num_beams": 1}) == GenerationOptions(("\n\n",), 5)
    assert p({"do_sample": False, "temperature": 0.7}).temperature == 0  # as transformers: greedy
    assert p({"do_sample": True}, 4, 11) == GenerationOptions((), 4, 1.0, 1.0, 0, 11)
    assert p({"temperature": 0.5, "top_k": 5, "top_p": 0.9, "seed": 3}) == GenerationOptions((), 256, 0.5, 0.9, 5, 3)
    assert p({"do_sample": "true", "temperature": "0.8"}).temperature == 0.8
    with pytest.raises(ValueError, match=r"num_beams=4.*Supported: until"):
        p({"num_beams": 4})
    with pytest.raises(ValueError, match="repetition_penalty=1.2"):
        p({"repetition_penalty": 1.2})
    with pytest.raises(ValueError, match="guidance"):
        p({"guidance": "x"})
    with pytest.raises(ValueError, match="disagree"):
        p({"max_gen_toks": 4, "max_new_tokens": 5})
    with pytest.raises(ValueError, match="temperature > 0"):
        p({"do_sample": True, "temperature": 0})
    with pytest.raises(ValueError, match="temperature = 'nan': must be a finite number"):
        p({"do_sample": True, "temperature": "nan"})
    with pytest.raises(ValueError, match="seed = 'abc': expected an integer"):
        p({"do_sample": True, "seed": "abc"})
    with pytest.raises(ValueError, match="max_batch_size = -1: must be >= 1"):  # gave perplexity 1, unscored
        harness.resolve_batch_size("8", -1)


def test_harness_tasks_are_written_inside_out_only(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "t.jsonl").write_text(json.dumps({"text": "some text"}) + "\n")
    for name in ("../../pwned", str(tmp_path / "abs"), ".hidden"):
        (suite / "suite.yaml").write_text(f"tasks:\n  - {{name: '{name}', type: perplexity, data: t.jsonl}}\n")
        with pytest.raises(ValueError, match="task name"):
            write_harness_tasks(suite, tmp_path / "out", "lm-eval", prefix="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite"]  # nothing written anywhere


def test_model_args_defaults(runner):
    assert harness.resolve_batch_size("auto") == harness.resolve_batch_size("auto:4") == 8
    assert harness.resolve_batch_size("16", 4) == 4 and harness.resolve_batch_size(3) == 3
    with pytest.raises(ValueError, match="batch_size"):
        harness.resolve_batch_size("many")
    import torch
    if not torch.cuda.is_available():
        assert harness.resolve_device("cuda:0") == "cpu"
    assert harness.resolve_device(None) == "cpu"
    lm = harness.CMoELMEval(runner, batch_size=2)
    assert lm.runner.batch_size == 2 and runner.batch_size == 16 and lm.runner.model is runner.model


def test_adapters_raise_instead_of_returning_empty(runner):
    lm = harness.CMoELMEval(runner)
    with pytest.raises(ValueError, match="no tokens"):
        lm.loglikelihood([req("context", "")])
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([req("x", {"num_beams": 2})])
    with pytest.raises(ValueError, match="max_seq_len"):
        lm.loglikelihood([req("x" * (runner.max_len + 5), " y")])
    with pytest.raises(ValueError, match="unknown model_args"):
        harness.CMoELMEval(runner, foo=1)


# ----------------------------------------------------------------------------- lmms-eval

def test_lmms_image_placement():
    img = object()
    assert harness.place_images("Question: q Answer:", [img]) == [img, "Question: q Answer:"]
    assert harness.place_images("<image>\nWhat?", [img]) == [img, "\nWhat?"]
    with pytest.raises(ValueError, match="markers"):
        harness.place_images("<image><image>", [img])


def test_pyproject_declares_the_harness_entry_points():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["cmoe-lm-eval"] == "cmoe_vlm.eval.harness:lm_eval_main"
    assert project["entry-points"]["lmms_eval.models"]["cmoe_vlm"] == "cmoe_vlm.eval.harness:lmms_models"


def _lmms_python() -> Path:
    python = LMMS_VENV / "bin" / "python"
    if not python.exists():
        reason = (f"lmms-eval environment {LMMS_VENV} is missing: build it with `bash scripts/setup_venv.sh --lmms` "
                  "(make test does)")
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run this test)")
        pytest.skip("NOT TESTED: " + reason)
    return python


def test_lmms_eval_cli_runs_local_image_tasks_like_our_tasks(trained_model, runner, tmp_path):
    """The real lmms-eval 0.7.3 CLI finds our model through the entry point and runs local image
    multiple-choice and VQA tasks (written by cmoe_vlm.eval.harness_tasks from our task files) plus a
    text multiple-choice task the model solves: per sample, the scores it ranks are our losses and
    the answers it scores are our generations. lmms-eval exits 0 even when evaluation crashed, so
    the results files are what is checked."""
    from PIL import Image

    from data_pipelines.builtin import FILLER

    from cmoe_vlm.eval.builtin_suite import write_builtin_suite
    from cmoe_vlm.eval.tasks import load_suite, run_task

    python = _lmms_python()
    suite = write_builtin_suite(tmp_path / "suite", num_samples=80, max_per_task=6)
    words = FILLER.split()  # next word of the filler text, which the trained model has learned
    rng = random.Random(0)
    vocab = sorted({w.strip(".") for w in words})
    with open(suite.parent / "mc_filler.jsonl", "w") as f:
        for i in range(8, 14):
            answer = words[i].strip(".")
            choices = [answer] + rng.sample([w for w in vocab if w != answer], 3)
            rng.shuffle(choices)
            f.write(json.dumps({"question": "There is a pass key hidden in this text. " + " ".join(words[:i]),
                                "options": choices, "answer": answer}) + "\n")
    (suite.parent / "suite.yaml").write_text(
        "tasks:\n- {name: mc_colour, type: multiple_choice, data: mc_colour.jsonl}\n"
        "- {name: mc_filler, type: multiple_choice, data: mc_filler.jsonl}\n"
        "- {name: vqa, type: vqa, data: vqa.jsonl, max_new_tokens: 8}\n")
    tasks_dir, out = tmp_path / "lmms_tasks", tmp_path / "out"
    names = write_harness_tasks(suite.parent, tasks_dir, "lmms-eval")
    assert names == ["cmoe_mc_colour", "cmoe_mc_filler", "cmoe_vqa"]
    proc, log = run_cli([str(python.parent / "lmms-eval"), "--model", "cmoe_vlm", "--model_args",
                         f"pretrained={trained_model}", "--tasks", ",".join(names), "--include_path", str(tasks_dir),
                         "--batch_size", "4", "--output_path", str(out), "--log_samples"], cwd=tmp_path)
    res_files = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert proc.returncode == 0 and len(res_files) == 1, log[-5000:]
    results = json.loads(Path(res_files[0]).read_text())["results"]
    ours = {t.name: run_task(runner, t) for t in load_suite(suite.parent)}

    def pieces(rec):
        return ([Image.open(rec["image"]).convert("RGB")] if rec["image"] else []) + \
            ([rec["prompt"]] if rec["prompt"] else [])

    for name in ("mc_colour", "mc_filler", "vqa"):
        canonical = [json.loads(line) for line in (tasks_dir / f"cmoe_{name}.jsonl").read_text().splitlines()]
        got = samples(out, f"cmoe_{name}")
        assert len(got) == len(canonical) == ours[name]["n"] > 0, name
        if name == "vqa":  # lmms-eval scored our generations
            expected = runner.generate([pieces(r) for r in canonical], 8, stop=("\n",))
            assert [s["resps"] if isinstance(s["resps"], str) else s["resps"][0] for s in got] == expected
            assert results["cmoe_vqa"]["exact_match,none"] == pytest.approx(ours["vqa"]["exact_match"])
            continue
        for s, rec in zip(got, canonical):  # lmms-eval ranked our losses
            expected = runner.loglikelihood([pieces(rec)] * len(rec["choices"]), [" " + c for c in rec["choices"]])
            losses = [float(v) for v, _ in s["filtered_resps"]]
            assert losses == pytest.approx([-e.logprob for e in expected], abs=1e-3), (name, s["doc_id"])
        assert results[f"cmoe_{name}"]["acc,none"] == pytest.approx(ours[name]["acc"]), name
    assert results["cmoe_mc_filler"]["acc,none"] >= 0.8  # the argmin over losses picks the likeliest choice
    print("lmms-eval CLI: " + ", ".join(f"{t} {v.get('acc,none', v.get('exact_match,none')):.2f}"
                                        for t, v in results.items()))

"""Local tasks on a tiny trained VLM: multiple choice beats chance and fails on shuffled labels, from
any of the usual field names; VQA (exact match and the standard VQA accuracy, checked against hand-
computed cases), captioning and perplexity run and give sane numbers; the CLI puts checkpoints side
by side."""
import json
import math
import os
import random
import shutil

import numpy as np
import pytest

from cmoe_vlm.cli.eval import main as eval_main
from cmoe_vlm.eval.builtin_suite import parse_scene, write_builtin_suite
from cmoe_vlm.eval.tasks import (Task, caption_references, load_suite, multiple_choice_fields, normalize_answer,
                                 run_task, vqa_fields)
from cmoe_vlm.eval.vqa_metric import normalize_vqa_answer, vqa_accuracy


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = write_builtin_suite(tmp_path_factory.mktemp("suite"), num_samples=600, max_per_task=100)
    return {t.name: t for t in load_suite(path)}


def test_suite_files(suite):
    assert set(suite) == {"mc_caption", "mc_colour", "mc_count", "mc_position", "vqa", "caption", "text"}
    for t in suite.values():
        recs = t.records()
        assert len(recs) >= 10, t.name
        if t.type == "multiple_choice":
            assert all(0 <= r["answer"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"]) for r in recs)
    assert parse_scene("2 red circles and 1 blue square.") == [(2, "red", "circle"), (1, "blue", "square")]
    assert parse_scene('The word "cat" written in red.') is None


def test_position_answers_are_where_the_image_shows_the_object(suite):
    """Localisation ground truth, read back from the written PNGs: the answer cell holds a drawn
    object in the asked colour (shapes are drawn flat, so its exact RGB)."""
    import numpy as np

    from data_pipelines.builtin import COLOURS

    task = suite["mc_position"]
    recs = task.records()
    assert len(recs) >= 50 and len({r["answer"] for r in recs}) >= 12  # answers spread over the grid
    for r in recs:
        colour = r["prompt"].split("Where is the ")[1].split()[0]
        pixels = np.asarray(task.image(r)).astype(int)
        cells = (pixels == np.array(COLOURS[colour])).all(-1).reshape(4, 16, 4, 16).sum((1, 3)).ravel()
        assert r["choices"][r["answer"]].startswith("row ") and cells[r["answer"]] > 40, (r, cells)


def test_multiple_choice_solves_what_the_model_learned_and_fails_on_wrong_labels(runner, tmp_path):
    """A task the trained tiny model can solve: the next word of the built-in filler text (which every
    long text document repeats). With the labels shuffled across records it must fall to chance.
    The records hold `question`, not `prompt`: read as prompt-less, they would score at chance too."""
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
        recs.append({"question": "There is a pass key hidden in this text. " + " ".join(words[:i]),
                     "choices": choices, "answer": choices.index(answer)})
    labels = [r["answer"] for r in recs]
    rng.shuffle(labels)
    right.write_text("".join(json.dumps(r) + "\n" for r in recs))
    wrong.write_text("".join(json.dumps(dict(r, answer=a)) + "\n" for r, a in zip(recs, labels)))
    ok = run_task(runner, Task("filler", "multiple_choice", right))
    bad = run_task(runner, Task("filler_shuffled", "multiple_choice", wrong))
    assert ok["n"] == bad["n"] >= 20 and ok["chance"] == 0.25
    assert ok["acc"] >= 0.7, ok  # 10% of the documents are long text (docs/design.md §7b)
    assert bad["acc"] <= 0.5, bad
    # log P(answer | choices): near 0 where the model is sure and right, far below chance (−log 4) where
    # it is sure of another choice; a probability over the choices, so never above 0
    assert ok["chance_logprob"] == pytest.approx(-math.log(4)) and ok["answer_logprob"] > -0.5 > ok["chance_logprob"]
    assert bad["answer_logprob"] < ok["chance_logprob"] and max(ok["answer_logprob"], bad["answer_logprob"]) <= 0
    print(f"filler MC: acc {ok['acc']:.2f}, shuffled labels {bad['acc']:.2f} (n={ok['n']}, chance 0.25)")


def test_generation_tasks_and_perplexity(runner, suite):
    vqa = run_task(runner, suite["vqa"], limit=6)
    assert vqa["n"] == 6 and 0 <= vqa["exact_match"] <= 1 and len(vqa["examples"]) == 5
    assert "vqa_accuracy" not in vqa and "single answer" in vqa["vqa_accuracy_unavailable"]  # one answer each
    assert all(isinstance(e["prediction"], str) for e in vqa["examples"])
    cap = run_task(runner, suite["caption"], limit=6)
    assert "metrics_unavailable" in cap or {"bleu4", "cider", "rouge_l"} <= set(cap)
    ppl = run_task(runner, suite["text"], limit=2)
    # bits per byte: the byte model beats a uniform guess over its 262 tokens (8.03 bits)
    assert 0 < ppl["bits_per_byte"] < 6, ppl


def test_normalize_answer():
    assert normalize_answer(" The Red. ") == "red"
    assert normalize_answer("a cat!") == "cat"


def test_multiple_choice_field_names():
    """The field names of common lm-eval / lmms-eval multiple-choice datasets; errors name the record."""
    f = multiple_choice_fields
    ch = ["red", "green", "blue"]
    assert f({"prompt": "p", "choices": ch, "answer": 1}, "r") == ("p", ch, 1)
    assert f({"question": "q", "options": ch, "answer": "blue"}, "r") == ("q", ch, 2)  # ai2d / MMMU-style
    assert f({"query": "q", "choices": ch, "gold": 0}, "r") == ("q", ch, 0)
    assert f({"ctx": "c", "endings": ch, "label": "2"}, "r") == ("c", ch, 2)  # hellaswag: index as a string
    assert f({"question": "q", "choices": {"text": ch, "label": ["A", "B", "C"]}, "answerKey": "B"}, "r") == \
        ("q", ch, 1)  # ARC / OpenBookQA / CommonsenseQA
    assert f({"question": "q", "A": "red", "B": "green", "C": "blue", "D": None, "answer": "C"}, "r") == \
        ("q", ch, 2)  # MMBench columns (D empty)
    assert f({"question": "q", "options": ch, "answer": "A"}, "r") == ("q", ch, 0)  # a letter
    assert f({"question": "q", "options": ["1", "2", "3"], "answer": "2"}, "r") == ("q", ["1", "2", "3"], 1)  # text first
    assert f({"question": "q", "choices": [1, 2], "answer": 0}, "r") == ("q", ["1", "2"], 0)
    both = {"prompt": "p", "question": "q", "choices": ch, "answer": 0}
    with pytest.raises(ValueError, match=r"rec 7: several prompt fields \['prompt', 'question'\]: set prompt_field"):
        f(both, "rec 7")
    assert f(both, "r", {"prompt_field": "question"})[0] == "q"
    assert f({"context": "c", "question": "q", "choices": ch, "answer": 0}, "r",
             {"prompt_field": ["context", "question"]})[0] == "c\nq"
    with pytest.raises(ValueError, match=r"rec 3: no prompt field: expected one of prompt, question, query.*"
                                         r"the record has \['answer', 'choices', 'stem'\]"):
        f({"stem": "q", "choices": ch, "answer": 0}, "rec 3")
    assert f({"stem": "q", "choices": ch, "answer": 0}, "r", {"prompt_field": "stem"})[0] == "q"
    with pytest.raises(ValueError, match="no choices field"):
        f({"question": "q", "answer": 0}, "r")
    with pytest.raises(ValueError, match="no answer field"):
        f({"question": "q", "choices": ch}, "r")
    with pytest.raises(ValueError, match="answer 3 is not an index into its 3 choices"):
        f({"question": "q", "choices": ch, "answer": 3}, "r")
    with pytest.raises(ValueError, match="answer 'purple' is not an index, a choice"):
        f({"question": "q", "choices": ch, "answer": "purple"}, "r")
    with pytest.raises(ValueError, match="at least 2 strings"):
        f({"question": "q", "choices": ["only"], "answer": 0}, "r")


def test_vqa_accuracy_hand_computed():
    """min(1, matches among the other 9 / 3), averaged over the 10 leave-one-out subsets."""
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("2", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("3", ten) == 1.0
    assert vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("Two.", ["2"] * 3 + ["x"] * 7) == pytest.approx(0.9)  # normalised before matching
    assert vqa_accuracy("yes", ["yes"]) == 0.0  # one answer: no other human agrees
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_normalize_vqa_answer():
    """The official VQA normalisation: punctuation, periods, number words, articles, contractions."""
    n = normalize_vqa_answer
    assert n("The Cat, on a mat!") == "cat on mat"  # "," before a space removed; "!" to a space
    assert n("a dog") == "dog" and n("an apple\t") == "apple"
    assert n("Two") == "2" and n("none") == "0" and n("ten dogs") == "10 dogs"
    assert n("dont") == "don't" and n("isnt it") == "isn't it" and n("whats up") == "what's up"
    assert n("3.5") == "3.5" and n("yes.") == "yes" and n("u.s.a") == "usa"  # a period before a digit stays
    assert n("1,000") == "1000"  # comma between digits
    assert n("black/white") == "black white" and n("black / white") == "black white"
    assert n("left-hand") == "left hand" and n("t-shirt ") == "t shirt"


def test_vqa_fields_and_vqa_accuracy_in_the_task(runner, tmp_path):
    """VQA v2-style records (10 answers as dicts) report vqa_accuracy beside exact match; the model's
    own greedy answer given by 3 of 10 humans scores 0.9."""
    assert vqa_fields({"question": "q", "answers": [{"answer": "a", "answer_id": 1}, {"answer": "b"}]}, "r") == \
        ("Question: q Answer:", ["a", "b"])
    assert vqa_fields({"prompt": "Say it:", "answer": "x"}, "r") == ("Say it:", ["x"])
    with pytest.raises(ValueError, match="rec 2: no answers"):
        vqa_fields({"question": "q"}, "rec 2")
    with pytest.raises(ValueError, match="no question"):
        vqa_fields({"answers": ["a"]}, "r")
    questions = ["How many squares?", "What colour is the text?", "What shape is it?"]
    preds = runner.generate([[f"Question: {q} Answer:"] for q in questions], 6, stop=("\n",))
    path = tmp_path / "vqa_ten.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answers": [{"answer": p}] * 3 + [{"answer": "zzz"}] * 7}) + "\n"
                            for q, p in zip(questions, preds)))
    res = run_task(runner, Task("ten", "vqa", path, {"max_new_tokens": 6}))
    assert res["vqa_accuracy"] == pytest.approx(0.9) and res["answers_per_question"] == {"min": 10, "max": 10}
    assert res["exact_match"] == 1.0


def test_bad_task_files_raise(tmp_path):
    path = tmp_path / "multiple_choice_bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "choices": ["a", "b"], "answer": 2}) + "\n")
    (task,) = load_suite(path)
    with pytest.raises(ValueError, match="record 1: answer 2"):
        run_task(None, task)
    path.write_text(json.dumps({"prompt": "x", "choices": ["a", "b"], "answer": 0}) + "\n"
                    + json.dumps({"text": "x", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match=r"multiple_choice_bad.jsonl: record 2: no prompt field"):
        run_task(None, task)  # before anything is scored
    with pytest.raises(FileNotFoundError):
        load_suite(tmp_path / "nope")
    with pytest.raises(ValueError, match="type"):
        Task("t", "essay", path)


SUITE_REFUSALS = {  # suite.yaml -> what the one-line error names
    "outside_data": ("tasks:\n  - {name: t, type: perplexity, data: ../elsewhere/t.jsonl}\n", "outside the suite"),
    "absolute_data": ("tasks:\n  - {name: t, type: perplexity, data: /etc/passwd}\n", "outside the suite"),
    "duplicate_names": ("tasks:\n  - {name: t, type: perplexity, data: t.jsonl}\n"
                        "  - {name: t, type: perplexity, data: t.jsonl}\n", "more than once"),
    "a_list": ("- {name: t, type: perplexity, data: t.jsonl}\n", "a mapping with a non-empty list"),
    "string_limit": ("tasks:\n  - {name: t, type: perplexity, data: t.jsonl, limit: '2'}\n", "limit = '2'"),
    "not_yaml": ("tasks: [\n", "not a readable YAML"),
}


@pytest.mark.parametrize("case", SUITE_REFUSALS)
def test_suites_are_confined_to_their_folder_and_checked_before_running(case, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "t.jsonl").write_text('{"text": "outside"}\n')
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "t.jsonl").write_text('{"text": "inside"}\n')
    text, named = SUITE_REFUSALS[case]
    (suite / "suite.yaml").write_text(text)
    with pytest.raises(ValueError, match=named):
        load_suite(suite)
    if case == "outside_data":  # allowed explicitly (cmoe-eval --allow-outside-paths)
        (task,) = load_suite(suite, allow_outside=True)
        assert task.records() == [{"text": "outside"}]


def test_task_records_limits_images_and_references(tmp_path):
    from PIL import Image

    recs = [{"image": "img.png", "references": "a red circle", "text": "x"}] * 3
    (tmp_path / "caption_t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (task,) = load_suite(tmp_path / "caption_t.jsonl")
    assert len(task.records(1)) == 1 and len(task.records(None)) == 3  # --limit 1 is one record, not two
    # a 16-bit PNG is scaled to 8 bits, not clipped to white (one decoder for every path)
    Image.fromarray(np.full((8, 8), 20000, dtype=np.uint16)).save(tmp_path / "img.png")
    assert Image.open(tmp_path / "img.png").mode.startswith("I")
    assert np.asarray(task.image(recs[0])).mean() == pytest.approx(20000 / 257, abs=1)
    assert caption_references(recs[0], "rec") == ["a red circle"]  # one reference, not one per character
    os.mkfifo(tmp_path / "fifo.png")  # would block the reader forever
    for image, named in (("fifo.png", "not a regular file"), (7, "not a path string"),
                         ("/etc/hostname", "outside the suite")):
        with pytest.raises(ValueError, match=named):
            task.image({"image": image})
    (tmp_path / "caption_t.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match="caption_t.jsonl: not UTF-8"):
        task.records()


def test_cli_puts_two_checkpoints_side_by_side(trained_model, suite, tmp_path):
    a, b = tmp_path / "modelA", tmp_path / "modelB"
    shutil.copytree(trained_model, a)
    shutil.copytree(trained_model, b)
    out = tmp_path / "out"
    eval_main(["--model", str(a), "--model", str(b), "--suite", str(suite["mc_colour"].data.parent / "suite.yaml"),
              "--out", str(out), "--limit", "2", "--lengths", "200", "--depths", "0", "1", "--samples", "1",
              "--compression-samples", "4"])
    res = json.loads((out / "results.json").read_text())["models"]
    assert set(res) == {"modelA", "modelB"}
    assert res["modelA"]["tasks"]["mc_colour"]["acc"] == res["modelB"]["tasks"]["mc_colour"]["acc"]
    md = (out / "results.md").read_text()
    assert "| | modelA | modelB |" in md and "passkey accuracy @ 200" in md
    assert (out / "modelA" / "long_context" / "heatmap_passkey.png").stat().st_size > 0


@pytest.mark.parametrize("kind", ["multiple_choice", "vqa"])
def test_chat_tasks_ask_in_the_layout_of_chat_training_data(tmp_path, kind):
    """Task option `chat` (cmoe-eval --chat): the scored / generated context is the user's turn rendered
    by the tokenizer's template up to the assistant's cue: exactly how a chat training sample with that
    question lays out, and the scored choice is how its answer starts. Without it: the qa layout."""
    from PIL import Image

    from data_pipelines.chat import Chat, Message, render_chat
    from data_pipelines.document import Answer
    from data_pipelines.tokenizer import ByteTokenizer

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    rec = {"image": "red.png", "question": "What colour is it?", "choices": ["red", "blue"], "answer": 0,
           "answers": ["red"]}
    (tmp_path / "t.jsonl").write_text(json.dumps(rec) + "\n")
    seen = {}

    class Recorder:  # a runner that records what it is asked
        tok = ByteTokenizer()

        def loglikelihood(self, contexts, conts):
            seen["ctx"], seen["cont"] = contexts[0], conts[0]
            return [type("S", (), {"logprob": -float(i)})() for i in range(len(conts))]

        def generate(self, prompts, max_new_tokens, stop=()):
            seen["ctx"] = prompts[0]
            return ["red"] * len(prompts)

    for chat in (True, False):
        run_task(Recorder(), Task("t", kind, tmp_path / "t.jsonl", {"chat": chat, "choices_field": "choices"}))
        (image,) = [p for p in seen["ctx"] if isinstance(p, Image.Image)]
        text = [p for p in seen["ctx"] if isinstance(p, str)]
        if not chat:
            assert text == ["Question: What colour is it? Answer:"] if kind == "vqa" else ["What colour is it?"]
            continue
        training = render_chat(Chat([Message("user", [image, "What colour is it?"]), Message("assistant", ["red"])]),
                               Recorder.tok.chat_template)
        n = len(seen["ctx"])
        assert training[:n] == seen["ctx"] and isinstance(training[n], Answer) and text[0] == "User: "
        if kind == "multiple_choice":
            assert training[n].startswith(seen["cont"])

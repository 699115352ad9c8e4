"""easy-VQA (PyPI `easy-vqa`, MIT; written by others) as our shards and evaluation suites, offline.

4,000 train / 1,000 test 64x64 images of one coloured shape on white; 38,575 / 9,673 questions
with 13 answers (yes/no, 8 colours, 3 shapes). `write_easyvqa(root)` writes

    root/train/        qa shards ({key}.png + {key}.json question/answer), our shard writer
    root/test/         the same for the test split (held-out loss)
    root/suite/        cmoe-eval multiple-choice tasks, one per question type (yes_no, colour,
                       shape), every test question scored against all 13 answers
    root/suite_blind/  the same questions with the image removed: the floor a model reaches
                       from the wording alone

The package is a dev/bench extra (`pip install easy-vqa`), never needed by `make demo`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

QUESTION_TYPES = ("yes_no", "colour", "shape")
SHAPES = ("circle", "rectangle", "triangle")


def question_type(answer: str, shapes: set[str]) -> str:
    if answer in ("yes", "no"):
        return "yes_no"
    return "shape" if answer in shapes else "colour"


def _load():
    try:
        import easy_vqa
    except ImportError:
        raise SystemExit("easy-VQA needs the easy-vqa package: pip install easy-vqa (offline from PyPI's mirror)")
    return easy_vqa


def write_easyvqa(root: str | Path, force: bool = False) -> dict[str, Path]:
    """Write shards and suites under `root` (skipped when its manifest says they are complete)."""
    from data_pipelines.shards import write_shards

    root = Path(root)
    done = root / "easyvqa.json"
    paths = {name: root / name for name in ("train", "test", "suite", "suite_blind")}
    if done.is_file() and not force:
        return paths
    ev = _load()
    answers = ev.get_answers()
    shapes = set(SHAPES)
    for split, questions, images in (("train", ev.get_train_questions(), ev.get_train_image_paths()),
                                     ("test", ev.get_test_questions(), ev.get_test_image_paths())):
        qs, ans, ids = questions
        items = ({"png": Path(images[i]).read_bytes(), "json": json.dumps({"question": q, "answer": a}).encode()}
                 for q, a, i in zip(qs, ans, ids))
        if paths[split].exists():
            shutil.rmtree(paths[split])
        write_shards(items, paths[split], maxcount=2000, total=len(qs), desc=f"easy-vqa {split}")
    qs, ans, ids = ev.get_test_questions()
    images = ev.get_test_image_paths()
    for suite, with_image in (("suite", True), ("suite_blind", False)):
        folder = paths[suite]
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "images").mkdir(parents=True)
        records: dict[str, list[dict]] = {t: [] for t in QUESTION_TYPES}
        for q, a, i in zip(qs, ans, ids):
            rec = {"prompt": f"Question: {q} Answer:", "choices": answers, "answer": answers.index(a)}
            if with_image:
                name = f"images/{i}.png"
                if not (folder / name).exists():
                    shutil.copyfile(images[i], folder / name)
                rec = {"image": name, **rec}
            records[question_type(a, shapes)].append(rec)
        for t, recs in records.items():
            (folder / f"{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (folder / "suite.yaml").write_text("tasks:\n" + "".join(
            f"  - {{name: {t}, type: multiple_choice, data: {t}.jsonl}}\n" for t in QUESTION_TYPES))
    done.write_text(json.dumps({"train_questions": len(ev.get_train_questions()[0]), "test_questions": len(qs),
                                "answers": answers}, indent=1))
    return paths


def image_labels(split: str):
    """(PIL images, {"shape": (N,), "colour": (N,)} class indices) of one split ("train" / "test"),
    each image's shape and colour read from its own "what shape/colour" questions."""
    import torch
    from PIL import Image

    ev = _load()
    questions, answers, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    shapes = sorted(SHAPES)
    colours = sorted(a for a in ev.get_answers() if a not in SHAPES and a not in ("yes", "no"))
    labels: dict[str, dict[int, int]] = {"shape": {}, "colour": {}}
    for a, i in zip(answers, ids):
        if a in SHAPES:
            labels["shape"][i] = shapes.index(a)
        elif a in colours:
            labels["colour"][i] = colours.index(a)
    keep = sorted(set(labels["shape"]) & set(labels["colour"]))
    images = [Image.open(paths[i]).convert("RGB") for i in keep]
    return images, {k: torch.tensor([v[i] for i in keep]) for k, v in labels.items()}

"""Every command in README.md runs as written, from a clean copy of the repo, after `make demo`.

The commands are read from the README itself (its ```bash and ```python blocks, in order) and run in
a copy of the tracked files with this environment's `bin/` first on PATH (what `source
.venv/bin/activate` does) and the copy on PYTHONPATH (the editable install points at the original).
Before them, `make demo`'s training line runs (it writes data/builtin/ and runs/tiny/final, which
the README's commands build on), and the files the pretrained section expects a user to bring (a
Mixtral checkpoint, a SigLIP tower, shards: `write_stand_ins`) are written as tiny random stand-ins of
the same formats. To stay within the test budget each command gets short settings
appended (`SHORT`: 2 training steps, 2 records per task, ...), and artefacts are shared: the
baseline the training section trains is the one the evaluation and the conversion use.

A few commands are not run here, each for the reason `NOT_RUN` gives; the test fails when one of
those no longer matches a README command, when a README command matches neither, and when any
command exits non-zero.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (command prefix, settings appended): the first matching prefix wins
SHORT = [
    ("cmoe-train ", "train.steps=2 train.eval_batches=1 data.num_workers=1"),
    ("python train_vlm.py configs/pretrained.yaml ", "train.steps=2 train.eval_batches=1 data.num_workers=1 "
                                                    "data.seq_len=256 data.batch_size=2"),
    ("python train_vlm.py ", "train.steps=2 train.eval_batches=1 data.num_workers=1"),
    ("cmoe-eval ", "--limit 2 --lengths 256 --samples 1 --compression-samples 4"),
    ("python -m cmoe_vlm.eval ", "--limit 2 --lengths 256 --samples 1 --compression-samples 4"),
    ("cmoe-inspect ", "--num-samples 4 --show 1"),
]
# (command prefix, why it is not run here)
NOT_RUN = [
    ("make demo", "the quick start itself: this test starts from its training step (below)"),
    ("make test", "the quick start itself: CI runs it"),
    ("deepspeed --num_gpus 2 ", "a two-process launch costs ~1 min of start-up: tests/training/test_expert_parallel.py "
                                "and test_faults.py launch train_vlm.py so"),
    ("bash scripts/setup_venv.sh --lmms", "builds .venv-lmms (`make test` does); tests/cmoe_vlm/eval/test_harness.py "
                                          "runs lmms-eval from it"),
    (".venv-lmms/bin/lmms-eval ", "needs .venv-lmms: tests/cmoe_vlm/eval/test_harness.py runs this CLI"),
    ("cmoe-lm-eval ", "~50 s of lm-eval start-up, the same run as tests/cmoe_vlm/eval/test_harness.py's lm-eval CLI "
                      "test (cmoe-lm-eval's function on task files written by cmoe_vlm.eval.harness_tasks)"),
    ("python bench/", "a benchmark (minutes to hours)"),
]
# README paths of outputs that only `make demo`'s evaluation line writes (not run here)
DEMO_ONLY = ("runs/tiny/eval/",)


def readme_output_files(text: str) -> list[str]:
    """The output files the README names (`runs/...` with an extension; {a,b} expanded)."""
    out = []
    for path in re.findall(r"`(runs/[^`\s<>*]+\.[a-z]+)`", text):
        m = re.search(r"\{([^}]*)\}", path)
        out += [path[:m.start()] + alt + path[m.end():] for alt in m.group(1).split(",")] if m else [path]
    return out


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(kind, command) in README order: each line of a bash block (continuations joined), each python block."""
    out = []
    for kind, body in re.findall(r"^```(bash|python)\n(.*?)^```", text, flags=re.M | re.S):
        if kind == "python":
            out.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                out.append(("bash", line))
    return out


def demo_training_line() -> str:
    """`make demo`'s first recipe line, as the shell runs it from the venv."""
    recipe = re.search(r"^demo:.*\n\t(.*)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    return recipe.replace("$(PY)", "python").replace("$(ARGS)", SHORT[0][1])


def write_stand_ins(root: Path, tokenizer_folder) -> None:
    """What the README's pretrained section expects a user to have, as tiny random stand-ins of the same
    kind: a transformers Mixtral folder with its tokenizer, a SigLIP vision tower with its image
    processor, and a folder of image-text shards."""
    import torch
    from transformers import (AutoTokenizer, MixtralConfig, MixtralForCausalLM, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    from data_pipelines.builtin import write_builtin_dataset

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    lm = MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=24, num_hidden_layers=10,
                                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2, max_position_embeddings=4096,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    lm.save_pretrained(root / "checkpoints/Mixtral-8x7B-v0.1")
    tok.save_pretrained(root / "checkpoints/Mixtral-8x7B-v0.1")
    tower = root / "checkpoints/siglip-so400m-patch14-384"
    SiglipVisionModel(SiglipVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
                                         image_size=32, patch_size=8)).save_pretrained(tower)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tower)
    write_builtin_dataset(root / "data/mine", num_train=40, num_heldout=4, maxcount=20, text_chars=400)


def plan(commands: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], set[str]]:
    """The commands to run (short settings appended) and the NOT_RUN prefixes that matched."""
    runs, skipped = [], set()
    for kind, cmd in commands:
        if kind == "python":
            runs.append((kind, cmd))
            continue
        skip = next((prefix for prefix, _ in NOT_RUN if cmd.startswith(prefix)), None)
        if skip is not None:
            skipped.add(skip)
            continue
        code = cmd.split(" #")[0].rstrip()
        extra = next((e for prefix, e in SHORT if code.startswith(prefix)), "")
        runs.append((kind, f"{code} {extra}".strip()))
    return runs, skipped


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path, bpe_tokenizer):
    commands = readme_commands((ROOT / "README.md").read_text())
    runs, skipped = plan(commands)
    assert skipped == {prefix for prefix, _ in NOT_RUN}, f"NOT_RUN entries matching no README command: " \
                                                         f"{sorted({p for p, _ in NOT_RUN} - skipped)}"
    assert len(runs) >= 8, runs  # the extraction found the blocks
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    write_stand_ins(clone, bpe_tokenizer)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(clone),
           "VIRTUAL_ENV": str(Path(venv_bin).parent), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    for kind, cmd in [("bash", demo_training_line()), *runs]:
        if kind == "python":
            (tmp_path / "block.py").write_text(cmd)
            argv = [os.path.join(venv_bin, "python"), str(tmp_path / "block.py")]
        else:
            argv = ["bash", "-euo", "pipefail", "-c", cmd]
        proc = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {cmd}\n{proc.stdout[-2000:]}\n" \
                                     f"{proc.stderr[-3000:]}"
    assert (clone / "runs/conv_train/final/config.json").is_file()
    # the task the README's cmoe-lm-eval line names (not run here: NOT_RUN) is the one harness_tasks wrote
    assert "task: cmoe_text" in (clone / "runs/tiny/lm_eval_tasks/cmoe_text.yaml").read_text().splitlines()
    named = [p for p in readme_output_files((ROOT / "README.md").read_text()) if not p.startswith(DEMO_ONLY)]
    assert "runs/eval/tiny/long_context/heatmap_passkey.png" in named and "runs/tiny/inspect/samples.html" in named
    missing = [p for p in named if not (clone / p).is_file()]
    assert not missing, f"the README names outputs the commands did not write: {missing}"
    assert not any((clone / name).exists() for name in ("eval", "inspect")), "a README command wrote into the repo root"

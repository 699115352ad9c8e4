"""Golden loss curve: the tiny config's first training steps through the real training loop must reproduce
tests/assets/losses/tiny.txt (1e-5 relative). It catches silent changes in the training numerics.

The run is `train()` itself (cmoe_vlm/training/loop.py: DeepSpeed ZeRO-0, the streaming loader, the
objective, gradient clipping, the NaN rule) on configs/tiny.yaml (chunking, sum merge, concept model,
dechunk, joint decoding in every decoder layer, MoE, ViT + projector, images) over freshly written
built-in shards. It is cut down so that it stays cheap (50 steps of 2 micro-batches of one 256-token row)
and exercises what the loop decides: 2 micro-batches per update (train.grad_accum) and a NaN loss on
micro-batch 7, so that step 4's group is skipped. It runs in a subprocess on one thread with the CPU
kernels pinned to their baseline instruction set (ATen, MKL, oneDNN), so the curve is the same on any
x86 CPU: unpinned, a curve recorded on an AVX-512 Xeon left the curve from step 43 on an AVX2 EPYC (a
boundary sample flipped by kernel rounding).

Regenerate only for a deliberate change of the numerics or of the built-in data, and say which in
the commit:  python tests/training/test_golden_loss.py --write
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "tests" / "assets" / "losses" / "tiny.txt"
STEPS = 50
NAN_MICRO_BATCH = 7  # the first micro-batch of step 4's group (grad_accum 2): that update is skipped
OVERRIDES = ["data.batch_size=1", "train.grad_accum=2", "data.seq_len=256", "data.num_workers=0",
             "data.shuffle_buffer=0", "train.tensorboard=false", "train.heldout_shards=null", "train.peak_tflops=1",
             "train.ckpt_every=1000"]
RTOL = 1e-5
# One thread, and every CPU kernel library held to its baseline code path: results independent of the CPU.
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
          "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def write_data(folder: Path) -> dict[str, str]:
    from data_pipelines.builtin import write_builtin_dataset
    written = write_builtin_dataset(folder, num_train=160, num_heldout=1, maxcount=1000, text_chars=600)
    return {split: str(path) for split, path in written.items()}


def run(out: Path, data: dict[str, str], steps: int, nan_micro_batch: int = NAN_MICRO_BATCH) -> dict:
    """train() on the golden settings for `steps` steps (lr warm-up is 20 steps, so the first steps of a
    shorter run are the golden run's), the training forward number `nan_micro_batch` given NaN logits;
    returns the summary."""
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from cmoe_vlm.training.config import load_experiment
    from cmoe_vlm.training.loop import train

    forward, calls = ConceptMoEVLM.forward, [0]

    def one_nan_loss(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        calls[0] += self.training
        if self.training and calls[0] == nan_micro_batch:
            result.logits = result.logits * float("nan")
        return result

    exp = load_experiment(ROOT / "configs" / "tiny.yaml", OVERRIDES + [f"data.shards={data['train']}",
                                                                      f"train.out_dir={out}", f"train.steps={steps}"])
    ConceptMoEVLM.forward = one_nan_loss
    try:
        return train(exp)
    finally:
        ConceptMoEVLM.forward = forward


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def pinned_run(out: Path, data: dict[str, str]) -> list[float]:
    """The golden run in a subprocess with the CPU kernels pinned (PINNED); its losses per step."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PINNED, PYTHONPATH=str(ROOT))  # a process group of its own (this one may hold one already)
    proc = subprocess.run([sys.executable, __file__, "--run", str(out), json.dumps(data)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["skipped_steps"] == 1  # the NaN loss skipped its group
    return losses(out)


def read_asset(path: Path = ASSET) -> list[float]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1)), f"{path}: steps must be 1, 2, ..."
    return [float(r[1]) for r in rows]


def off_curve(got: list[float], want: list[float]) -> list[tuple[int, float, float]]:
    return [(i + 1, g, w) for i, (g, w) in enumerate(zip(got, want)) if not math.isclose(g, w, rel_tol=RTOL)]


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("golden_data"))


def test_tiny_config_reproduces_the_golden_loss_curve(golden_data, tmp_path):
    want = read_asset()
    assert len(want) == STEPS
    got = pinned_run(tmp_path / "run", golden_data)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["skipped_steps"] == (m["step"] >= 4) for m in metrics)  # step 4's first group was skipped
    assert sum("tokens_image" in m for m in metrics) > STEPS // 4  # images, and chunks merge tokens
    assert sum(m["tokens_all"] for m in metrics) > 1.2 * sum(m["concepts_all"] for m in metrics)
    bad = off_curve(got, want)
    assert not bad, f"{len(bad)} of {STEPS} steps off the golden curve (step, got, want): {bad[:5]}"


def test_the_curve_pins_the_loops_nan_and_accumulation_rules(golden_data, tmp_path, monkeypatch):
    """The golden run's first 5 steps, in this process (unpinned: early steps agree across CPUs far within
    the tolerance), match the curve; a loop that keeps the rest of a group after a NaN loss, or updates
    after every micro-batch, leaves it."""
    from cmoe_vlm.training import engine, loop

    want = read_asset()
    run(tmp_path / "control", golden_data, 5)
    assert not off_curve(losses(tmp_path / "control"), want)

    def drop_bad_micro_batch(self, loss):  # another NaN rule: the group's update goes on without it
        self.engine.backward(loss if torch.isfinite(loss) else loss.new_zeros((), requires_grad=True) * 1.0)
    with monkeypatch.context() as m:
        m.setattr(engine.StepGuard, "backward", drop_bad_micro_batch)
        summary = run(tmp_path / "nan_rule", golden_data, 5)
    assert summary["skipped_steps"] == 0 and off_curve(losses(tmp_path / "nan_rule"), want)

    real_build = loop.build_engine
    with monkeypatch.context() as m:  # DeepSpeed told of no accumulation: it updates after every micro-batch
        m.setattr(loop, "build_engine", lambda model, cfg, micro: real_build(
            model, dataclasses.replace(cfg, grad_accum=1), micro))
        run(tmp_path / "accumulation", golden_data, 3)  # 3 steps: before the NaN loss
    assert off_curve(losses(tmp_path / "accumulation"), want)


HEADER = """\
# Golden loss curve: total training loss (lm + ratio_loss_weight * ratio + lb_loss_weight * lb) per step,
# of the last micro-batch of each applied update. Made by `python tests/training/test_golden_loss.py --write`:
# train() (DeepSpeed ZeRO-0) on configs/tiny.yaml with {overrides} train.steps={steps}; built-in shards
# written fresh (write_builtin_dataset(num_train=160, text_chars=600), seed 0); NaN logits on training
# micro-batch {nan} (step 4's first group is skipped); one thread, CPU kernels pinned ({pinned}).
# step loss
"""


def write_asset() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        got = pinned_run(Path(tmp) / "run", write_data(Path(tmp) / "data"))
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    pinned = " ".join(f"{k}={v}" for k, v in PINNED.items())
    text = HEADER.format(overrides=" ".join(OVERRIDES), steps=STEPS, nan=NAN_MICRO_BATCH, pinned=pinned)
    ASSET.write_text(text + "".join(f"{i + 1} {v!r}\n" for i, v in enumerate(got)))
    print(f"wrote {ASSET}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:  # the pinned subprocess
        run(Path(sys.argv[2]), json.loads(sys.argv[3]), STEPS)
    elif sys.argv[1:] == ["--write"]:
        write_asset()
    else:
        raise SystemExit("usage: python tests/training/test_golden_loss.py --write")

"""train_vlm.py end to end on built-in shards: learning (and its trackers), exact resume after kill -9, guards."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmoe_vlm.config import ConfigError
from cmoe_vlm.training.config import load_experiment

from .conftest import NaNGradient, overrides

ROOT = Path(__file__).resolve().parents[2]


def read_metrics(out_dir: Path) -> dict[int, dict]:
    """Last logged record of every step (a resumed run logs some steps again)."""
    rows = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows[rec["step"]] = rec
    return rows


def run_train(args: list[str], **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.Popen([sys.executable, str(ROOT / "train_vlm.py"), str(ROOT / "configs/tiny.yaml"), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_single_process_run_learns(trained_tiny_run):
    """The session's 200-step run of `python train_vlm.py` (tests/conftest.py; the evaluation tests use its
    export): it learns, and its logs, checkpoints, trackers and MFU say what happened."""
    out = trained_tiny_run
    steps = json.loads((out / "config.json").read_text())["train"]["steps"]
    m = read_metrics(out)
    first = sum(m[s]["lm_loss"] for s in range(1, 6)) / 5
    last = sum(m[s]["lm_loss"] for s in range(steps - 4, steps + 1)) / 5
    assert last < first - 0.5, (first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == steps and summary["skipped_steps"] == 0
    assert 0 <= summary["loop_overhead_fraction"] < 1 and 0 <= summary["data_wait_fraction"] < 1
    assert all(m[s]["grad_norm"] > 0 for s in m)  # ZeRO-0: measured by us, not a placeholder
    comp = summary["heldout"]["compression"]
    assert comp["text"]["tokens"] > 0 and comp["image"]["tokens"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == [f"step_{steps:08d}"]
    for key in ("ratio_window_text", "ratio_window_image", "ratio_all", "tokens_per_s", "grad_norm", "expert_load/max_over_mean", "lr"):
        assert key in m[steps], key
    # MFU: realized training FLOPs per token (3x forward, at the achieved compression), over the given peak
    assert summary["peak_source"] == "train.peak_tflops" and summary["checkpointed_blocks"] == 0
    assert 1e6 < m[steps]["flops_per_token"] < 3 * 20e6 and m[steps]["mfu"] == pytest.approx(m[steps]["tflops"] / 0.1)
    assert m[steps]["tflops"] * 1e12 == pytest.approx(m[steps]["tokens_per_s"] * m[steps]["flops_per_token"], rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/lm_loss", "train/mfu", "compression/ratio_window_text", "eval/lm_loss", "eval/ratio_image"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("eval/lm_loss")] == [steps]
    assert events.Scalars("eval/lm_loss")[0].value == pytest.approx(summary["heldout"]["lm_loss"])
    assert {"compression/eval_chunk_length_text", "compression/eval_boundary_p_image"} <= set(tags["histograms"])
    if importlib.util.find_spec("wandb") is not None or os.environ.get("CI"):
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def wait_for_steps(out_dir: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out_dir / "metrics.jsonl").exists() and len((out_dir / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{out_dir}: {n} steps not logged (exit code {proc.poll()})")


def checkpoints(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_sigterm_to_the_process_group_then_kill_9_resume_on_the_same_trajectory(builtin_data, tmp_path):
    """A scheduler's SIGTERM to the whole process group (DataLoader workers included) checkpoints and
    exits 0; a later kill -9 loses only the steps since the last checkpoint; both resumes continue the
    uninterrupted run's trajectory exactly, and metrics.jsonl keeps one row per step."""
    common = ["train.steps=10", "train.ckpt_every=3", "train.keep_last=5", "data.num_workers=2",
              "train.heldout_shards="]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "interrupted"
    ref = run_train(overrides(builtin_data, ref_dir, *common))
    log, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, log[-3000:]

    victim = run_train(overrides(builtin_data, run_dir, *common), start_new_session=True)  # its own group
    wait_for_steps(run_dir, 2, victim)
    os.killpg(victim.pid, signal.SIGTERM)  # as scancel / systemd: every process of the group
    log, _ = victim.communicate(timeout=300)
    assert victim.returncode == 0, log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] and 2 <= summary["step"] < 10
    assert checkpoints(run_dir)[-1] == f"step_{summary['step']:08d}"

    resumed = run_train(overrides(builtin_data, run_dir, *common), start_new_session=True)
    wait_for_steps(run_dir, 7, resumed)  # past the step-6 checkpoint
    resumed.send_signal(signal.SIGKILL)
    resumed.communicate()
    assert checkpoints(run_dir)[-1] in ("step_00000006", "step_00000009")

    final = run_train(overrides(builtin_data, run_dir, *common))
    log, _ = final.communicate(timeout=900)
    assert final.returncode == 0, log[-3000:]
    assert "resumed from" in log
    assert not json.loads((run_dir / "summary.json").read_text())["interrupted"]
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 11))  # the replayed steps are not logged twice
    a, b = read_metrics(ref_dir), read_metrics(run_dir)
    for step in range(1, 11):
        for key in ("loss", "lm_loss", "ratio_loss", "lb_loss", "ratio_all"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


def test_nonfinite_steps_are_skipped_and_counted(builtin_data, tmp_path, monkeypatch):
    from cmoe_vlm.training import loop
    from cmoe_vlm.model.vlm import ConceptMoEVLM

    real_forward = ConceptMoEVLM.forward
    calls = {"n": 0}

    def flaky_forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] in (3, 4):
            out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(ConceptMoEVLM, "forward", flaky_forward)
    exp = load_experiment(ROOT / "configs/tiny.yaml",
                          overrides(builtin_data, tmp_path / "nan", "train.steps=4", "data.num_workers=0",
                                    "train.heldout_shards="))
    summary = loop.train(exp)
    assert summary["step"] == 4 and summary["skipped_steps"] == 2
    m = read_metrics(tmp_path / "nan")
    assert m[4]["skipped_steps"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in m.values())

    calls["n"] = -10**9  # every call from now on is non-finite: the run must stop with a clear error
    monkeypatch.setattr(ConceptMoEVLM, "forward", lambda self, *a, **k: _nan(real_forward(self, *a, **k)))
    exp = load_experiment(ROOT / "configs/tiny.yaml",
                          overrides(builtin_data, tmp_path / "nan2", "train.steps=4", "data.num_workers=0",
                                    "train.heldout_shards=", "train.max_nonfinite=3"))
    with pytest.raises(loop.NonFiniteError, match="3 consecutive steps"):
        loop.train(exp)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_gradient_steps_are_skipped(builtin_data, tmp_path, monkeypatch, zero_stage):
    """The loss is finite but the gradients are NaN: on ZeRO-0 our own norm check, on ZeRO-2
    DeepSpeed's partitioned-gradient norm; either way no update is applied and the step is counted."""
    from cmoe_vlm.training import loop
    from cmoe_vlm.model.vlm import ConceptMoEVLM

    real_forward = ConceptMoEVLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] == 3:
            out.logits = NaNGradient.apply(out.logits)
        return out

    monkeypatch.setattr(ConceptMoEVLM, "forward", forward)
    exp = load_experiment(ROOT / "configs/tiny.yaml",
                          overrides(builtin_data, tmp_path / "g", "train.steps=3", "data.num_workers=0",
                                    "train.heldout_shards=", f"train.zero_stage={zero_stage}"))
    summary = loop.train(exp)
    assert summary["step"] == 3 and summary["skipped_steps"] == 1
    from cmoe_vlm.checkpoints.export import load_pretrained
    model, _ = load_pretrained(tmp_path / "g" / "final")  # a NaN update would have poisoned the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _nan(out):
    out.logits = out.logits * float("nan")
    return out


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="train.zero_stage = 3: .*use 2"):
        load_experiment(ROOT / "configs/tiny.yaml", ["train.zero_stage=3"])
    with pytest.raises(ConfigError, match="data.tokens_per_image"):  # an override that disagrees with the model
        load_experiment(ROOT / "configs/tiny.yaml", ["projector.reduction=1", "data.tokens_per_image=16"])
    with pytest.raises(ConfigError, match="data.image_size"):
        load_experiment(ROOT / "configs/tiny.yaml", ["data.image_size=32"])
    with pytest.raises(ConfigError, match="data.seq_len = 8192: must be <= model.max_seq_len = 4096"):
        load_experiment(ROOT / "configs/tiny.yaml", ["data.seq_len=8192"])
    derived = load_experiment(ROOT / "configs/tiny.yaml", ["projector.reduction=1", "vision.img_size=32"]).data
    assert (derived.tokens_per_image, derived.image_size) == (16, 32)  # 4x4 patches of 8 px, no reduction
    proc = subprocess.run([sys.executable, str(ROOT / "train_vlm.py"), str(ROOT / "configs/tiny.yaml"),
                           "model.chunk.target_ratio=0.5"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "model.chunk.target_ratio = 0.5" in proc.stderr

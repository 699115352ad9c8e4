"""One tiny VLM trained on built-in data, shared by the evaluation tests (session scope).

Set CMOE_EVAL_TEST_MODEL=/path/to/final to reuse a model trained with the same overrides.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.builtin import write_builtin_dataset

ROOT = Path(__file__).resolve().parents[3]
STEPS = 200
OVERRIDES = ["model.dim=64", "model.moe.expert_hidden=128", "data.seq_len=256", "data.batch_size=4",
             "data.num_workers=1", "data.shuffle_buffer=100", "train.tensorboard=false", "train.ckpt_every=1000",
             "train.eval_batches=2", f"train.steps={STEPS}"]


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    if os.environ.get("CMOE_EVAL_TEST_MODEL"):
        return Path(os.environ["CMOE_EVAL_TEST_MODEL"])
    root = tmp_path_factory.mktemp("eval_train")
    data = write_builtin_dataset(root / "data", num_train=1000, num_heldout=40, maxcount=250, text_chars=1500)
    out = root / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "train_vlm.py"), str(ROOT / "configs/tiny.yaml"), *OVERRIDES,
                           f"data.shards={data['train']}", f"train.heldout_shards={data['heldout']}",
                           f"train.out_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "final"


@pytest.fixture(scope="session")
def runner(trained_model):
    from cmoe_vlm.inference.runner import ModelRunner

    return ModelRunner.load(trained_model, batch_size=16)

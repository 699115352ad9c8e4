"""Per-modality compression control on built-in image-text data (issue: R_text=1.5, R_image=3).

The training ratio of each modality, pooled over the last 20 steps (the loop's windowed metric),
must land within ±10% of its target; the eval-time (thresholded) ratio on held-out data is
recorded beside it in summary.json (spec §12: it runs above the training ratio, images most).
"""
import json
import os

import pytest

from cmoe_vlm.training import loop
from cmoe_vlm.training.config import load_experiment

from .conftest import overrides
from .test_train import ROOT, read_metrics

SEED = int(os.environ.get("CMOE_TEST_SEED", "0"))


@pytest.mark.slow
def test_per_modality_targets_are_reached(builtin_data, tmp_path):
    out = tmp_path / "pm"
    exp = load_experiment(ROOT / "configs/tiny.yaml", overrides(
        builtin_data, out, "train.steps=200", "train.warmup_steps=10", "train.lr=3e-3", f"train.seed={SEED}",
        "model.chunk.ratio_mode=per_modality", "model.chunk.text_ratio=1.5", "model.chunk.image_ratio=3",
        "model.chunk.ratio_loss_weight=1.0", "train.eval_batches=4", "data.num_workers=0"))
    summary = loop.train(exp)
    last = read_metrics(out)[200]
    for name, target in (("text", 1.5), ("image", 3.0)):
        ratio = last[f"ratio_window_{name}"]
        assert abs(ratio - target) / target <= 0.10, f"{name}: pooled ratio {ratio:.2f}, target {target}"
    heldout = summary["heldout"]["compression"]
    assert heldout["text"]["tokens"] > 0 and heldout["image"]["tokens"] > 0
    print(json.dumps({"train_window": {k: last[f"ratio_window_{k}"] for k in ("text", "image")},
                      "heldout_eval": {k: heldout[k]["ratio"] for k in ("text", "image")}}))

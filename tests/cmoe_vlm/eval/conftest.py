"""The tiny VLM trained once per session (tests/conftest.py: `trained_tiny_run`), as the evaluation
tests use it.

Set CMOE_EVAL_TEST_MODEL=/path/to/final to reuse a model trained with the same overrides.
"""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_model(request) -> Path:
    if os.environ.get("CMOE_EVAL_TEST_MODEL"):
        return Path(os.environ["CMOE_EVAL_TEST_MODEL"])
    return request.getfixturevalue("trained_tiny_run") / "final"


@pytest.fixture(scope="session")
def runner(trained_model):
    from cmoe_vlm.inference.runner import ModelRunner

    return ModelRunner.load(trained_model, batch_size=16)

"""Evaluation: local task suites, long-context probes, harness adapters (lm-eval, lmms-eval).

    python -m cmoe_vlm.eval --model DIR [--model DIR2] --suite builtin --out OUT

`runner.ModelRunner` loads a checkpoint and scores/generates; `tasks` runs multiple choice, VQA,
captioning and perplexity tasks from JSONL; `builtin_suite` writes the built-in suite;
`long_context` runs passkey and needle-in-a-haystack probes; `harness` adapts to lm-eval and
`lmms_adapter` to lmms-eval. Importing this package is cheap (torch loads with `runner`), so
command-line help and harness plugin discovery stay fast.
"""
from typing import Any

__all__ = ["ModelRunner", "Scored"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ..inference import runner
        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

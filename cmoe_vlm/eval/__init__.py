"""Evaluation: local task suites, long-context probes, harness adapters (lm-eval, lmms-eval).

    python -m cmoe_vlm.eval --model DIR [--model DIR2] --suite builtin --out OUT

Every evaluation scores and generates through `cmoe_vlm.runner.ModelRunner`; `tasks` runs
multiple choice, VQA, captioning and perplexity tasks from JSONL; `builtin_suite` writes the
built-in suite; `long_context` runs passkey and needle-in-a-haystack probes; `harness` adapts to
the harnesses.
"""

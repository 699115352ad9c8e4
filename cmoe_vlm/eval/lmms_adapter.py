"""lmms-eval 0.7.3 adapter: `CMoELmms`, a `lmms_eval.api.model.lmms` over a checkpoint folder.

lmms-eval finds it through the `lmms_eval.models` entry point that pyproject.toml declares
(`cmoe_vlm.eval.harness:lmms_models`), so its own command line runs our checkpoints:

    .venv-lmms/bin/lmms-eval --model cmoe_vlm --model_args pretrained=runs/tiny/final \
        --tasks TASKS --include_path TASK_DIR --batch_size 8 --output_path OUT

Images come from the task's `doc_to_visual`, placed where the context has `<image>` markers, else
all before the text (the layout of our QA training data). model_args, generation options, batching
and progress bars: see `cmoe_vlm.eval.harness`; `ll_returns_loss` (default true) is below.

Two defects of lmms-eval 0.7.3's multiple-choice path are handled here:
- it picks the choice with the *lowest* returned value (it expects a loss), so `loglikelihood`
  returns `(−logprob, is_greedy)` unless `ll_returns_loss=False`;
- its `unwrap_generation_output` turns a `(value, is_greedy)` result into the string
  "(value, is_greedy)", and the scorer then fails (`TypeError: 'float' object is not iterable`);
  `patch_lmms_unwrap()` (called when the adapter is built) passes such pairs through as
  `((value, is_greedy), None)`, the (response, token counts) pair the evaluator unpacks.

lmms-eval exits 0 even when the evaluation crashed: check its results file, not its exit code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms

from .harness import (DEFAULT_MAX_GEN_TOKS, DEFAULT_SEED, GenerationOptions, _as_bool, generate_batched,
                      load_runner, place_images, score_batched)


def _is_score(x: Any) -> bool:
    return (isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], (int, float))
            and not isinstance(x[0], bool))


def patch_lmms_unwrap() -> None:
    """Let lmms-eval's evaluator keep log-likelihood results as (value, is_greedy) pairs (idempotent)."""
    import lmms_eval.evaluator as ev

    orig = ev.unwrap_generation_output
    if getattr(orig, "_cmoe_patched", False):
        return

    def unwrap(x, *a, **k):
        if _is_score(x):  # a tuple from the model, or a list from lmms-eval's response cache
            return (float(x[0]), bool(x[1])), None
        return orig(x, *a, **k)

    unwrap._cmoe_patched = True
    ev.unwrap_generation_output = unwrap


class CMoELmms(lmms):
    """`lmms_eval.api.model.lmms` over a checkpoint folder; images from the task's doc_to_visual."""

    is_simple = True

    def __init__(self, pretrained: str | Path, device: str | None = "cpu",
                 batch_size: int | str | None = None, max_batch_size: int | str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_GEN_TOKS, seed: int = DEFAULT_SEED,
                 ll_returns_loss: bool | str = True, **unused: Any):
        if unused:
            raise TypeError(f"CMoELmms: unknown model_args {sorted(unused)}; known: pretrained, device, batch_size, "
                            "max_batch_size, max_new_tokens, seed, ll_returns_loss")
        super().__init__()
        self.runner = load_runner(pretrained, device, batch_size, max_batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self.ll_returns_loss = _as_bool(ll_returns_loss, "ll_returns_loss")
        patch_lmms_unwrap()

    def _pieces(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> list[Any]:
        visuals = [] if doc_to_visual is None else doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not hasattr(v, "convert"):
                raise TypeError(f"{task}/{doc_id}: only images are supported, got {type(v).__name__}")
        return place_images(context, visuals)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        contexts, conts = [], []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args
            # multiple_choice passes the continuation; output_type loglikelihood passes doc_to_target
            conts.append(target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id])))
            contexts.append(self._pieces(context, doc_to_visual, doc_id, task, split))
        scores = score_batched(self.runner, contexts, conts, "cmoe-vlm loglikelihood")
        sign = -1.0 if self.ll_returns_loss else 1.0
        return [(sign * s.logprob, s.is_greedy) for s in scores]

    def generate_until(self, requests) -> list[str]:
        prompts, options = [], []
        for r in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
            prompts.append(self._pieces(context, doc_to_visual, doc_id, task, split))
            options.append(GenerationOptions.parse(gen_kwargs, self.max_new_tokens, self.seed))
        return generate_batched(self.runner, prompts, options, "cmoe-vlm generate_until")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("cmoe-vlm under lmms-eval: use lm-eval (cmoe-lm-eval) for text perplexity")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("cmoe-vlm under lmms-eval: multi-round generation is not supported")

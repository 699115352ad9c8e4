"""Adapters that let standard harnesses run our checkpoints.

lm-evaluation-harness (text; `pip install lm-eval==0.4.13`):

    import lm_eval
    from cmoe_vlm.eval.harness import CMoELMEval
    lm_eval.simple_evaluate(model=CMoELMEval("runs/tiny/final"), tasks=[...], task_manager=...)
    # or, after `import cmoe_vlm.eval.harness`: --model cmoe-vlm --model_args pretrained=DIR

lmms-eval (images; optional, ~1.5 GB of extra dependencies): `lmms_eval_model_class()` builds a
subclass of `lmms_eval.api.model.lmms` (lmms-eval is imported only then). Pass an instance to
`lmms_eval.evaluator.simple_evaluate(model=...)`, or register it for the CLI through
`LMMS_EVAL_PLUGINS` (a package whose `models/__init__.py` lists `AVAILABLE_MODELS`). Two known
defects of lmms-eval 0.7.3 in its multiple-choice path (docs/design.md §12) are handled: it picks the
choice with the *lowest* value, so `loglikelihood` returns `(loss = −logprob, is_greedy)` when
`ll_returns_loss=True` (the default); and it stringifies log-likelihood tuples unless
`patch_lmms_unwrap()` has wrapped its `unwrap_generation_output` to pass tuples through.

Both adapters score and generate through `ModelRunner`, the code path of our own tasks, and raise
on any error (a bad request, a too-long context) rather than returning empty answers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runner import ModelRunner

try:  # lm-eval is an optional dependency
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised only without the extra
    _LMBase = object
    HAVE_LM_EVAL = False

    def _register_model(*_names):
        return lambda cls: cls


def _runner(pretrained: str | Path | ModelRunner, device: str, batch_size: int) -> ModelRunner:
    if isinstance(pretrained, ModelRunner):
        return pretrained
    return ModelRunner.load(pretrained, device=device, batch_size=int(batch_size))


def _gen_args(gen_kwargs: dict[str, Any], default_max: int) -> tuple[list[str], int]:
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", default_max)))
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if kw.pop("do_sample", False) or temperature > 0:
        raise ValueError(f"only greedy generation is supported (got do_sample/temperature in {gen_kwargs})")
    return until, max_new


@_register_model("cmoe-vlm", "cmoe_vlm")
class CMoELMEval(_LMBase):
    """`lm_eval.api.model.LM` over a checkpoint folder (text only: lm-eval requests are strings)."""

    def __init__(self, pretrained: str | Path | ModelRunner, device: str = "cpu", batch_size: int | str = 8,
                 max_gen_toks: int = 64, **unused: Any):
        if not HAVE_LM_EVAL:
            raise ImportError("CMoELMEval needs lm-eval: pip install 'lm-eval==0.4.13' (or the project's eval extra)")
        if unused:
            raise TypeError(f"CMoELMEval: unknown model_args {sorted(unused)}")
        super().__init__()
        self.runner = _runner(pretrained, device, 8 if batch_size == "auto" else int(batch_size))
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        contexts, conts = [], []
        for r in requests:
            context, continuation = r.args[0], r.args[1]
            contexts.append([context] if context else [])
            conts.append(continuation)
        return [(s.logprob, s.is_greedy) for s in self.runner.loglikelihood(contexts, conts)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each token of the string predicted once, with as much context as max_seq_len allows
        (lm-eval's rolling windows), conditioned on bos."""
        tok = self.runner.tok
        out = []
        for r in requests:
            ids = tok.encode(r.args[0])
            if not ids:
                raise ValueError("loglikelihood_rolling: empty string")
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=tok.bos_id, max_seq_len=self.runner.max_len, context_len=1)]
            scores = self.runner.loglikelihood_tokens(windows)
            out.append(sum(s.logprob for s in scores))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, gen_kwargs = r.args[0], r.args[1]
            until, max_new = _gen_args(gen_kwargs, self.max_gen_toks)
            out.append(self.runner.generate([[context] if context else []], max_new, stop=until)[0])
        return out


# ----------------------------------------------------------------------------- lmms-eval

def _place_images(context: str, images: list[Any], placeholder: str = "<image>") -> list[Any]:
    """Pieces for a context: images where `placeholder` appears, else all images first (the
    layout our QA training data uses)."""
    if placeholder in context:
        parts = context.split(placeholder)
        if len(parts) - 1 != len(images):
            raise ValueError(f"context has {len(parts) - 1} {placeholder} markers but {len(images)} images")
        pieces: list[Any] = [parts[0]] if parts[0] else []
        for img, text in zip(images, parts[1:]):
            pieces += [img] + ([text] if text else [])
        return pieces
    return list(images) + ([context] if context else [])


def patch_lmms_unwrap() -> None:
    """lmms-eval 0.7.3 stringifies log-likelihood results; let (float, bool) tuples through."""
    import lmms_eval.evaluator as ev

    orig = getattr(ev, "unwrap_generation_output", None)
    if orig is None or getattr(orig, "_cmoe_patched", False):
        return

    def unwrap(x, *a, **k):
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], float):
            return x
        return orig(x, *a, **k)

    unwrap._cmoe_patched = True
    ev.unwrap_generation_output = unwrap


def lmms_eval_model_class():
    """Build the lmms-eval adapter class (imports lmms_eval; raises ImportError without it)."""
    from lmms_eval.api.model import lmms

    class CMoELmms(lmms):
        """`lmms_eval.api.model.lmms` over a checkpoint folder; images from the task's doc_to_visual."""

        def __init__(self, pretrained: str | Path | ModelRunner, device: str = "cpu", batch_size: int | str = 8,
                     max_gen_toks: int = 64, ll_returns_loss: bool = True, **unused: Any):
            if unused:
                raise TypeError(f"CMoELmms: unknown model_args {sorted(unused)}")
            super().__init__()
            self.runner = _runner(pretrained, device, 8 if batch_size == "auto" else int(batch_size))
            self.max_gen_toks = int(max_gen_toks)
            self.ll_returns_loss = bool(ll_returns_loss)
            patch_lmms_unwrap()

        def _visuals(self, doc_to_visual, doc_id, task, split) -> list[Any]:
            if doc_to_visual is None:
                return []
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            visuals = [v for v in (visuals or []) if v is not None]
            for v in visuals:
                if not hasattr(v, "convert"):
                    raise TypeError(f"{task}/{doc_id}: only images are supported, got {type(v).__name__}")
            return visuals

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            contexts, conts = [], []
            for r in requests:
                context, doc_to_target, doc_to_visual, doc_id, task, split = r.args
                target = doc_to_target if isinstance(doc_to_target, str) else \
                    doc_to_target(self.task_dict[task][split][doc_id])
                contexts.append(_place_images(context, self._visuals(doc_to_visual, doc_id, task, split)))
                conts.append(str(target))
            scores = self.runner.loglikelihood(contexts, conts)
            sign = -1.0 if self.ll_returns_loss else 1.0
            return [(sign * s.logprob, s.is_greedy) for s in scores]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError("use the lm-eval adapter (CMoELMEval) for text perplexity")

        def generate_until(self, requests) -> list[str]:
            out = []
            for r in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
                until, max_new = _gen_args(gen_kwargs, self.max_gen_toks)
                pieces = _place_images(context, self._visuals(doc_to_visual, doc_id, task, split))
                out.append(self.runner.generate([pieces], max_new, stop=until)[0])
            return out

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("multi-round generation is not supported")

    return CMoELmms

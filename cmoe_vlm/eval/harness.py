"""Run our checkpoints under the standard evaluation harnesses.

lm-evaluation-harness 0.4.13 (text; the `eval` extra). lm-eval has no plugin discovery (a model
registered when our package is imported is not seen by its `lm_eval` command), so the project
installs `cmoe-lm-eval`: exactly lm-eval's command line, with our model registered first:

    cmoe-lm-eval --model cmoe-vlm --model_args pretrained=runs/tiny/final --tasks TASKS --batch_size 8
    cmoe-lm-eval ls tasks                       # and every other lm-eval subcommand

In Python, importing this module registers the model (`cmoe-vlm`, also `cmoe_vlm`) with lm-eval;
lm-eval's own models stay available:

    import lm_eval, cmoe_vlm.eval.harness
    lm_eval.simple_evaluate(model="cmoe-vlm", model_args="pretrained=runs/tiny/final", tasks=[...])
    lm_eval.simple_evaluate(model=CMoELMEval("runs/tiny/final"), tasks=[...])   # or an instance

lmms-eval 0.7.3 (images; heavy, so in its own environment `.venv-lmms`, see
scripts/setup_venv.sh): our package declares `lmms_models` in the `lmms_eval.models`
entry-point group, so lmms-eval's own command finds `--model cmoe_vlm` (or `cmoe-vlm`); the adapter
is `cmoe_vlm.eval.lmms_adapter.CMoELmms`.

model_args (both): pretrained=DIR (an exported checkpoint folder), device (default cpu; a CUDA
device on a machine without CUDA falls back to the CPU with a warning: lm-eval passes `cuda:0` when
--device is not given), batch_size (requests per forward; `auto` means 8: no memory probing),
max_batch_size (caps it), max_gen_toks (default 256, lm-eval's default, when a task sets none),
seed (sampling seed, default 1234). With lm-eval, model_args win over its own --device, --batch_size
and --max_batch_size (which it always passes, with their defaults). A bad value is an error naming it.

Generation options (a task's generation_kwargs or --gen_kwargs): `until` (stop strings; one that
is a single token also ends its row early, any other cuts the text afterwards), `max_gen_toks` /
`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `top_k`, `seed`. Greedy unless
do_sample=True or (do_sample unset and) temperature > 0; do_sample=True without a temperature
samples at 1.0. Sampling is reproducible for a given seed, batch size and request set (batch k of
a run draws from seed + k). No-op settings (num_beams=1, repetition_penalty=1.0, ...) are
accepted; anything else (beam search, penalties, ...) raises an error naming the option.

Requests are sorted by length (longest first) and run in batches of batch_size, with a progress
bar; results come back in request order. Scoring and generation go through `ModelRunner`, the code
path of our own tasks, and raise on any error (a bad request, a too-long context) rather than
returning empty answers.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from cmoe_base.commands import command

if TYPE_CHECKING:
    from ..inference.runner import ModelRunner, Pieces, Scored

try:  # lm-eval is an optional dependency (the `eval` extra)
    from lm_eval.api.model import LM as _LMBase
    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised only without the extra
    _LMBase = object
    HAVE_LM_EVAL = False

log = logging.getLogger(__name__)

LM_EVAL_NAMES = ("cmoe-vlm", "cmoe_vlm")
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_SEED = 1234


# ----------------------------------------------------------------------------- loading

def load_runner(pretrained: str | Path | ModelRunner, device: str | None = "cpu",
                batch_size: int | str | None = None, max_batch_size: int | str | None = None) -> ModelRunner:
    """A `ModelRunner` from harness model_args (see the module docstring). A runner passed in is
    used as it is, or as a copy with the given batch size (sharing its model)."""
    from ..inference.runner import ModelRunner  # the one import of the runner: torch loads here, not at plugin discovery

    if isinstance(pretrained, ModelRunner):
        if batch_size is None and max_batch_size is None:
            return pretrained
        runner = copy.copy(pretrained)
        runner.batch_size = resolve_batch_size(pretrained.batch_size if batch_size is None else batch_size,
                                               max_batch_size)
        return runner
    size = resolve_batch_size(DEFAULT_BATCH_SIZE if batch_size is None else batch_size, max_batch_size)
    return ModelRunner.load(pretrained, device=resolve_device(device), batch_size=size)


def resolve_batch_size(batch_size: int | str, max_batch_size: int | str | None = None) -> int:
    text = str(batch_size)
    if text.startswith("auto"):
        size = DEFAULT_BATCH_SIZE
    else:
        try:
            size = int(text)
        except ValueError:
            raise ValueError(f"batch_size = {batch_size!r}: expected a positive integer or 'auto'") from None
    if size < 1:
        raise ValueError(f"batch_size = {batch_size!r}: must be >= 1")
    if max_batch_size is None:
        return size
    return min(size, model_arg_int("max_batch_size", max_batch_size, 1))


def model_arg_int(name: str, value: int | str, low: int | None = None) -> int:
    """An integer model_arg / generation option, or a ValueError naming it."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {value!r}: expected an integer") from None
    if low is not None and number < low:
        raise ValueError(f"{name} = {value!r}: must be >= {low}")
    return number


def model_arg_float(name: str, value: float | str) -> float:
    """A finite number, or a ValueError naming the option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {value!r}: expected a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} = {value!r}: must be a finite number")
    return number


def resolve_device(device: str | None) -> str:
    import torch

    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("cmoe-vlm: device %s requested but CUDA is not available: running on the CPU", device)
        return "cpu"
    return device


# ----------------------------------------------------------------------------- generation options

# Settings that change nothing in greedy/sampled decoding without beams; accepted at these values.
NO_OP_GEN_KWARGS: dict[str, Any] = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
                                    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "use_cache": True,
                                    "early_stopping": False}
SUPPORTED_GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                        "seed")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1"):
        return True
    if str(value).lower() in ("false", "0"):
        return False
    raise ValueError(f"generation option {name} = {value!r}: expected true or false")


@dataclass(frozen=True)
class GenerationOptions:
    """What `ModelRunner.generate` needs from a harness request's generation kwargs."""

    until: tuple[str, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @classmethod
    def parse(cls, gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int = DEFAULT_MAX_GEN_TOKS,
              default_seed: int | None = DEFAULT_SEED) -> GenerationOptions:
        kw = {k: v for k, v in dict(gen_kwargs or {}).items() if v is not None}
        unsupported = {k: v for k, v in kw.items()
                       if k not in SUPPORTED_GEN_KWARGS and not (k in NO_OP_GEN_KWARGS and NO_OP_GEN_KWARGS[k] == v)}
        if unsupported:
            raise ValueError(
                "cmoe-vlm does not support the generation option(s) "
                + ", ".join(f"{k}={v!r}" for k, v in unsupported.items())
                + f" (it decodes greedily or samples, with no beam search or penalties). Supported: "
                + ", ".join(SUPPORTED_GEN_KWARGS) + "; accepted at their no-op values only: "
                + ", ".join(f"{k}={v!r}" for k, v in NO_OP_GEN_KWARGS.items()))
        until = kw.get("until", ())
        until = (until,) if isinstance(until, str) else tuple(until)
        if not all(isinstance(s, str) for s in until):
            raise ValueError(f"generation option until = {until!r}: expected a string or a list of strings")
        lengths = {kw[k] for k in ("max_gen_toks", "max_new_tokens") if k in kw}
        if len(lengths) > 1:
            raise ValueError(f"max_gen_toks and max_new_tokens disagree: {sorted(lengths)}")
        max_new = model_arg_int("max_gen_toks", lengths.pop() if lengths else default_max_new_tokens, 0)
        temperature = model_arg_float("temperature", kw.get("temperature", 0.0))
        do_sample = _as_bool(kw["do_sample"], "do_sample") if "do_sample" in kw else temperature > 0
        if not do_sample:
            return cls(until, max_new)
        if "temperature" not in kw:
            temperature = 1.0
        if temperature <= 0:
            raise ValueError(f"do_sample=True needs temperature > 0 (got temperature = {temperature})")
        seed = kw.get("seed", default_seed)
        return cls(until, max_new, temperature, model_arg_float("top_p", kw.get("top_p", 1.0)),
                   model_arg_int("top_k", kw.get("top_k", 0), 0), None if seed is None else model_arg_int("seed", seed))


# ----------------------------------------------------------------------------- batched calls

def _length(pieces: Pieces, tokens_per_image) -> int:
    """Sort key: characters of text plus the image tokens (close to tokens for the byte tokenizer);
    tokens_per_image is a count, or a function of the image (images at their own size)."""
    per_image = tokens_per_image if callable(tokens_per_image) else lambda _: tokens_per_image
    return sum(len(p) if isinstance(p, str) else per_image(p) for p in pieces)


def _longest_first(runner: ModelRunner, lengths: Sequence[int], groups: Sequence[Any] | None = None) -> list[list[int]]:
    """Request indices in batches of runner.batch_size: per group (same generation options), longest first."""
    keys = list(dict.fromkeys(groups)) if groups is not None else [None]
    batches = []
    for key in keys:
        idx = [i for i in range(len(lengths)) if groups is None or groups[i] == key]
        idx.sort(key=lambda i: -lengths[i])
        batches += [idx[i:i + runner.batch_size] for i in range(0, len(idx), runner.batch_size)]
    return batches


def score_batched(runner: ModelRunner, contexts: list[Pieces], continuations: list[str], desc: str,
                  disable_tqdm: bool = False) -> list[Scored]:
    """`runner.loglikelihood` over all requests, longest first in batches, with a progress bar."""
    out: list[Any] = [None] * len(contexts)
    lengths = [_length(c, runner.tokens_per_image) + len(x) for c, x in zip(contexts, continuations)]
    with tqdm(total=len(contexts), desc=desc, disable=disable_tqdm) as bar:
        for batch in _longest_first(runner, lengths):
            for i, s in zip(batch, runner.loglikelihood([contexts[i] for i in batch], [continuations[i] for i in batch])):
                out[i] = s
            bar.update(len(batch))
    return out


def generate_batched(runner: ModelRunner, prompts: list[Pieces], options: list[GenerationOptions], desc: str,
                     disable_tqdm: bool = False) -> list[str]:
    """`runner.generate` over all requests: batches of equal options, longest prompt first, with a
    progress bar. Sampled batch k draws from seed + k."""
    out: list[Any] = [None] * len(prompts)
    lengths = [_length(p, runner.tokens_per_image) for p in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=disable_tqdm) as bar:
        for k, batch in enumerate(_longest_first(runner, lengths, options)):
            o = options[batch[0]]
            texts = runner.generate([prompts[i] for i in batch], o.max_new_tokens, stop=o.until,
                                    temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                                    seed=None if o.seed is None else o.seed + k)
            for i, t in zip(batch, texts):
                out[i] = t
            bar.update(len(batch))
    return out


# ----------------------------------------------------------------------------- lm-eval

class CMoELMEval(_LMBase):
    """`lm_eval.api.model.LM` over a checkpoint folder (text only: lm-eval requests are strings)."""

    def __init__(self, pretrained: str | Path | ModelRunner, device: str | None = "cpu",
                 batch_size: int | str | None = None, max_batch_size: int | str | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = DEFAULT_SEED, **unused: Any):
        if not HAVE_LM_EVAL:
            raise ImportError("CMoELMEval needs lm-eval: pip install 'lm-eval==0.4.13' (or the project's eval extra)")
        if unused:
            raise ValueError(f"CMoELMEval: unknown model_args {sorted(unused)}; known: pretrained, device, batch_size, "
                             "max_batch_size, max_gen_toks, seed")
        super().__init__()
        self.max_gen_toks = model_arg_int("max_gen_toks", max_gen_toks, 0)
        self.seed = model_arg_int("seed", seed)
        self.runner = load_runner(pretrained, device, batch_size, max_batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CMoELMEval:
        """lm-eval's way in: `--model_args` wins over the values lm-eval passes for its own --device,
        --batch_size and --max_batch_size (always passed, with their defaults), so the documented
        model_args device=... and batch_size=... work."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        given = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **given)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts = [[r.args[0]] if r.args[0] else [] for r in requests]
        scores = score_batched(self.runner, contexts, [r.args[1] for r in requests], "cmoe-vlm loglikelihood",
                               disable_tqdm)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each token of the string predicted once, with as much context as max_seq_len allows
        (lm-eval's rolling windows), conditioned on bos."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        tok = self.runner.tok
        windows, owner = [], []
        for i, r in enumerate(requests):
            ids = tok.encode(r.args[0])
            if not ids:
                raise ValueError(f"loglikelihood_rolling: request {i} is an empty string")
            for w in get_rolling_token_windows(token_list=ids, prefix_token=tok.bos_id,
                                               max_seq_len=self.runner.max_len, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        out = [0.0] * len(requests)
        with tqdm(total=len(windows), desc="cmoe-vlm loglikelihood_rolling (windows)", disable=disable_tqdm) as bar:
            for start in range(0, len(windows), self.runner.batch_size):
                chunk = windows[start:start + self.runner.batch_size]
                for i, s in zip(owner[start:], self.runner.loglikelihood_tokens(chunk)):
                    out[i] += s.logprob
                bar.update(len(chunk))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        options = [GenerationOptions.parse(r.args[1], self.max_gen_toks, self.seed) for r in requests]
        prompts = [[r.args[0]] if r.args[0] else [] for r in requests]
        return generate_batched(self.runner, prompts, options, "cmoe-vlm generate_until", disable_tqdm)


def register_lm_eval() -> None:
    """Register `CMoELMEval` with lm-eval under LM_EVAL_NAMES (lazily: the class loads when a run
    asks for it). lm-eval fills its registry with its own models only while the registry is empty,
    so those are registered first."""
    import lm_eval.models  # noqa: F401  (lm-eval's own models)
    from lm_eval.api.registry import model_registry

    for name in LM_EVAL_NAMES:
        if name not in model_registry:
            model_registry.register(name, target="cmoe_vlm.eval.harness:CMoELMEval")


@command("cmoe-lm-eval")
def lm_eval_main() -> int:
    """`cmoe-lm-eval`: lm-eval's command line (`lm-eval ...`) with cmoe-vlm registered; a bad model_arg,
    generation option or file is one line with exit status 2, as for our own commands."""
    if not HAVE_LM_EVAL:
        raise SystemExit("cmoe-lm-eval needs lm-eval: pip install 'cmoe-vlm[eval]' (lm-eval==0.4.13)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads cost several x on small CPUs
    register_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    return 0


if HAVE_LM_EVAL:
    register_lm_eval()


# ----------------------------------------------------------------------------- lmms-eval

def place_images(context: str, images: list[Any], placeholder: str = "<image>") -> list[Any]:
    """Pieces for an lmms-eval context: images where `placeholder` appears, else all images first
    (the layout of our QA training data)."""
    if placeholder in context:
        parts = context.split(placeholder)
        if len(parts) - 1 != len(images):
            raise ValueError(f"context has {len(parts) - 1} {placeholder} markers but {len(images)} images")
        pieces: list[Any] = [parts[0]] if parts[0] else []
        for img, text in zip(images, parts[1:]):
            pieces += [img] + ([text] if text else [])
        return pieces
    return list(images) + ([context] if context else [])


def lmms_models():
    """The `lmms_eval.models` entry point (pyproject.toml): our adapter as `cmoe_vlm` / `cmoe-vlm`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="cmoe_vlm", simple_class_path="cmoe_vlm.eval.lmms_adapter.CMoELmms",
                         aliases=("cmoe-vlm",))


if __name__ == "__main__":
    raise SystemExit(lm_eval_main())

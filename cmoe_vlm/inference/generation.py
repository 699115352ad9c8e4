"""Text generation with caches at every level (docs/design.md §9): greedy or sampled, stop ids, streaming.

    tokens = generate(model, [seq_a, seq_b], max_new_tokens=32, stop_ids=[tok.eos_id])
    text = generate_text(model, tok, ["Describe ", image, ":"], max_new_tokens=32)

Decoding goes through an `InferenceSession` (cmoe_vlm/inference/session.py): one prefill over the prompts,
then one step per token. Prompts of different lengths share a batch as left-aligned rows with
padding at their ends (doc_ids −1, which enters no cache). Rows that finish stop advancing;
`generate` also drops them from the batch so later steps cost less.

`use_cache=False` recomputes the full forward over prompt + generated tokens at every step: the
reference that the cached path must match token for token.

Sampling draws one uniform number per prompt per step from a generator seeded with `seed`, and
picks the token by inverse CDF, so a row's samples do not depend on which other rows are still
running (or on the cache): the same seed gives the same tokens with and without the cache.
"""
from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cmoe_base import Batch, DocumentLayout, Modality, stack_images

from .session import InferenceSession, last_token_logits


# ---------------------------------------------------------------------------------------------
# Prompt batches
def _is_vlm(model: nn.Module) -> bool:
    return hasattr(model, "lm") and hasattr(model, "vision")


def _image_tensor(model: nn.Module, img: Any, cache: dict) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    if "tf" not in cache:  # PIL image: the encoder's eval transform
        cache["tf"] = model.image_transform(train=False)
    return cache["tf"](img)


def prompt_batch(model: nn.Module, prompts) -> Batch:
    """Prompts -> a Batch of left-aligned rows, one prompt each (padding at row ends), on the
    model's device.

    `prompts` is a list of `data_pipelines.sequence.TokenSequence` (images as tensors or PIL
    images) or a Batch whose rows hold one document each."""
    device = next(model.parameters()).device
    if isinstance(prompts, Batch):
        if any(len(docs) != 1 for docs in prompts.layout.lengths):
            raise ValueError("prompts: each row of a prompt Batch must hold one document (then padding)")
        batch = prompts
    else:
        if not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts: expected a non-empty list of TokenSequence or a Batch")
        lengths = [len(s) for s in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty: a prompt needs at least one token "
                             f"(build it with add_bos=True)")
        B, T = len(prompts), max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long)
        modality = torch.full((B, T), Modality.TEXT, dtype=torch.long)
        images, tf_cache = [], {}
        for r, s in enumerate(prompts):
            ids[r, :len(s)] = torch.tensor(s.input_ids, dtype=torch.long)
            modality[r, :len(s)] = torch.tensor(s.modality, dtype=torch.long)
            images += [_image_tensor(model, img, tf_cache) for img in s.images]
        stacked, sizes = stack_images(images) if images else (None, None)
        batch = Batch(ids, modality, DocumentLayout.from_lengths([[n] for n in lengths], T),
                      images=stacked, image_tokens=sum(sum(s.modality) for s in prompts), image_sizes=sizes)
    if batch.image_tokens and not _is_vlm(model):
        raise ValueError("prompts hold images but the model is a text-only ConceptMoE")
    return batch.to(device)


# ---------------------------------------------------------------------------------------------
# Sampling
def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                uniform: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 = argmax; otherwise softmax(logits / T) restricted
    to the top_k tokens (0 = all) and the smallest set of top tokens with mass >= top_p, sampled by
    inverse CDF with `uniform` (B,) in [0, 1)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly better tokens
        drop_sorted = before >= top_p  # keeps at least the best token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)
    u = (uniform.to(cdf.dtype) * cdf[:, -1]).clamp_max(cdf[:, -1] * (1 - 1e-7))[:, None]
    idx = torch.searchsorted(cdf, u, right=True)[:, 0]
    return idx.clamp_max(logits.shape[-1] - 1)


def _check_args(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature = {temperature}: must be a finite number >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:  # False for NaN too
        raise ValueError(f"top_p = {top_p}: must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k = {top_k}: must be >= 0 (0 = no limit)")


# ---------------------------------------------------------------------------------------------
# Generation
@torch.inference_mode()
def generate_with_state(
    model: nn.Module,
    prompts,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stream: Callable[[int, int], None] | None = None,
    compact: bool = False,
) -> tuple[list[list[int]], InferenceSession]:
    """`generate` with the cache, also returning the session. Unless `compact`, row i of its state
    is prompt i followed by all its returned tokens (the last one fed too, the stop token not): a
    state to continue from (`session.step`), or to inspect (concept caches hold one entry per chunk)."""
    _check_args(max_new_tokens, temperature, top_p, top_k)
    was_training = model.training
    model.eval()
    try:
        batch = prompt_batch(model, prompts)
        B = batch.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        session = InferenceSession(model)
        logits = session.prefill(batch)
        if max_new_tokens == 0:
            return out, session
        gen = _generator(seed, batch.input_ids.device) if temperature > 0 else None
        stops = set(int(i) for i in stop_ids)
        rows = torch.arange(B, device=logits.device)  # original prompt index of each state row
        live = torch.ones(B, dtype=torch.bool, device=logits.device)  # state row still generating
        for _ in range(max_new_tokens):
            u = torch.rand(B, generator=gen, device=gen.device)[rows] if gen is not None else None
            tok = sample_next(logits, temperature, top_p, top_k, u)
            appended = torch.zeros_like(live)
            for j, (r, t) in enumerate(zip(rows.tolist(), tok.tolist())):
                if not live[j] or t in stops:
                    continue
                out[r].append(t)
                appended[j] = True
                if stream is not None:
                    stream(r, t)
            running = appended & torch.tensor([len(out[r]) < max_new_tokens for r in rows.tolist()],
                                              device=live.device)
            if compact:
                if not bool(running.any()):
                    break
                if not bool(running.all()):  # drop finished rows: later steps cost less
                    keep = running.nonzero().squeeze(1)
                    session.select(keep)
                    rows, tok, running = rows[keep], tok[keep], running[keep]
                logits = session.step(tok)
            else:  # feed every returned token (finished rows stand still), so the state covers the output
                if bool(appended.all()):
                    logits = session.step(tok)
                elif bool(appended.any()):
                    logits = session.step(tok, appended)
                if not bool(running.any()):
                    break
            live = running
        return out, session
    finally:
        model.train(was_training)


def _generator(seed: int | None, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@torch.inference_mode()
def generate(
    model,
    prompts,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stream: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids per prompt, stopping at any of `stop_ids` (not included) or after
    `max_new_tokens`.

    model: a `ConceptMoEVLM` (or a bare `ConceptMoE` for text). prompts: a list of
    `data_pipelines.sequence.TokenSequence` (build them with add_eos=False; images as tensors or
    PIL images) or a prompt Batch (one document per row, padding at row ends).
    temperature 0 = greedy; otherwise sampling with top_k (0 = off) and top_p (1 = off),
    reproducible with `seed`. `stream(row, token_id)` is called for each returned token as it is
    produced (steps in order, rows in increasing order within a step). `use_cache=False` recomputes
    the full forward at every step (the reference; quadratic).
    """
    kw = dict(stop_ids=stop_ids, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stream=stream)
    if use_cache:
        return generate_with_state(model, prompts, max_new_tokens, compact=True, **kw)[0]
    return _generate_uncached(model, prompts, max_new_tokens, **kw)


@torch.inference_mode()
def _generate_uncached(model, prompts, max_new_tokens, *, stop_ids, temperature, top_p, top_k, seed,
                       stream) -> list[list[int]]:
    _check_args(max_new_tokens, temperature, top_p, top_k)
    was_training = model.training
    model.eval()
    try:
        batch = prompt_batch(model, prompts)
        B = batch.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        gen = _generator(seed, batch.input_ids.device) if temperature > 0 else None
        stops = set(int(i) for i in stop_ids)
        rows = [(batch.input_ids[r, :n].tolist(), batch.modality[r, :n].tolist())
                for r, n in enumerate(sum(docs) for docs in batch.layout.lengths)]
        active = [True] * B
        for _ in range(max_new_tokens):
            T = max(len(ids) for ids, _ in rows)
            ids = torch.zeros(B, T, dtype=torch.long)
            modality = torch.zeros(B, T, dtype=torch.long)
            for r, (i, m) in enumerate(rows):
                ids[r, :len(i)], modality[r, :len(m)] = torch.tensor(i), torch.tensor(m)
            full = Batch(ids, modality, DocumentLayout.from_lengths([[len(i)] for i, _ in rows], T),
                         images=batch.images, image_tokens=batch.image_tokens).to(batch.input_ids.device)
            logits = last_token_logits(model(full).logits, full)
            u = torch.rand(B, generator=gen, device=logits.device) if gen is not None else None
            tok = sample_next(logits, temperature, top_p, top_k, u).tolist()
            for r, t in enumerate(tok):
                if not active[r]:
                    continue
                if t in stops:
                    active[r] = False
                    continue
                out[r].append(t)
                if stream is not None:
                    stream(r, t)
                rows[r][0].append(t)
                rows[r][1].append(int(Modality.TEXT))
                if len(out[r]) == max_new_tokens:
                    active[r] = False
            if not any(active):
                break
        return out
    finally:
        model.train(was_training)


def generate_text(model, tokenizer, text_or_pieces, max_new_tokens: int = 64, *,
                  stop_ids: Sequence[int] | None = None, tokens_per_image: int | None = None,
                  **kwargs) -> str:
    """Generate a continuation of one prompt (a string, or a list of text pieces and images) and
    decode it. Stops at the tokenizer's eos unless `stop_ids` says otherwise; other keyword
    arguments go to `generate`."""
    from data_pipelines.sequence import build_sequence

    pieces = [text_or_pieces] if isinstance(text_or_pieces, str) else list(text_or_pieces)
    if _is_vlm(model) and model.cfg.vision.max_tiles:  # tiles: the transform decides the layout
        tf = model.image_transform(train=False)
        pieces = [p if isinstance(p, (str, torch.Tensor)) else tf(p) for p in pieces]
    if tokens_per_image is None:
        tokens_per_image = model.sequence_tokens_per_image() if _is_vlm(model) else 0
    seq = build_sequence(pieces, tokenizer, tokens_per_image, add_bos=True, add_eos=False)
    stops = (tokenizer.eos_id,) if stop_ids is None else tuple(stop_ids)
    return tokenizer.decode(generate(model, [seq], max_new_tokens, stop_ids=stops, **kwargs)[0])


__all__ = ["generate", "generate_text", "generate_with_state", "prompt_batch", "sample_next"]

"""Text generation with caches at every level (spec §9): greedy or sampled, stop ids, streaming.

    tokens = generate(model, [seq_a, seq_b], max_new_tokens=32, stop_ids=[tok.eos_id])
    text = generate_text(model, tok, ["Describe ", image, ":"], max_new_tokens=32)

Prefill is one cached forward over the prompts (the concept model runs on the compressed
sequence). Each decode step feeds one token per row: the encoder and decoder caches grow by one,
the concept caches only for rows whose new token is a boundary (the other rows skip the concept
model). Prompts of different lengths share a batch as left-aligned rows with per-row lengths
(doc_ids −1 marks the padded tail, which enters no cache). Rows that finish stop advancing their
state; `generate` also drops them from the batch so later steps cost less.

`use_cache=False` recomputes the full forward over prompt + generated tokens at every step: the
reference that the cached path must match token for token.

Sampling draws one uniform number per prompt per step from a generator seeded with `seed`, and
picks the token by inverse CDF, so a row's samples do not depend on which other rows are still
running (or on the cache): the same seed gives the same tokens with and without the cache.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence as SequenceABC
from typing import Any

import torch
from torch import nn

from .chunking import IMAGE, TEXT
from .model import ConceptMoE, InferenceState

Prompts = "list[data_pipelines.sequence.Sequence] | dict[str, torch.Tensor]"


# ---------------------------------------------------------------------------------------------
# Prompt batches
def _is_vlm(model: nn.Module) -> bool:
    return hasattr(model, "lm") and hasattr(model, "vision")


def _image_tensor(model: nn.Module, img: Any, cache: dict) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    if "tf" not in cache:  # PIL image: the encoder's eval transform
        from vision.transforms import build_image_transform
        cache["tf"] = build_image_transform(model.vision, train=False)
    return cache["tf"](img)


def prompt_batch(model: nn.Module, prompts) -> dict[str, torch.Tensor]:
    """Prompts -> batch dict of left-aligned rows: input_ids, modality, doc_ids (0 token, −1 padding
    at the end), images (N, 3, H, W) in row order, lengths (B,).

    `prompts` is a list of `data_pipelines.sequence.Sequence` (images as tensors or PIL images) or
    a batch dict with input_ids (B, T) and optionally modality, images and doc_ids (one document
    per row; −1 marks padding at a row's end)."""
    device = next(model.parameters()).device
    if isinstance(prompts, dict):
        ids = prompts["input_ids"]
        B, T = ids.shape
        modality = prompts.get("modality")
        modality = torch.zeros_like(ids) if modality is None else modality
        doc_ids = prompts.get("doc_ids")
        doc_ids = torch.zeros_like(ids) if doc_ids is None else doc_ids
        lengths = ConceptMoE._span_lengths(doc_ids, B, T, ids.device)
        images = prompts.get("images")
        batch = {"input_ids": ids, "modality": modality, "doc_ids": doc_ids, "lengths": lengths}
        if images is not None:
            batch["images"] = images
    else:
        if not isinstance(prompts, SequenceABC) or not prompts:
            raise ValueError("prompts: expected a non-empty list of Sequence or a batch dict")
        lengths = torch.tensor([len(s) for s in prompts], dtype=torch.long)
        if int(lengths.min()) == 0:
            raise ValueError(f"prompt {int(lengths.argmin())} is empty: a prompt needs at least one token "
                             f"(build it with add_bos=True)")
        B, T = len(prompts), int(lengths.max())
        pad = 0
        ids = torch.full((B, T), pad, dtype=torch.long)
        modality = torch.zeros(B, T, dtype=torch.long)
        doc_ids = torch.full((B, T), -1, dtype=torch.long)
        images, tf_cache = [], {}
        for r, s in enumerate(prompts):
            n = len(s)
            ids[r, :n] = torch.tensor(s.input_ids, dtype=torch.long)
            modality[r, :n] = torch.tensor(s.modality, dtype=torch.long)
            doc_ids[r, :n] = 0
            images += [_image_tensor(model, img, tf_cache) for img in s.images]
        batch = {"input_ids": ids, "modality": modality, "doc_ids": doc_ids, "lengths": lengths}
        if images:
            batch["images"] = torch.stack(images)
    if int((batch["modality"] == IMAGE).sum()) and not _is_vlm(model):
        raise ValueError("prompts hold images but the model is a text-only ConceptMoE")
    return {k: v.to(device) for k, v in batch.items()}


def _forward(model: nn.Module, ids, modality, doc_ids, images=None, state: InferenceState | None = None):
    """Logits (B, T, V) of the VLM or the bare LM."""
    if _is_vlm(model):
        return model(ids, modality=modality, images=images, doc_ids=doc_ids, state=state).logits
    return model(ids, modality=modality, doc_ids=doc_ids, state=state).logits


def _new_state(model: nn.Module, batch_size: int) -> InferenceState:
    return (model.lm if _is_vlm(model) else model).new_state(batch_size)


def _last(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B,) -> logits at each row's last valid token (B, V)."""
    idx = (lengths - 1).clamp_min(0)
    return logits.gather(1, idx[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]


# ---------------------------------------------------------------------------------------------
# Cached steps (also used by the latency benchmark)
@torch.inference_mode()
def prefill(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[InferenceState, torch.Tensor]:
    """One cached forward over the prompt batch (see `prompt_batch`). Returns the state and the
    logits of each row's last prompt token (B, V)."""
    state = _new_state(model, batch["input_ids"].shape[0])
    logits = _forward(model, batch["input_ids"], batch["modality"], batch["doc_ids"], batch.get("images"), state)
    return state, _last(logits, batch["lengths"])


@torch.inference_mode()
def decode_step(model: nn.Module, state: InferenceState, tokens: torch.Tensor,
                active: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one text token per row (B,); rows with active = False do not advance. Returns (B, V)."""
    ids = tokens[:, None]
    doc = None if active is None else torch.where(active[:, None], 0, -1)  # None: every row advances
    return _forward(model, ids, torch.full_like(ids, TEXT), doc, None, state)[:, 0]


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
    if temperature < 0:
        raise ValueError(f"temperature = {temperature}: must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
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
    stop_ids: SequenceABC[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stream: Callable[[int, int], None] | None = None,
    compact: bool = False,
) -> tuple[list[list[int]], InferenceState]:
    """`generate` with the cache, also returning the final state. Unless `compact`, row i of the
    state is prompt i followed by all its returned tokens (the last one fed too, the stop token not):
    a state to continue from, or to inspect (concept caches hold one entry per chunk). Its tensors
    are made under `torch.inference_mode` (as in `prefill` and `decode_step`: cheaper per op than
    no_grad, which counts at ~6 µs per small op on CPU): continue it with `decode_step`, or inside
    `torch.inference_mode()`, since writing to them outside it raises."""
    _check_args(max_new_tokens, temperature, top_p, top_k)
    was_training = model.training
    model.eval()
    try:
        batch = prompt_batch(model, prompts)
        B = batch["input_ids"].shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        if max_new_tokens == 0:
            state, _ = prefill(model, batch)
            return out, state
        gen = _generator(seed, batch["input_ids"].device) if temperature > 0 else None
        stops = set(int(i) for i in stop_ids)
        state, logits = prefill(model, batch)
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
                    state.select(keep)
                    rows, tok, running = rows[keep], tok[keep], running[keep]
                logits = decode_step(model, state, tok)
            else:  # feed every returned token (finished rows stand still), so the state covers the output
                if bool(appended.all()):
                    logits = decode_step(model, state, tok)
                elif bool(appended.any()):
                    logits = decode_step(model, state, tok, appended)
                if not bool(running.any()):
                    break
            live = running
        return out, state
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
    stop_ids: SequenceABC[int] = (),
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
    `data_pipelines.sequence.Sequence` (build them with add_eos=False; images as tensors or PIL
    images) or a batch dict (input_ids, modality, images, doc_ids with −1 padding at row ends).
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
        B = batch["input_ids"].shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        gen = _generator(seed, batch["input_ids"].device) if temperature > 0 else None
        stops = set(int(i) for i in stop_ids)
        lengths = batch["lengths"].clone()
        ids, modality, doc = batch["input_ids"], batch["modality"], batch["doc_ids"]
        active = [True] * B
        for _ in range(max_new_tokens):
            T = int(lengths.max())
            if ids.shape[1] < T:  # room for one more token in every row
                grow = T - ids.shape[1]
                ids = torch.cat([ids, ids.new_zeros(B, grow)], 1)
                modality = torch.cat([modality, modality.new_zeros(B, grow)], 1)
                doc = torch.cat([doc, doc.new_full((B, grow), -1)], 1)
            logits = _last(_forward(model, ids[:, :T], modality[:, :T], doc[:, :T], batch.get("images")), lengths)
            u = torch.rand(B, generator=gen, device=logits.device) if gen is not None else None
            tok = sample_next(logits, temperature, top_p, top_k, u).tolist()
            grow_rows = []
            for r, t in enumerate(tok):
                if not active[r]:
                    continue
                if t in stops:
                    active[r] = False
                    continue
                out[r].append(t)
                if stream is not None:
                    stream(r, t)
                grow_rows.append(r)
                if len(out[r]) == max_new_tokens:
                    active[r] = False
            if not any(active):
                break
            if int(lengths.max()) + 1 > ids.shape[1]:
                ids = torch.cat([ids, ids.new_zeros(B, 1)], 1)
                modality = torch.cat([modality, modality.new_zeros(B, 1)], 1)
                doc = torch.cat([doc, doc.new_full((B, 1), -1)], 1)
            for r in grow_rows:
                n = int(lengths[r])
                ids[r, n], modality[r, n], doc[r, n] = tok[r], TEXT, 0
                lengths[r] += 1
        return out
    finally:
        model.train(was_training)


def generate_text(model, tokenizer, text_or_pieces, max_new_tokens: int = 64, *,
                  stop_ids: SequenceABC[int] | None = None, tokens_per_image: int | None = None,
                  **kwargs) -> str:
    """Generate a continuation of one prompt (a string, or a list of text pieces and images) and
    decode it. Stops at the tokenizer's eos unless `stop_ids` says otherwise; other keyword
    arguments go to `generate`."""
    from data_pipelines.sequence import build_sequence

    pieces = [text_or_pieces] if isinstance(text_or_pieces, str) else list(text_or_pieces)
    if tokens_per_image is None:
        tokens_per_image = model.cfg.tokens_per_image if _is_vlm(model) else 0
    seq = build_sequence(pieces, tokenizer, tokens_per_image, add_bos=True, add_eos=False)
    stops = (tokenizer.eos_id,) if stop_ids is None else tuple(stop_ids)
    return tokenizer.decode(generate(model, [seq], max_new_tokens, stop_ids=stops, **kwargs)[0])


__all__ = ["generate", "generate_text", "generate_with_state", "prompt_batch", "prefill", "decode_step",
           "sample_next"]

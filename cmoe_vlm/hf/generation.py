"""transformers' calling conventions on our model: attention masks, pixel values, and `generate()`
over our concept-level cache (docs/design.md §9, "transformers").

`ConceptCache` is a transformers `Cache` that holds an `InferenceSession`: `generate()` (greedy,
sampling, beam search, `pipeline("text-generation")`) prefills it with one cached forward over the
prompts and then feeds one token per row through `ConceptMoE.step`, so the concept model runs only
on the rows whose token closes a concept, exactly as in `cmoe_vlm.inference.generation`.

Attention masks follow the decoder-only convention: a row's tokens are its positions with mask 1,
counted from position 0 (left padding, right padding and holes alike); a masked position is no
token at all (it enters no cache and nothing attends to it). Rows are moved to the layout the model
takes (tokens at the row's start, padding at its end) and the logits moved back, so a padded row
gives the logits it gives alone.

Images: `pixel_values` (N, 3, H, W) fill the image positions, which `mm_token_type_ids` (or our
`modality`) marks with 1 (the processor returns them); with neither, the positions holding
`config.image_token_id` are the image positions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from cmoe_base import IGNORE_INDEX, Batch, DocumentLayout, Modality

from ..inference.session import InferenceSession
from ..model.vlm import ConceptMoEVLM

# Keyword arguments transformers passes to every forward that we have no use for (when None or False).
IGNORED_KWARGS = ("return_dict", "output_attentions", "output_hidden_states", "logits_to_keep")


class ConceptCache(Cache):
    """Our per-stage decoding state (`DecodingState`, through an `InferenceSession`) behind
    transformers' `Cache` interface. `get_seq_length` counts input columns fed (transformers' view,
    padding included); each row's own token count is `session.num_tokens`."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.session: InferenceSession | None = None
        self.columns = 0

    def bind(self, model: ConceptMoEVLM) -> InferenceSession:
        if self.session is None:
            self.session = InferenceSession(model)
        elif self.session.model is not model:
            raise ValueError("this ConceptCache holds the state of another model")
        return self.session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.session is not None and self.session.state is not None

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        return -1 if not self.is_initialized else int(self.session.num_tokens.shape[0])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row beam_idx[i] (beam search; repeats allowed)."""
        if self.is_initialized:
            self.session.select(beam_idx.to(self.session.num_tokens.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.batch_size, device=self.session.num_tokens.device)
            self.session.select(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("ConceptCache cannot drop tokens: the concept state (chunk carry, c̄, "
                                      "concept caches) has no rollback, so assisted decoding is not supported")

    def reset(self) -> None:
        self.session, self.columns = None, 0

    def activate_past_recording(self) -> None:
        """Nothing is recorded: `crop` refuses instead."""

    def forward(self, model: ConceptMoEVLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                modality: torch.Tensor | None, images: torch.Tensor | None,
                image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Feed the next columns (B, S) of every row; attention_mask covers all columns fed so far
        plus these (transformers' convention) or only these. Returns logits (B, S, V), column for
        column (masked columns: meaningless values)."""
        session = self.bind(model)
        B, S = input_ids.shape
        new = None if attention_mask is None else attention_mask[:, -S:].bool()
        text = images is None and (modality is None or not bool((modality == Modality.IMAGE).any()))
        if S == 1 and text and session.state is not None:  # a decoding step: ConceptMoE.step
            active = None if new is None or bool(new.all()) else new[:, 0]
            logits = session.step(input_ids[:, 0], active)[:, None]
        else:
            batch, order = aligned_batch(input_ids, new, modality, images, image_sizes)
            logits = restore_columns(session.extend(batch).logits, order)
        self.columns += S
        return logits


# ---------------------------------------------------------------------------------------------
# Masks -> the layout the model takes
def token_order(mask: torch.Tensor | None) -> torch.Tensor | None:
    """mask (B, T) -> the permutation (B, T) that moves each row's tokens (mask 1), in order, to the
    row's start; None when they are there already (no padding, or right padding only)."""
    if mask is None or not bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        return None
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


def gather_columns(t: torch.Tensor | None, order: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or order is None:
        return t
    return t.gather(1, order)


def restore_columns(logits: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Undo `token_order` on (B, T, V) logits."""
    if order is None:
        return logits
    return torch.empty_like(logits).scatter_(1, order[..., None].expand_as(logits), logits)


def host_sizes(image_sizes: torch.Tensor | None) -> tuple[tuple[int, int], ...] | None:
    """image_sizes (N, 2) (transformers' LLaVA-NeXT convention: each image's (H, W)) -> host tuples."""
    return None if image_sizes is None else tuple(tuple(s) for s in torch.as_tensor(image_sizes).tolist())


def aligned_batch(input_ids: torch.Tensor, mask: torch.Tensor | None, modality: torch.Tensor | None,
                  images: torch.Tensor | None,
                  image_sizes: torch.Tensor | None = None) -> tuple[Batch, torch.Tensor | None]:
    """Rows of one document each, tokens first (`token_order`), and the permutation used."""
    B, T = input_ids.shape
    order = token_order(mask)
    input_ids, modality = gather_columns(input_ids, order), gather_columns(modality, order)
    if mask is None:
        layout = DocumentLayout.single(B, T, input_ids.device)
    else:
        layout = DocumentLayout.from_lengths([[n] if n else [] for n in mask.sum(1).tolist()], T).to(input_ids.device)
    modality = torch.full_like(input_ids, Modality.TEXT) if modality is None else modality
    image_tokens = int((modality == Modality.IMAGE).sum())
    return Batch(input_ids, modality, layout, images=images, image_tokens=image_tokens,
                 image_sizes=host_sizes(image_sizes)), order


def packed_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, modality: torch.Tensor | None,
                 images: torch.Tensor | None, doc_ids: torch.Tensor | None,
                 labels: torch.Tensor | None,
                 image_sizes: torch.Tensor | None = None) -> tuple[Batch, torch.Tensor | None]:
    """The full (uncached) forward's batch: our packed `doc_ids` if given, else one document per row
    from the attention mask; transformers-style labels shifted onto our targets."""
    for name, t in (("attention_mask", attention_mask), ("labels", labels), ("doc_ids", doc_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}: they must match")
    if doc_ids is not None:
        if attention_mask is not None and not torch.equal(attention_mask.bool(), doc_ids >= 0):
            raise ValueError("attention_mask and doc_ids disagree: give one of them (doc_ids −1 marks padding)")
        batch, order = Batch.of(input_ids, modality=modality, doc_ids=doc_ids, images=images,
                                image_sizes=host_sizes(image_sizes)), None
    else:
        mask = None if attention_mask is None else attention_mask.bool()
        batch, order = aligned_batch(input_ids, mask, modality, images, image_sizes)
    if labels is not None:
        labels = shift_hf_labels(gather_columns(labels, order), batch.modality, batch.doc_ids)
    batch.labels = labels
    return batch, order


def shift_hf_labels(labels: torch.Tensor, modality: torch.Tensor | None, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """transformers-style labels (B, T) -> ours: target of position t is labels[t+1] when t+1 is a
    text token of the same document; −100 otherwise."""
    from data_pipelines.sequence import shift_labels
    modality = torch.zeros_like(labels) if modality is None else modality
    doc_ids = torch.zeros_like(labels) if doc_ids is None else doc_ids
    shifted = shift_labels(labels.clamp_min(0), modality, doc_ids)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    return shifted.masked_fill(ignored, IGNORE_INDEX)


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """input_ids of shape (B, T) with B, T >= 1 and every id in [0, vocab_size)."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: expected (batch, tokens), both >= 1")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids hold ids from {low} to {high}: the model's vocabulary is 0..{vocab_size - 1}")


def resolve_modality(input_ids: torch.Tensor, modality: torch.Tensor | None, mm_token_type_ids: torch.Tensor | None,
                     images: torch.Tensor | None, image_token_id: int | None) -> torch.Tensor | None:
    """Which positions are image positions: `modality`, else `mm_token_type_ids`, else (with images)
    the positions holding `image_token_id`; None = all text."""
    if modality is not None and mm_token_type_ids is not None and not torch.equal(modality, mm_token_type_ids):
        raise ValueError("modality and mm_token_type_ids disagree: give one of them")
    given = modality if modality is not None else mm_token_type_ids
    if given is not None or images is None:
        return given
    if image_token_id is None:
        raise ValueError("pixel_values without mm_token_type_ids: pass the mm_token_type_ids the processor returns "
                         "(1 at image positions), or set config.image_token_id")
    return (input_ids == image_token_id).long()


def check_no_other_inputs(kwargs: dict[str, Any]) -> None:
    """Refuse inputs we would otherwise ignore (position_ids: positions come from the mask)."""
    given = sorted(k for k, v in kwargs.items() if v is not None and v is not False
                   and not (k in IGNORED_KWARGS and v in (True, 0)))
    if given:
        raise TypeError(f"ConceptMoEForCausalLM.forward got unsupported inputs {given}: it takes input_ids, "
                        f"attention_mask (positions come from it), labels, pixel_values, mm_token_type_ids "
                        f"(or modality), doc_ids, cache and use_cache")


# ---------------------------------------------------------------------------------------------
# GenerationMixin hooks
class ConceptGeneration:
    """The GenerationMixin methods the transformers wrapper overrides: our cache, `modality` and
    `images` (our names) carried through the steps, images expanded with their rows."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int) -> None:
        """Our cache for generate(), which calls this once, with the prompts' full attention mask: also
        where right-padded prompts are refused (the next token of a row follows its last column)."""
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise ValueError("generate: right-padded prompts (attention_mask ends in 0): the next token of a row "
                             "follows its last column, so pad on the left (tokenizer.padding_side = 'left')")
        user = model_kwargs.get("cache")
        if user is not None:
            if not isinstance(user, ConceptCache):
                raise TypeError(f"cache: a {type(user).__name__}; this model decodes with its concept-level "
                                f"cmoe_vlm.hf.generation.ConceptCache (or pass none)")
            user._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation = {generation_config.cache_implementation!r}: this model has "
                             f"its own concept-level cache; leave cache_implementation unset")
        model_kwargs["cache"] = ConceptCache()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, modality: torch.Tensor | None = None,
                                      images: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        if images is not None:  # our name for pixel_values: the same handling (prefill only, with a cache)
            kwargs["pixel_values"] = images
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if modality is not None:  # the prompt's; generated tokens are text
            full = F.pad(modality, (0, input_ids.shape[1] - modality.shape[1]), value=int(Modality.TEXT))
            inputs["modality"] = full[:, -inputs["input_ids"].shape[1]:]
        return inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.Tensor | None = None, **model_kwargs: Any):
        """Beams and num_return_sequences repeat each row; its images are repeated with it (transformers
        would repeat each image, which is only right with one image per row)."""
        images = {k: model_kwargs.pop(k) for k in ("pixel_values", "images", "image_sizes")
                  if model_kwargs.get(k) is not None}
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if images and expand_size > 1:
            modality = resolve_modality(input_ids, model_kwargs.get("modality"), model_kwargs.get("mm_token_type_ids"),
                                        next(iter(images.values())), getattr(self.config, "image_token_id", None))
            is_image = modality == Modality.IMAGE  # images per row: image runs (they differ in length at their own size)
            per_row = (is_image[:, 1:] & ~is_image[:, :-1]).sum(1)[::expand_size] + is_image[::expand_size, 0]
            first = torch.cumsum(per_row, 0) - per_row
            index = torch.cat([torch.arange(int(n), device=per_row.device) + int(f)
                               for f, n in zip(first.tolist(), per_row.tolist()) for _ in range(expand_size)])
            images = {k: v[index.to(v.device)] for k, v in images.items()}
        return input_ids, {**model_kwargs, **images}

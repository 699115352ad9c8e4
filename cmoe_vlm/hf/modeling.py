"""transformers' config and model classes: `AutoModelForCausalLM.from_pretrained(folder)` works offline.

The export folder (`cmoe_vlm.checkpoints.export.save_pretrained`) is a transformers folder: its config.json
carries `model_type: cmoe_vlm` next to our own fields, and model.safetensors holds the weights
under the same names `ConceptMoEForCausalLM` uses. `import cmoe_vlm.hf` registers the classes.

Labels follow the transformers convention here (unshifted: the model shifts them, within a
document, and never asks to predict an image position); `ConceptMoEVLM` itself takes them
already shifted, as the data pipeline produces them. Attention masks, pixel values and
`generate()` over our concept-level cache: generation.py; the processors: processing.py; what an
export adds for transformers (processor config, remote code): cmoe_vlm/checkpoints/remote_code.py
(docs/design.md §15).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from data_pipelines.tokenizer import ByteTokenizer

from ..checkpoints.export import VERSION, resolve_files
from ..checkpoints.remote_code import AUTO_MAP, write_transformers_files
from ..config import from_dict, to_dict
from ..model.conceptmoe import LEGACY_KEYS
from ..model.vlm import ConceptMoEVLM, VLMConfig
from ..objective import Objective
from .generation import (ConceptCache, ConceptGeneration, check_input_ids, check_no_other_inputs, packed_batch,
                         resolve_modality, restore_columns)

MODEL_TYPE = "cmoe_vlm"


class ConceptMoEConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vlm: dict[str, Any] | None = None, tokenizer: str = "byte", **kwargs):
        self.vlm = vlm if vlm is not None else to_dict(VLMConfig())
        self.tokenizer = tokenizer
        model = self.vlm.get("model", {})
        kwargs.setdefault("vocab_size", model.get("vocab_size", 262))
        if tokenizer == "byte":  # exports carry their tokenizer's ids; older byte-tokenizer ones did not
            kwargs.setdefault("bos_token_id", ByteTokenizer.bos_id)
            kwargs.setdefault("eos_token_id", ByteTokenizer.eos_id)
            kwargs.setdefault("pad_token_id", ByteTokenizer.pad_id)
        super().__init__(**kwargs)

    def vlm_config(self) -> VLMConfig:
        """Validated VLMConfig (fields missing from older files take their defaults; a vision tower folder
        inside the export resolved against it)."""
        return resolve_files(from_dict(VLMConfig, self.vlm), self.name_or_path)


class ConceptMoEForCausalLM(ConceptGeneration, PreTrainedModel, GenerationMixin):
    config_class = ConceptMoEConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    # the ratio controller's state, which exports held before it became the training loop's (cmoe_vlm/objective.py)
    _keys_to_ignore_on_load_unexpected = [r"^lm\.ratio_mu$"]

    def __init__(self, config: ConceptMoEConfig):
        super().__init__(config)
        vlm = ConceptMoEVLM(config.vlm_config())
        # Same attribute names as ConceptMoEVLM, so the export's weight names load unchanged.
        self.vision, self.projector, self.lm = vlm.vision, vlm.projector, vlm.lm
        self._vlm = [vlm]  # a list: not registered twice as a submodule
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Our modules initialise themselves (identity chunk projections, zero-init joint decoding
        after conversion): transformers must not re-initialise them."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Export folders of format version 1 keep their weights under older names: they load through
        a key mapping (transformers' loader does not call the model's own load_state_dict hook). A
        folder whose weights do not match its config (missing, unexpected or mis-shaped tensors) is
        refused, as `load_pretrained` refuses it, rather than loaded with random or dropped weights."""
        config = Path(pretrained_model_name_or_path) / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("version", 1) < VERSION:
            kwargs.setdefault("key_mapping", dict((rf"^lm\.{p[1:]}", f"lm.{r}") if p.startswith("^") else (p, r)
                                                  for p, r in LEGACY_KEYS))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        wrong = {k: sorted(map(str, v))[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                 if (v := info.get(k))}
        if wrong:
            raise ValueError(f"{pretrained_model_name_or_path}: model.safetensors does not match its config.json "
                             f"({'; '.join(f'{k}: {v}' for k, v in wrong.items())}): not loaded with random or "
                             "dropped weights")
        if getattr(model.config, "parts", None) == ["lm"]:
            warnings.warn(f"{pretrained_model_name_or_path}: an import of a language model only: its vision tower "
                          "and projector are random placeholders, so image inputs mean nothing until it is trained "
                          "on images", stacklevel=2)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, plus what our export adds for transformers (processor config, remote code)."""
        self.config.auto_map = AUTO_MAP
        super().save_pretrained(save_directory, *args, **kwargs)
        write_transformers_files(save_directory, self.vlm)

    @property
    def vlm(self) -> ConceptMoEVLM:
        return self._vlm[0]

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, modality: torch.Tensor | None = None,
                images: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, cache: ConceptCache | None = None,
                use_cache: bool | None = None, image_sizes: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """transformers' conventions (cmoe_vlm/hf/generation.py): attention_mask (B, T) marks each row's
        tokens, anywhere in the row (positions count them from 0); pixel_values (N, 3, H, W) (or
        `images`) fill the image positions that mm_token_type_ids (or `modality`) mark with 1;
        `doc_ids` (B, T) instead of a mask gives packed documents (−1 padding at row ends). Images at
        their own size (vision.max_pixels) come padded to the largest, with `image_sizes` (N, 2) each
        one's (H, W), as the processor returns them. With a
        `cache` (or use_cache=True) the columns extend its decoding state: generate() decodes so."""
        check_no_other_inputs(kwargs)
        check_input_ids(input_ids, self.vlm.cfg.model.vocab_size)
        images = pixel_values if pixel_values is not None else images
        modality = resolve_modality(input_ids, modality, mm_token_type_ids, images,
                                    getattr(self.config, "image_token_id", None))
        if cache is not None or use_cache:
            if labels is not None or doc_ids is not None:
                raise ValueError("labels and doc_ids need the full forward: pass use_cache=False")
            cache = ConceptCache() if cache is None else cache
            logits = cache.forward(self.vlm, input_ids, attention_mask, modality, images, image_sizes)
            return CausalLMOutputWithPast(logits=logits, cache=cache)
        batch, order = packed_batch(input_ids, attention_mask, modality, images, doc_ids, labels, image_sizes)
        out = self.vlm(batch)
        loss = None if labels is None else Objective(self.vlm.cfg.model)(out, batch).total
        return CausalLMOutputWithPast(loss=loss, logits=restore_columns(out.logits, order))


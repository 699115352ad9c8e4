"""Hugging Face transformers integration: `AutoModelForCausalLM.from_pretrained(folder)` works offline.

The export folder (`cmoe_vlm.export.save_pretrained`) is a transformers folder: its config.json
carries `model_type: cmoe_vlm` next to our own fields, and model.safetensors holds the weights
under the same names `ConceptMoEForCausalLM` uses. `import cmoe_vlm.hf` registers the classes.

Labels follow the transformers convention here (unshifted: the model shifts them, within a
document, and never asks to predict an image position); `ConceptMoEVLM` itself takes them
already shifted, as the data pipeline produces them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from cmoe_base import IGNORE_INDEX, Batch
from data_pipelines.tokenizer import ByteTokenizer

from .config import from_dict, to_dict
from .export import VERSION, resolve_files
from .model import LEGACY_KEYS
from .vlm import ConceptMoEVLM, VLMConfig

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


class ConceptMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ConceptMoEConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_cache_class = False

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
        a key mapping (transformers' loader does not call the model's own load_state_dict hook)."""
        config = Path(pretrained_model_name_or_path) / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("version", 1) < VERSION:
            kwargs.setdefault("key_mapping", dict((rf"^lm\.{p[1:]}", f"lm.{r}") if p.startswith("^") else (p, r)
                                                  for p, r in LEGACY_KEYS))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @property
    def vlm(self) -> ConceptMoEVLM:
        return self._vlm[0]

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, modality: torch.Tensor | None = None,
                images: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, **_: Any) -> CausalLMOutput:
        """Full forward (no cache: transformers' generate recomputes; `cmoe_vlm.generation` is the
        cached path). attention_mask marks right padding (0) as its own, ignored document."""
        if doc_ids is None and attention_mask is not None:
            doc_ids = torch.where(attention_mask.bool(), 0, -1)
        ours = None if labels is None else shift_hf_labels(labels, modality, doc_ids)
        out = self.vlm(Batch.of(input_ids, modality=modality, doc_ids=doc_ids, labels=ours, images=images))
        return CausalLMOutput(loss=out.loss, logits=out.logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                **{k: kwargs[k] for k in ("modality", "images") if kwargs.get(k) is not None}}


AutoConfig.register(MODEL_TYPE, ConceptMoEConfig)
AutoModelForCausalLM.register(ConceptMoEConfig, ConceptMoEForCausalLM)

"""cmoe-vlm: vision-language models on ConceptMoE (learned chunking of tokens into concepts in an MoE LM).

Importing the package registers the model with transformers' Auto classes (`cmoe_vlm.hf`).
"""
from . import hf  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM for model_type "cmoe_vlm")

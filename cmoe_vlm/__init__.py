"""cmoe-vlm: vision-language models on ConceptMoE (learned chunking of tokens into concepts in an MoE LM).

`import cmoe_vlm.hf` registers the model with transformers' Auto classes (kept out of the package
import: transformers takes seconds to import).
"""
import cmoe_base  # noqa: F401  first: its runtime defaults must precede torch (cmoe_base/runtime.py)

"""transformers integration: `import cmoe_vlm.hf` registers model_type "cmoe_vlm" with the Auto classes
(config, causal LM, processor, image processor), so an export folder loads with
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` (docs/design.md §15).

    modeling.py    ConceptMoEConfig, ConceptMoEForCausalLM
    processing.py  ConceptMoEProcessor, ConceptMoEImageProcessor
    generation.py  attention masks, pixel values, the concept-level cache (ConceptCache) and generate()'s hooks
"""
import sys

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

from . import processing
from .modeling import MODEL_TYPE, ConceptMoEConfig, ConceptMoEForCausalLM
from .processing import ConceptMoEImageProcessor, ConceptMoEProcessor

__all__ = ["MODEL_TYPE", "ConceptMoEConfig", "ConceptMoEForCausalLM", "ConceptMoEImageProcessor", "ConceptMoEProcessor"]

# Served from an export's bundle (trust_remote_code without cmoe-vlm installed) the folder's auto_map
# names the config and model classes: registering them here would make every later export in the
# process build its model with this bundle's code instead of its own.
if not hasattr(getattr(__spec__, "loader", None), "bundled_files"):
    AutoConfig.register(MODEL_TYPE, ConceptMoEConfig)
    AutoModelForCausalLM.register(ConceptMoEConfig, ConceptMoEForCausalLM)
AutoImageProcessor.register(ConceptMoEConfig, image_processor_classes={  # one class: timm's transform
    "torchvision": ConceptMoEImageProcessor, "pil": ConceptMoEImageProcessor})
AutoProcessor.register(ConceptMoEConfig, ConceptMoEProcessor)

# Exports written before this package existed (main 69f0ad8 and earlier) import the processors by their
# module name of that time when cmoe-vlm is installed (their modeling_cmoe_vlm.py, right after this package).
sys.modules.setdefault("cmoe_vlm.hf_processing", processing)

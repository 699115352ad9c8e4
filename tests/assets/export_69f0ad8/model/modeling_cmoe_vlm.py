"""cmoe-vlm's transformers classes for this folder (written by cmoe_vlm/hf_folder.py).

With cmoe-vlm installed they come from it; otherwise from the source files in cmoe_vlm_code.py,
which a meta-path finder serves as the packages cmoe_base, vision, data_pipelines and cmoe_vlm.
Needs torch, timm, safetensors and pillow besides transformers.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

from .cmoe_vlm_code import FILES

PACKAGES = {name.split("/")[0] for name in FILES}


class BundledSources(importlib.abc.MetaPathFinder, importlib.abc.SourceLoader):
    """Imports the packages of FILES from their sources (module files "<cmoe_vlm_code>/cmoe_vlm/model.py", ...)."""

    def _path(self, fullname):
        base = fullname.replace(".", "/")
        return next((p for p in (base + "/__init__.py", base + ".py") if p in FILES), None)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in PACKAGES or self._path(fullname) is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=self.get_filename(fullname),
                                              is_package=self._path(fullname).endswith("/__init__.py"))
        spec.has_location = True
        return spec

    def get_filename(self, fullname):
        return "<cmoe_vlm_code>/" + self._path(fullname)

    def get_data(self, path):
        return "\n".join(FILES[path[len("<cmoe_vlm_code>/"):]]).encode("utf-8")

    def bundled_files(self):
        return FILES


if importlib.util.find_spec("cmoe_vlm") is None and not any(isinstance(f, BundledSources) for f in sys.meta_path):
    sys.meta_path.insert(0, BundledSources())

hf = importlib.import_module("cmoe_vlm.hf")
processing = importlib.import_module("cmoe_vlm.hf_processing")


class ConceptMoEConfig(hf.ConceptMoEConfig):
    pass


class ConceptMoEForCausalLM(hf.ConceptMoEForCausalLM):
    config_class = ConceptMoEConfig


class ConceptMoEImageProcessor(processing.ConceptMoEImageProcessor):
    pass


class ConceptMoEProcessor(processing.ConceptMoEProcessor):
    pass

"""The transformers side of an export folder: the processor's config, and remote code so that
`trust_remote_code=True` loads the folder where cmoe-vlm is not installed.

    meta = write_transformers_files(folder, model)   # called by cmoe_vlm.checkpoints.export.save_pretrained

processor_config.json holds what `AutoProcessor` builds `ConceptMoEProcessor` from (tokens per
image, the image processor's data config); its tokenizer is the folder's.

transformers copies a model folder's `auto_map` modules (and the files they import relatively) and
imports them; it checks that every package those files import is installed. Our model is four
packages (cmoe_base, vision, data_pipelines, cmoe_vlm), so an export carries

    modeling_cmoe_vlm.py   subclasses of the transformers classes (config, model, processors)
    cmoe_vlm_code.py       the source files they run: the import closure of cmoe_vlm.hf, each file
                           as a list of its lines

`modeling_cmoe_vlm.py` serves those files to Python's import system (a meta-path finder) when
cmoe-vlm is not installed; when it is, the installed package is used. Beyond transformers the code
needs what our model needs: torch, timm, safetensors, pillow. Lines are stored quoted, one string
per line, so the files stay readable and transformers' scan for relative imports (a regex over
each copied file) finds nothing in them.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

from data_pipelines.tokenizer import IMAGE_TOKENS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cmoe_base", "vision", "data_pipelines", "cmoe_vlm")
ENTRY_MODULES = ("cmoe_vlm.hf",)
MODELING_FILE, CODE_FILE = "modeling_cmoe_vlm.py", "cmoe_vlm_code.py"
TIMM_FIELDS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
AUTO_MAP = {"AutoConfig": "modeling_cmoe_vlm.ConceptMoEConfig",
            "AutoModelForCausalLM": "modeling_cmoe_vlm.ConceptMoEForCausalLM"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "modeling_cmoe_vlm.ConceptMoEProcessor",
                      "AutoImageProcessor": "modeling_cmoe_vlm.ConceptMoEImageProcessor"}

MODELING_SOURCE = '''\
"""cmoe-vlm's transformers classes for this folder (written by cmoe_vlm/checkpoints/remote_code.py).

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
DIGEST = "@DIGEST@"  # of FILES: a different bundle is a different file, so transformers imports it apart


class BundledSources(importlib.abc.MetaPathFinder, importlib.abc.SourceLoader):
    """Imports the packages of FILES from their sources (module files "<cmoe_vlm_code>/cmoe_vlm/model/conceptmoe.py", ...)."""

    digest = DIGEST

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
        return "\\n".join(FILES[path[len("<cmoe_vlm_code>/"):]]).encode("utf-8")

    def bundled_files(self):
        return FILES


# One process runs one bundle: a second export whose bundle differs would otherwise run the first one's code.
running = next((f for f in sys.meta_path if type(f).__name__ == "BundledSources"), None)
if running is None and importlib.util.find_spec("cmoe_vlm") is None:
    sys.meta_path.insert(0, BundledSources())
elif running is not None and getattr(running, "digest", None) != DIGEST:
    raise ImportError(f"this process already runs the cmoe-vlm code bundled with another export (bundle "
                      f"{getattr(running, 'digest', 'of an older version')}); this folder's bundle ({DIGEST}) differs: "
                      "load it in a fresh process, or install cmoe-vlm")

hf = importlib.import_module("cmoe_vlm.hf")


class ConceptMoEConfig(hf.ConceptMoEConfig):
    pass


class ConceptMoEForCausalLM(hf.ConceptMoEForCausalLM):
    config_class = ConceptMoEConfig


class ConceptMoEImageProcessor(hf.ConceptMoEImageProcessor):
    pass


class ConceptMoEProcessor(hf.ConceptMoEProcessor):
    pass
'''


def import_closure(entry: tuple[str, ...] = ENTRY_MODULES) -> dict[str, Path]:
    """Module name -> source file of every project module that `entry` imports, directly or not
    (imports inside functions included), with the packages that hold them."""
    files = {}
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    todo, seen = list(entry), {}
    while todo:
        name = todo.pop()
        if name in seen or name not in files:
            continue
        seen[name] = files[name]
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += _imports(name, files[name])
    return seen


def _imports(name: str, path: Path) -> list[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def source_files() -> dict[str, str]:
    """Path -> text of the files the remote code needs: read from the package, or, when this module
    itself runs from an export's bundle (cmoe-vlm not installed), taken from the bundle."""
    loader = getattr(__spec__, "loader", None)
    if hasattr(loader, "bundled_files"):
        return {path: "\n".join(lines) for path, lines in loader.bundled_files().items()}
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in import_closure().values()}


def write_remote_code(folder: str | Path) -> None:
    """Write modeling_cmoe_vlm.py and cmoe_vlm_code.py into an export folder."""
    folder = Path(folder)
    lines = ['"""Source files of cmoe-vlm that modeling_cmoe_vlm.py imports, one string per line',
             '(written by cmoe_vlm/checkpoints/remote_code.py)."""', "FILES = {"]
    files = source_files()
    for path, text in sorted(files.items()):
        lines.append(f"    {path!r}: [")
        lines += [f"        {line!r}," for line in text.split("\n")]
        lines.append("    ],")
    lines.append("}")
    (folder / CODE_FILE).write_text("\n".join(lines) + "\n")
    (folder / MODELING_FILE).write_text(MODELING_SOURCE.replace("@DIGEST@", bundle_digest(files)))


def bundle_digest(files: dict[str, str]) -> str:
    """A short hash of the bundled sources (path -> text)."""
    return hashlib.sha256(repr(sorted(files.items())).encode("utf-8")).hexdigest()[:16]


def image_processor_fields(encoder, unit: tuple[int, int] | None = None) -> dict[str, Any]:
    """What ConceptMoEImageProcessor applies for a `vision.VisionEncoder`: its timm eval transform's data
    config (input size, interpolation, mean/std, crop), or a transformers tower's processor settings;
    with images at their own size (vision.max_pixels) also the pixel budget and `token_unit` (pixels
    per LM token, patch × projector block, which the VLM passes as `unit`)."""
    if encoder.cfg.backend == "transformers":  # the tower's own image processor, as training applies it
        from vision.hf_tower import processor_settings
        settings = processor_settings(encoder.cfg.model_name)
        return {"tower": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
    from vision.transforms import data_config
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config(encoder).items() if k in TIMM_FIELDS}
    if encoder.cfg.max_tiles:
        out.update(max_tiles=encoder.cfg.max_tiles, tile_boundaries=encoder.cfg.tile_boundaries)
    if encoder.cfg.variable_size:
        out.update(token_unit=list(unit), max_pixels=encoder.cfg.max_pixels,
                   min_pixels=encoder.cfg.min_pixels or unit[0] * unit[1])
    return out


def processor_config(model) -> dict[str, Any]:
    """processor_config.json of `model` (a ConceptMoEVLM): what AutoProcessor builds ConceptMoEProcessor from."""
    return {"processor_class": "ConceptMoEProcessor", "tokens_per_image": model.cfg.tokens_per_image,
            "image_marker": IMAGE_TOKENS["image"],
            "image_processor": {"image_processor_type": "ConceptMoEImageProcessor",
                                **image_processor_fields(
                                    model.vision, model.image_unit if model.cfg.vision.variable_size else None)},
            "auto_map": PROCESSOR_AUTO_MAP}


def write_transformers_files(folder: str | Path, model) -> dict[str, Any]:
    """processor_config.json and the remote code of `model` (a ConceptMoEVLM) into an export folder;
    returns what config.json adds (its auto_map). Imports no transformers (exports are written by
    training runs)."""
    folder = Path(folder)
    (folder / "processor_config.json").write_text(json.dumps(processor_config(model), indent=2))
    write_remote_code(folder)
    return {"auto_map": AUTO_MAP}

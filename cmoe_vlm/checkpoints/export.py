"""Self-contained model folders: `config.json` + `model.safetensors`, loadable without DeepSpeed.

    save_pretrained(model, "runs/tiny/final", tokenizer="byte")
    model, info = load_pretrained("runs/tiny/final")

`config.json` holds the VLM config (model, vision, projector; tokens per image follow from it), the
tokenizer spec and the tokenizer's bos/eos/pad ids (also in `generation_config.json`). The folder
carries its tokenizer as Hugging Face files, so `AutoTokenizer.from_pretrained(folder)` loads it (the
byte tokenizer too) and the folder can be moved: a local tokenizer folder is recorded as
`"tokenizer": "included"`, which `load_pretrained` resolves to the export folder itself.

Folders written by older versions load: missing config fields take their defaults, and version-1
weight names are renamed on load (`model.upgrade_legacy_keys`). The folder is also a transformers
folder (`model_type: cmoe_vlm`): `AutoModelForCausalLM.from_pretrained(folder)` works once
`cmoe_vlm.hf` is imported.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cmoe_base.outputs import staged_folder
from data_pipelines.tokenizer import Tokenizer, load_tokenizer, save_tokenizer

from ..config import from_dict, to_dict
from ..model.vlm import ConceptMoEVLM, VLMConfig
from .tensor_files import SafetensorsWriter, read_json

FORMAT, VERSION = "cmoe-vlm", 2  # 2: the concept model and joint decoding have their own weight names
TOKENIZER_INCLUDED = "included"  # config.json's tokenizer spec for "the tokenizer files in this folder"
TOWER_FOLDER = "vision_tower"    # a transformers vision tower's config files, inside the export
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # the tokenizer's special ids, as transformers names them


class NonFiniteWeightsError(ValueError):
    """The weights to export hold NaN or inf values."""


def save_pretrained(model: ConceptMoEVLM, out_dir: str | Path, tokenizer: str | None = "byte",
                    extra: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None,
                    ids: dict[str, int | None] | None = None, files: dict[str, str] | None = None) -> Path:
    """Write `model` (or `state`, its weights in the plain layout, e.g. gathered from expert-parallel
    ranks) with its config, tokenizer and the text `files` given; the bos/eos/pad `ids` are the
    tokenizer's unless given (a conversion keeps its baseline's). Refuses (NonFiniteWeightsError,
    naming them) weights that are not finite. The folder is built beside `out_dir` and renamed into
    place whole (cmoe_base.outputs): a crash leaves the previous `out_dir` as it was."""
    out = Path(out_dir)
    state = model.state_dict() if state is None else state
    check_finite(state, out)
    with staged_folder(out) as tmp:
        _write_export(model, state, tmp, tokenizer, extra, ids)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return out


def check_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeightsError(f"{where}: not exported: {len(bad)} of {len(state)} tensors hold NaN or inf "
                                    f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")


def _write_export(model: ConceptMoEVLM, state: dict[str, torch.Tensor], out: Path, tokenizer: str | None,
                  extra: dict[str, Any] | None, ids: dict[str, int | None] | None) -> None:
    """The export's files into `out`; `tokenizer` None (an import without one) writes none and keeps `ids`."""
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    with SafetensorsWriter(out / "model.safetensors", {k: v.to("meta") for k, v in state.items()}) as writer:
        for k, v in state.items():
            writer.write(k, v)
    ids = special_ids(load_tokenizer(tokenizer)) if ids is None else ids
    from .remote_code import write_transformers_files  # processor config, remote code
    extra = {**(extra or {}), **write_transformers_files(out, model)}
    spec = tokenizer if tokenizer in ("byte", None) else TOKENIZER_INCLUDED
    write_config(out, exported_config(model.cfg, out), spec, ids, extra)


def exported_config(cfg: VLMConfig, out: Path) -> VLMConfig:
    """The config an export records: its weights hold the vision tower (no pretrained file to load), and a
    transformers tower's config.json and preprocessor_config.json are copied into out/vision_tower/,
    recorded by that relative name (`resolve_files` makes it absolute on load)."""
    vision = replace(cfg.vision, pretrained=False, checkpoint_path=None)
    if vision.backend == "transformers":
        tower = out / TOWER_FOLDER
        tower.mkdir(exist_ok=True)
        for name in ("config.json", "preprocessor_config.json"):
            source = Path(vision.model_name) / name
            if source.is_file() and source.resolve() != (tower / name).resolve():
                shutil.copyfile(source, tower / name)
        vision = replace(vision, model_name=TOWER_FOLDER)
    return replace(cfg, vision=vision)


def resolve_files(cfg: VLMConfig, folder: str | Path) -> VLMConfig:
    """`cfg` as read from the export at `folder`, with a relative tower folder made absolute."""
    v = cfg.vision
    if v.backend != "transformers" or Path(v.model_name).is_absolute():
        return cfg
    return replace(cfg, vision=replace(v, model_name=str(Path(folder) / v.model_name)))


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """The tokenizer's bos/eos/pad ids under transformers' config names."""
    return dict(zip(ID_KEYS, (tok.bos_id, tok.eos_id, tok.pad_id)))


def write_config(out: Path, cfg: VLMConfig, tokenizer: str | None, ids: dict[str, int | None],
                 extra: dict[str, Any] | None = None) -> None:
    """config.json (our format, also a transformers config) and generation_config.json (the ids, which
    transformers' `generate` reads)."""
    meta = {"format": FORMAT, "version": VERSION, "model_type": "cmoe_vlm",  # also a transformers folder
            "architectures": ["ConceptMoEForCausalLM"], "vlm": to_dict(cfg), "tokenizer": tokenizer, **ids,
            **(extra or {})}
    (out / "generation_config.json").write_text(json.dumps(ids, indent=2))
    (out / "config.json").write_text(json.dumps(meta, indent=2))


def tokenizer_spec(meta: dict[str, Any], path: str | Path) -> str | None:
    """The `load_tokenizer` spec of the export at `path` with config.json `meta` (None: it has no tokenizer)."""
    spec = meta.get("tokenizer", "byte")
    return str(Path(path)) if spec == TOKENIZER_INCLUDED else spec


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[ConceptMoEVLM, dict[str, Any]]:
    """Rebuild the model from a folder written by `save_pretrained`; returns (model in eval mode, config.json
    with its tokenizer spec resolved: "byte", or a folder holding the tokenizer files)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json; expected a folder written by save_pretrained "
                                f"(training writes one to <out_dir>/final)")
    meta = read_json(path / "config.json")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}/config.json: format {meta.get('format')!r} is not {FORMAT!r}")
    meta["tokenizer"] = tokenizer_spec(meta, path)
    cfg = resolve_files(from_dict(VLMConfig, meta["vlm"]), path)
    # The ViT's weights come from model.safetensors: do not look for its original checkpoint file.
    cfg = replace(cfg, vision=replace(cfg.vision, pretrained=False, checkpoint_path=None))
    model = ConceptMoEVLM(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval(), meta

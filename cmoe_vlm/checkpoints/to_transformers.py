"""Writing a baseline export back in its transformers family's own format (docs/design.md §16); the command
is `python -m cmoe_vlm.cli.hf_export SRC --out DST [--family mixtral]` (= `cmoe-hf-export`, cmoe_vlm/cli/hf_export.py).

SRC is an export folder of a baseline MoE (chunking off) whose layers a family states exactly: one
imported with `cmoe_vlm.cli.hf_import` and trained on (its family and original config.json are
recorded, and every field our config decides is written over them), or one trained here in that
family's shape (`--family` names it; see `Family.check_exportable` for what each allows). DST is
that family's folder: config.json, model.safetensors under the hub names `save_pretrained` writes
(one tensor per expert), generation_config.json and the tokenizer, so
`AutoModelForCausalLM.from_pretrained(DST)` runs it with plain transformers, with our logits. The
vision tower and projector are not part of a language model folder and are left out.
"""
from __future__ import annotations

import json
from pathlib import Path

from cmoe_base.outputs import staged_folder
from data_pipelines.tokenizer import save_tokenizer

from ..config import from_dict
from ..model.vlm import VLMConfig
from .export import FORMAT, tokenizer_spec
from .families import Unsupported, family_of
from .tensor_files import TensorSource, read_json, stream_convert


def export_checkpoint(src: str | Path, out: str | Path, family: str | None = None) -> str:
    """Write the export `src` as a transformers folder `out` of `family` (default: the one it was
    imported from). Returns the family's name."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected an export folder)")
    meta = read_json(src / "config.json")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{src}/config.json: format {meta.get('format')!r} is not {FORMAT!r}")
    cfg = from_dict(VLMConfig, meta["vlm"]).model
    imported = meta.get("imported_from") or {}
    name = family or imported.get("family")
    if name is None:
        raise Unsupported("the export was not imported from a transformers family: pass --family "
                          "(mixtral, qwen2_moe, qwen3_moe or olmoe)")
    fam = family_of(name)
    hf_json = fam.hf_config(cfg, imported.get("config") if imported.get("family") == fam.name else None)
    hf_json.update({k: meta[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in meta})
    source = TensorSource.open(src)
    rules = fam.export_rules(cfg)
    used = {n for r in rules for n in r.inputs} | ({"lm.lm_head.weight"} if cfg.tie_embeddings else set())
    unused = sorted(n for n in source.names if n not in used and n.startswith("lm."))
    if unused:
        raise Unsupported(f"weights with no place in {fam.name}: {', '.join(unused[:3])}")
    hf_json["dtype"] = str(source.meta("lm.embed.weight").dtype).removeprefix("torch.")
    with staged_folder(out) as tmp:  # renamed into place whole: never half-written, never mixed with old files
        stream_convert(source, rules, tmp / "model.safetensors", metadata={"format": "pt"})
        spec = tokenizer_spec(meta, src)
        if spec is not None:
            save_tokenizer(spec, tmp)
        ids = {k: hf_json.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_json, indent=2))
    return fam.name

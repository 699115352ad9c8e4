"""Import of a pretrained Hugging Face MoE language model as a cmoe-vlm baseline (docs/design.md §16); the
command is `python -m cmoe_vlm.cli.hf_import SRC --out DST` (= `cmoe-hf-import`, cmoe_vlm/cli/hf_import.py).

SRC is a local transformers folder of a supported family (`cmoe_vlm.checkpoints.families`: Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE): config.json, model.safetensors or the shards of its index, and its
tokenizer files if it has them. Nothing is downloaded. DST is an export folder like any other: a
baseline MoE (chunking off; their decoder layer i is our concept layer i) that `cmoe_vlm.cli.convert`,
`train.init_from`, the evaluation and `AutoModelForCausalLM.from_pretrained(DST)` (after `import
cmoe_vlm.hf`) take, with the source's logits. It holds:

- model.safetensors: their weights in our layout, in their dtype, written one tensor at a time
  while the source is read one tensor at a time (`cmoe_vlm.checkpoints.tensor_files`): the process holds about
  one layer, not the model (the peak resident memory is printed against the checkpoint's size);
- config.json: the baseline's config, `"parts": ["lm"]` (the vision tower and projector in the file
  are placeholders of the default shape: `train.init_from` takes only the LM from this export and
  builds the vision side from the experiment's config), `tokenizer_vocab_size` (the embedding rows
  the source trained; `train.init_from` starts the others at the mean row), the tokenizer's
  bos/eos/pad ids, and `imported_from` (family and their config.json, which `cmoe_vlm.cli.hf_export`
  writes back);
- the tokenizer files (the source tokenizer, as `AutoTokenizer` loads it) and generation_config.json;
- train_overrides.txt: the `model.*` overrides that make an experiment config build this model.

Anything the family's forward does that our layers do not reproduce is refused in one line naming it
(exit status 2), before anything is written: an import never has different logits.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmoe_base.outputs import staged_folder
from data_pipelines.tokenizer import save_tokenizer
from vision import Projector, VisionEncoder

from .. import flops
from ..config import from_dict, to_dict, to_overrides
from ..model.config import ModelConfig
from ..model.vlm import ConceptMoEVLM, VLMConfig
from .export import TOKENIZER_INCLUDED, write_config
from .families import Family, Unsupported, family_of
from .tensor_files import TensorSource, confined, read_json, stream_convert

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
IGNORED_TENSORS = (".rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed


@dataclass
class ImportReport:
    family: str
    layers: int
    params: int
    checkpoint_bytes: int
    seconds: float
    peak_rss_bytes: int
    tokenizer: bool


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_shapes(family: Family, cfg: ModelConfig, expected: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """The shape of every source tensor the config implies: the family's export rules run on our
    model's meta tensors (import and export are inverse), so q and k swapped but of the same total
    are refused as transformers refuses them."""
    meta = {k: torch.empty(v, device="meta") for k, v in expected.items()}
    return {r.output: tuple(r.fn([meta[n] for n in r.inputs]).shape) for r in family.export_rules(cfg)
            if all(n in meta for n in r.inputs)}


def read_source(src: Path) -> tuple[dict[str, Any], Any]:
    """config.json as written, and transformers' config object for it (family defaults filled in)."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a local transformers model folder)")
    raw = read_json(confined(src, "config.json"))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            confined(src, name, "tokenizer file")
    family_of(raw.get("model_type")).check_keys(raw)  # before transformers reads the file
    if not any((src / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        pickles = sorted(p.name for p in src.glob("*.bin"))
        raise Unsupported(f"{src}: no model.safetensors (or its index)" + (
            f"; {pickles[0]} is a pickle, which is never loaded: save the model with safetensors" if pickles else ""))
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return raw, AutoConfig.from_pretrained(str(src), local_files_only=True)
    except StrictDataclassError as e:  # a config value of the wrong type, as transformers checks it
        raise Unsupported(f"{src / 'config.json'}: {' '.join(str(e).split())}") from None


def import_checkpoint(src: str | Path, out: str | Path) -> ImportReport:
    """Import the transformers folder `src` into the export folder `out` (see the module docstring)."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    raw, hf = read_source(src)
    family = family_of(raw["model_type"])
    cfg = from_dict(ModelConfig, to_dict(family.model_config(hf, raw)), prefix="model")  # every field checked
    source = TensorSource.open(src)
    rules = family.import_rules(cfg, source.names)
    used = {n for r in rules for n in r.inputs} | ({"lm_head.weight"} if cfg.tie_embeddings else set())  # = embed
    unused = sorted(n for n in source.names if n not in used and not n.endswith(IGNORED_TENSORS))
    if unused:
        raise Unsupported(f"{len(unused)} checkpoint tensors have no place in {family.name}'s layers as we "
                          f"reproduce them ({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})")

    vcfg = VLMConfig(model=cfg)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ConceptMoEVLM(vcfg).state_dict().items()}
    torch.manual_seed(0)  # the placeholder vision tower and projector (parts: ["lm"])
    vision = VisionEncoder(vcfg.vision)
    projector = Projector(vcfg.projector, vision.embed_dim, cfg.dim)
    placeholders = {**{f"vision.{k}": v for k, v in vision.state_dict().items()},
                    **{f"projector.{k}": v for k, v in projector.state_dict().items()}}
    made = {r.output for r in rules} | set(placeholders)
    if made != set(expected):  # the family's rules and our model disagree: a bug here, not in the checkpoint
        raise AssertionError(f"import rules miss {sorted(set(expected) - made)[:3]}, "
                             f"add {sorted(made - set(expected))[:3]}")

    tokenizer = any((src / n).is_file() for n in TOKENIZER_FILES)
    ids = {k: getattr(hf, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        if len(tok) > cfg.vocab_size:
            raise Unsupported(f"the tokenizer has {len(tok)} tokens but the embedding only {cfg.vocab_size} rows")
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else ids["pad_token_id"]}

    with staged_folder(out) as tmp:  # renamed into place whole: never half-written, never mixed with old files
        stream_convert(source, rules, tmp / "model.safetensors",
                       expected={r.output: expected[r.output] for r in rules}, extra=placeholders,
                       source_shapes=source_shapes(family, cfg, expected))
        if tokenizer:
            save_tokenizer(str(src), tmp)
        marks = {"parts": ["lm"], **({"tokenizer_vocab_size": len(tok)} if tokenizer else {})}  # training/init.py
        write_config(tmp, vcfg, TOKENIZER_INCLUDED if tokenizer else None, ids,
                     {**marks, "imported_from": {"family": family.name, "architecture": family.architecture,
                                                 "config": raw}})
        (tmp / "train_overrides.txt").write_text("\n".join(to_overrides(cfg, "model")) + "\n")
    if not tokenizer:
        print(f"note: {src} has no tokenizer files: set data.tokenizer when training from {out}", file=sys.stderr)
    return ImportReport(family.name, cfg.concept_layers, flops.total_params(cfg), source.nbytes(),
                        time.perf_counter() - t0, peak_rss_bytes(), tokenizer)

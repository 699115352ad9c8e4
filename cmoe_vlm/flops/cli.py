"""`python -m cmoe_vlm.flops CONFIG.yaml [--ratio R] [--seq-len N]` (or `cmoe-flops`): a config's
params, activated FLOPs per token, attention-map FLOPs and KV bytes, and the FLOPs-matched
ConceptMoE proposals for it, as a table or JSON. The model code (and torch) loads after the
arguments are parsed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cmoe_base import ConfigError
from cmoe_base.commands import InputError, Parser, command, positive_float, positive_int

from ..config import from_dict, load_yaml

if TYPE_CHECKING:
    from ..model.config import ModelConfig
    from .reallocation import Proposal


def model_config_from_data(data: dict) -> ModelConfig:
    """A ModelConfig from YAML data: a top-level `model:` section, or a bare ModelConfig mapping."""
    from ..model.config import ModelConfig
    if "model" in data:
        if not isinstance(data["model"], dict):
            raise ConfigError(f"model = {data['model']!r}: must be a mapping of ModelConfig fields")
        return from_dict(ModelConfig, data["model"], prefix="model")
    return from_dict(ModelConfig, data)


def load_model_config(path: str | Path) -> ModelConfig:
    return model_config_from_data(load_yaml(path))


def strip_reallocation(cfg: ModelConfig) -> ModelConfig:
    """The baseline of a ConceptMoE config: chunking off, no looping, concept layers like the others."""
    return dataclasses.replace(cfg, chunk=dataclasses.replace(cfg.chunk, enabled=False), loop_layers=0,
                               concept_dim=None, concept_moe=None)


def _human(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def format_table(rows: list[Proposal]) -> str:
    seq_len = next(r.cost.seq_len for r in rows if r.cost)
    head = ["strategy", "R", "top_k", "loop", "concept_dim", "experts", "total params", "Δparams",
            "act params", "FLOPs/tok", "×base", f"attn map/tok@{seq_len}", "×base", "KV B/tok", "×base"]
    lines = [head]
    for r in rows:
        if r.cost is None:
            lines.append([r.strategy] + ["-"] * (len(head) - 1))
            continue
        c, cm = r.config, r.config.concept_moe_cfg
        lines.append([
            r.strategy, f"{r.cost.ratio:g}", str(cm.top_k), str(c.loop_layers), str(c.concept_width),
            str(cm.num_experts), _human(r.cost.total_params), f"{r.params_diff_pct:+.1f}%",
            _human(r.cost.activated_params), _human(r.cost.flops_per_token), f"{r.flops_ratio:.3f}",
            _human(r.cost.attn_map_flops_per_token), f"{r.attn_map_ratio:.3f}",
            _human(r.cost.kv_bytes_per_token), f"{r.kv_ratio:.3f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    notes = [f"  {r.strategy}: {r.note}" for r in rows if r.note]
    return "\n".join(out + ["notes:"] + notes)


@command("cmoe-flops")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(
        prog="cmoe-flops",
        description="Params, activated FLOPs/token (attention map excluded), attention-map FLOPs and KV "
                    "bytes of a model config, and ConceptMoE configs matched to it in activated FLOPs "
                    "by the paper's three compute-reallocation strategies.")
    ap.add_argument("config", help="YAML with a top-level `model:` section, or a bare ModelConfig mapping")
    ap.add_argument("--ratio", type=positive_float, default=None,
                    help="compression R (default: the config's model.chunk.target_ratio)")
    ap.add_argument("--seq-len", type=positive_int, default=None, help="for attention-map FLOPs (default: max_seq_len)")
    ap.add_argument("--loop-layers", type=positive_int, default=None, help="fix the looped strategy's loop_layers")
    ap.add_argument("--match", choices=("concept", "model"), default="concept",
                    help="match the concept layers' FLOPs (the paper's equations, default) or the whole model's")
    ap.add_argument("--kv-bytes", type=positive_int, default=2, help="bytes per cached value (default 2, bf16)")
    ap.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    args = ap.parse_args(argv)
    from .accounting import account, kv_cache_bytes_per_token
    from .reallocation import Proposal, propose
    cfg = load_model_config(args.config)
    ratio = args.ratio if args.ratio is not None else cfg.chunk.target_ratio
    seq_len = args.seq_len or cfg.max_seq_len
    header = []
    given = None
    if cfg.chunk.enabled:
        given = account(cfg, ratio, seq_len, args.kv_bytes)
        baseline = strip_reallocation(cfg)
        header.append(f"{args.config} has chunking on: reported as `given`; proposals start from its baseline "
                      f"(chunking off, no loop, concept layers like the others)")
    else:
        baseline = cfg
    if ratio <= 1:
        raise InputError(f"ratio = {ratio}: must be > 1 (pass --ratio)")
    rows = propose(baseline, ratio, seq_len, args.loop_layers, args.match)
    if given is not None:
        b = rows[0].cost
        rows.insert(1, Proposal("given", cfg, given, given.flops_per_token / b.flops_per_token,
                                100 * (given.total_params / b.total_params - 1), given.attn_map_flops / b.attn_map_flops,
                                given.kv_bytes_per_token / b.kv_bytes_per_token, "the config as written"))
    if args.kv_bytes != 2:  # recompute KV bytes at the requested width
        for r in rows:
            if r.cost is not None:
                r.cost.kv_bytes_per_token = kv_cache_bytes_per_token(r.config, r.cost.ratio, args.kv_bytes)
    if args.json:
        print(json.dumps([r.summary() for r in rows], indent=2))
        return 0
    print("\n".join(header + [f"ratio R = {ratio:g}, seq len = {seq_len}; FLOPs are forward, per token, "
                              f"2·multiply-adds; attention map is the dense QK^T+AV count"]))
    print(format_table(rows))
    return 0

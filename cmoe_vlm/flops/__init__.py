"""FLOPs, parameters and KV bytes from a config alone, and FLOPs-matched compute reallocation.

    accounting.py    per-layer and whole-model params / activated FLOPs / attention map / KV bytes (`account`)
    reallocation.py  the paper's three strategies as `Proposal`s matched to a baseline (`propose`)
    cli.py           `python -m cmoe_vlm.flops CONFIG.yaml` (also `cmoe-flops`): the table

    from cmoe_vlm import flops
    flops.account(cfg, ratio=2).flops_per_token

The names load their module (and torch, through the configs) when first used, so `cmoe-flops --help`
answers before torch is imported.
"""
from __future__ import annotations

import importlib

_MODULES = {
    "accounting": ("Cost", "account", "activated_params", "activated_params_non_embedding", "attention_map_flops",
                   "attention_projection_flops", "expert_flops", "fixed_layer_flops", "flops_breakdown",
                   "flops_per_token", "kv_cache_bytes_per_token", "layer_flops", "layer_params", "param_counts",
                   "realized_flops", "total_params"),
    "cli": ("format_table", "load_model_config", "main", "model_config_from_data", "strip_reallocation"),
    "reallocation": ("STRATEGIES", "Proposal", "flops_mismatch", "more_experts_top_k", "proposal_for", "propose",
                     "propose_efficiency", "propose_flops_matched", "propose_looped", "propose_more_experts",
                     "propose_wider"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

"""FLOPs, parameters and KV bytes from a config alone, and FLOPs-matched compute reallocation.

    accounting.py    per-layer and whole-model params / activated FLOPs / attention map / KV bytes (`account`)
    reallocation.py  the paper's three strategies as `Proposal`s matched to a baseline (`propose`)
    cli.py           `python -m cmoe_vlm.flops CONFIG.yaml` (also `cmoe-flops`): the table

    from cmoe_vlm import flops
    flops.account(cfg, ratio=2).flops_per_token
"""
from .accounting import (Cost, account, activated_params, activated_params_non_embedding, attention_map_flops,
                         attention_projection_flops, expert_flops, fixed_layer_flops, flops_breakdown,
                         flops_per_token, kv_cache_bytes_per_token, layer_flops, layer_params, param_counts,
                         realized_flops, total_params)
from .cli import format_table, load_model_config, main, model_config_from_data, strip_reallocation
from .reallocation import (STRATEGIES, Proposal, flops_mismatch, more_experts_top_k, proposal_for, propose,
                           propose_efficiency, propose_flops_matched, propose_looped, propose_more_experts,
                           propose_wider)

__all__ = [
    "Cost", "account", "activated_params", "activated_params_non_embedding", "attention_map_flops",
    "attention_projection_flops", "expert_flops", "fixed_layer_flops", "flops_breakdown", "flops_per_token",
    "kv_cache_bytes_per_token", "layer_flops", "layer_params", "param_counts", "realized_flops", "total_params",
    "format_table", "load_model_config", "main", "model_config_from_data", "strip_reallocation",
    "STRATEGIES", "Proposal", "flops_mismatch", "more_experts_top_k", "proposal_for", "propose",
    "propose_efficiency", "propose_flops_matched", "propose_looped", "propose_more_experts", "propose_wider",
]

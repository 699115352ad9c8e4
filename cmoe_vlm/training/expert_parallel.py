"""Expert parallelism: swap our MoE layers for DeepSpeed MoE layers when train.ep_size > 1.

The model code never imports DeepSpeed; this module replaces each `MoE` with `DeepSpeedMoE`,
which holds only this rank's experts (E / ep_size of them) and dispatches tokens to the other
ranks of its expert-parallel group with DeepSpeed's all-to-all. Dispatch is dropless
(`drop_tokens=False`): after chunking, ranks hold different numbers of concept tokens, and
DeepSpeed sizes the exchange by the largest per-expert count in the group (docs/design.md §12).

Weights move both ways in our own layout (stacked `experts.w13` (E, d, 2f), `experts.w2`
(E, f, d), `router.weight` (E, d)), so a checkpoint exported with one ep_size loads with another.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.layers.moe import MoE, MoEStats, SwiGLU, shared_expert


def expert_parallel_rank(ep_size: int) -> int:
    """This process's index inside its expert-parallel group (DeepSpeed groups consecutive ranks)."""
    return dist.get_rank() % ep_size


class DeepSpeedMoE(nn.Module):
    """Drop-in for `MoE` (same forward contract) backed by `deepspeed.moe.layer.MoE`."""

    def __init__(self, moe: MoE, ep_size: int):
        from deepspeed.moe.layer import MoE as DSMoE

        super().__init__()
        cfg = moe.cfg
        if cfg.num_experts % ep_size:
            raise ValueError(f"moe.num_experts = {cfg.num_experts} must be divisible by train.ep_size = {ep_size}")
        if not cfg.norm_topk_prob and cfg.top_k > 1:
            raise ValueError("DeepSpeed MoE renormalises the top-k gates: set moe.norm_topk_prob = true with ep_size > 1")
        dim, hidden = moe.router.in_features, cfg.expert_hidden
        self.cfg, self.ep_size = cfg, ep_size
        self.num_local = cfg.num_experts // ep_size
        self.layer = DSMoE(hidden_size=dim, expert=SwiGLU(dim, hidden), num_experts=cfg.num_experts, ep_size=ep_size,
                           k=cfg.top_k, drop_tokens=False, use_residual=False, min_capacity=0,
                           top2_2nd_expert_sampling=False)  # plain top-k, as our router
        self.shared, self.shared_gate = moe.shared, moe.shared_gate
        self.load_plain(moe)

    def _local_experts(self) -> list[SwiGLU]:
        return list(self.layer.deepspeed_moe.experts.deepspeed_experts)

    @torch.no_grad()
    def load_plain(self, moe: MoE) -> None:
        """Copy a plain MoE's router and this rank's slice of its stacked experts."""
        self.layer.deepspeed_moe.gate.wg.weight.copy_(moe.router.weight)
        first = expert_parallel_rank(self.ep_size) * self.num_local
        for i, expert in enumerate(self._local_experts()):
            expert.w13.weight.copy_(moe.experts.w13[first + i].T)
            expert.w2.weight.copy_(moe.experts.w2[first + i].T)

    @torch.no_grad()
    def plain_state(self) -> dict[str, torch.Tensor]:
        """Router and ALL experts in our stacked layout, gathered over the expert-parallel group."""
        local13 = torch.stack([e.w13.weight.T for e in self._local_experts()])  # (E_local, d, 2f)
        local2 = torch.stack([e.w2.weight.T for e in self._local_experts()])    # (E_local, f, d)
        group = self.layer.deepspeed_moe.ep_group
        gathered = []
        for local in (local13, local2):
            parts = [torch.empty_like(local) for _ in range(self.ep_size)]
            dist.all_gather(parts, local.contiguous(), group=group)
            gathered.append(torch.cat(parts))
        state = {"router.weight": self.layer.deepspeed_moe.gate.wg.weight.detach().clone(),
                 "experts.w13": gathered[0], "experts.w2": gathered[1]}
        for name in ("shared", "shared_gate"):
            if getattr(self, name) is not None:
                state.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return state

    def forward(self, x: torch.Tensor, with_stats: bool = True) -> tuple[torch.Tensor, MoEStats | None]:
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        out, _, counts = self.layer(x_ND[None])  # DeepSpeed expects (batch, tokens, dim)
        out = out.reshape(shape)
        if self.shared is not None:
            out = out + shared_expert(self.shared, self.shared_gate, x_ND).view(shape)
        if not with_stats:
            return out, None
        # Our balance loss's statistics, not DeepSpeed's l_aux (its top-2 variant counts first choices only), so
        # both backends optimise the same objective (cmoe_vlm/objective.py).
        probs_NE = torch.nn.functional.linear(x_ND.float(), self.layer.deepspeed_moe.gate.wg.weight.float()).softmax(-1)
        return out, MoEStats(probs_NE.mean(0), counts.detach())


def swap_in_deepspeed_moe(model: nn.Module, ep_size: int) -> int:
    """Replace every `MoE` inside `model` with `DeepSpeedMoE`; returns how many were replaced."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoE)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DeepSpeedMoE(mod, ep_size))
    return len(targets)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the plain (ep_size = 1) layout; collective over all ranks."""
    state = {}
    swapped = {name: mod for name, mod in model.named_modules() if isinstance(mod, DeepSpeedMoE)}
    for key, value in model.state_dict().items():
        if not any(key.startswith(f"{name}.") for name in swapped):
            state[key] = value
    for name, mod in swapped.items():
        state.update({f"{name}.{k}": v for k, v in mod.plain_state().items()})
    return state

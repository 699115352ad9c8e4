"""Expert parallelism: swap our MoE layers for DeepSpeed MoE layers when train.ep_size > 1.

The model code never imports DeepSpeed; this module replaces each `MoE` with `DeepSpeedMoE`,
which holds only this rank's experts (E / ep_size of them) in DeepSpeed's MoE module, so DeepSpeed's
engine sees an MoE model (expert parameter groups reduced over the expert-data group, per-expert
checkpoint files). Two dispatches (docs/design.md §12):

- `dropless` (what training uses): our router and sort (`route`, `dispatch` of model/layers/moe.py),
  the per-expert counts exchanged first, then each assignment's row sent once to the rank owning its
  expert (`all_to_all_single` with exact splits), the local experts run as one grouped SwiGLU, and the
  results sent back. No capacity, no padding, no dropped token.
- `capacity`: DeepSpeed's GShard layer (`drop_tokens=False`): a one-hot (S, E, C) dispatch padded to
  the largest per-expert count in the group, a loop over local experts. Kept for bench/bench_expert_parallel.py.

Weights move both ways in our own layout (stacked `experts.w13` (E, d, 2f), `experts.w2`
(E, f, d), `router.weight` (E, d)), so a checkpoint exported with one ep_size loads with another.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ..model.layers.moe import (MoE, MoEStats, SwiGLU, compute_dtype, dispatch, grouped_swiglu,
                                mean_router_probs, route, shared_expert)


def expert_parallel_rank(ep_size: int) -> int:
    """This process's index inside its expert-parallel group (DeepSpeed groups consecutive ranks)."""
    return dist.get_rank() % ep_size


class AllToAll(torch.autograd.Function):
    """Rows exchanged over a process group, as DeepSpeed's `_AllToAll` but with uneven splits: x
    (sum(send), D), rows send[r] going to rank r -> (sum(recv), D), rows recv[r] from rank r. Backward
    sends the gradients back the same way (recv and send swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


class DeepSpeedMoE(nn.Module):
    """Drop-in for `MoE` (same forward contract) holding its experts in `deepspeed.moe.layer.MoE`."""

    def __init__(self, moe: MoE, ep_size: int, dispatch: Literal["dropless", "capacity"] = "dropless"):
        from deepspeed.moe.layer import MoE as DSMoE

        super().__init__()
        cfg = moe.cfg
        if cfg.num_experts % ep_size:
            raise ValueError(f"moe.num_experts = {cfg.num_experts} must be divisible by train.ep_size = {ep_size}")
        if not cfg.norm_topk_prob and cfg.top_k > 1:
            raise ValueError("DeepSpeed MoE renormalises the top-k gates: set moe.norm_topk_prob = true with ep_size > 1")
        if dispatch == "dropless" and not hasattr(torch, "_grouped_mm"):
            raise ValueError("train.ep_size > 1 runs the local experts with torch._grouped_mm, which this torch lacks")
        dim, hidden = moe.router.in_features, cfg.expert_hidden
        self.cfg, self.ep_size, self.dispatch = cfg, ep_size, dispatch
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
        router = self.layer.deepspeed_moe.gate.wg
        if self.dispatch == "dropless":
            probs_NE, weights_NK, experts_NK = route(router(x_ND), self.cfg.top_k, self.cfg.norm_topk_prob)
            out_ND, counts = dispatch(x_ND, weights_NK, experts_NK, self.cfg.num_experts, self.exchange_and_run)
        else:
            out, _, counts = self.layer(x_ND[None])  # DeepSpeed expects (batch, tokens, dim)
            out_ND = out.reshape(x_ND.shape)
            # Our balance loss's statistics, not DeepSpeed's l_aux (its top-2 variant counts first choices only),
            # so both dispatches optimise the same objective (cmoe_vlm/objective.py).
            probs_NE = router(x_ND).float().softmax(-1) if with_stats else None
        if self.shared is not None:
            out_ND = out_ND + shared_expert(self.shared, self.shared_gate, x_ND)
        if not with_stats:
            return out_ND.view(shape), None
        return out_ND.view(shape), MoEStats(mean_router_probs(probs_NE), counts.detach())

    def exchange_and_run(self, x_MD: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """This rank's assignments sorted by expert x_MD (M, D), tokens_per_expert (E,) -> the experts'
        outputs (M, D), computed by the ranks owning them. Experts are owned in consecutive blocks of
        E_local, so the sorted rows are already grouped by destination rank."""
        group = self.layer.deepspeed_moe.ep_group
        P, L = self.ep_size, self.num_local
        recv_PL = exchange(tokens_per_expert, [L] * P, [L] * P, group).view(P, L)  # from rank p, for my expert l
        send, recv = torch.stack([tokens_per_expert.view(P, L).sum(1), recv_PL.sum(1)]).tolist()  # one host read
        x_RD = AllToAll.apply(x_MD, send, recv, group)  # R rows: by source rank, then by local expert
        # Regroup by local expert (stable: source rank order kept inside each expert), run, restore.
        local_R = torch.arange(L).repeat(P).repeat_interleave(recv_PL.reshape(-1))
        order_R = local_R.argsort(stable=True)
        dtype = compute_dtype(x_RD)
        w13, w2 = self.local_weights(dtype)
        y_RD = grouped_swiglu(x_RD.index_select(0, order_R).to(dtype), w13, w2,
                              recv_PL.sum(0).cumsum(0).to(torch.int32))
        y_RD = y_RD.index_select(0, order_R.argsort())
        return AllToAll.apply(y_RD, recv, send, group)

    def local_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's experts stacked in our layout from DeepSpeed's per-expert Linear weights (a copy
        per forward, E_local·3·d·f values; backward hands each Linear its slice): w13 (E_local, d, 2f),
        w2 (E_local, f, d)."""
        experts = self._local_experts()
        w13 = torch.stack([e.w13.weight for e in experts]).to(dtype)  # (E_local, 2f, d)
        w2 = torch.stack([e.w2.weight for e in experts]).to(dtype)    # (E_local, d, f)
        return w13.transpose(1, 2), w2.transpose(1, 2)


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

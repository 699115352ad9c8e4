"""Mixture-of-experts feed-forward: SwiGLU experts, top-k softmax router, dropless dispatch.

Dispatch sorts the N·k (token, expert) assignments by expert so each expert's tokens are one
contiguous slice, runs the experts on their slices (one `GroupedSwiGLU` autograd node of
`torch._grouped_mm` calls, CPU and CUDA; a loop of matmuls over experts where torch lacks it), and adds the weighted results back with `index_add_`. No token is
dropped and there is no Python loop over tokens. With fewer assignments than experts and no
autograd (decoding), each token's k experts run as a batched matmul on gathered weights instead.

Shape suffixes (torchtitan's convention) name each tensor's dimensions: N tokens, D model width (dim),
E experts, K experts per token (top_k), M = N·K (token, expert) assignments. So x_ND is (N, D),
probs_NE (N, E), experts_NK (N, K), order_M (M,), router_probs_E (E,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from cmoe_base import check


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256          # SwiGLU hidden width of one expert
    shared_expert_hidden: int = 0     # 0 = no shared expert; else an always-on SwiGLU of this width
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(w·x) per token (Qwen2-MoE)
    norm_topk_prob: bool = True       # renormalise the k selected router probabilities to sum to 1 (Mixtral;
                                      # false: the softmax's own top-k values, Qwen-MoE and OLMoE by default)
    impl: Literal["auto", "loop", "grouped"] = "auto"  # auto: grouped (GroupedSwiGLU) where torch has _grouped_mm

    def __post_init__(self):
        check(self.num_experts >= 1, "num_experts", self.num_experts, "must be >= 1")
        check(1 <= self.top_k <= self.num_experts, "top_k", self.top_k,
              f"must be between 1 and num_experts={self.num_experts}")
        check(self.expert_hidden >= 1, "expert_hidden", self.expert_hidden, "must be >= 1")
        check(self.shared_expert_hidden >= 0, "shared_expert_hidden", self.shared_expert_hidden, "must be >= 0")
        check(not self.shared_expert_gate or self.shared_expert_hidden > 0, "shared_expert_gate",
              self.shared_expert_gate, "needs a shared expert (shared_expert_hidden > 0)")


@dataclass
class MoEStats:
    """What one MoE layer reports for a forward pass: what the balance loss (cmoe_vlm/objective.py) and the
    expert-load log read."""
    router_probs: torch.Tensor       # (E,) mean router probability per expert over the tokens (0 without tokens)
    tokens_per_expert: torch.Tensor  # (E,) assignments per expert


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class GroupedSwiGLU(torch.autograd.Function):
    """E SwiGLU experts over expert-sorted tokens as one autograd node: two grouped matmuls forward,
    four backward, and the SwiGLU's derivative computed once over all M rows (autograd through a
    per-expert loop made a silu backward, a mul and a cat or split per expert slice per layer).

    Forward: x_MD (M, D) sorted by expert, w13_EDH (E, D, 2H), w2_EHD (E, H, D), offs_E (E,) int32,
    the cumulative row counts (the end of each expert's rows) -> y_MD (M, D). Saves x and the first
    projection h (M, 2H); silu(gate)·up is recomputed in backward (one elementwise pass) rather than
    kept, so the node holds no more than autograd through the loop held."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, w13_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                offs_E: torch.Tensor) -> torch.Tensor:
        h_MH = torch._grouped_mm(x_MD, w13_EDH, offs=offs_E)
        gate, up = h_MH.chunk(2, dim=-1)
        y_MD = torch._grouped_mm(F.silu(gate).mul_(up), w2_EHD, offs=offs_E)
        ctx.save_for_backward(x_MD, h_MH, w13_EDH, w2_EHD, offs_E)
        return y_MD

    @staticmethod
    def backward(ctx, grad_y_MD: torch.Tensor):
        x_MD, h_MH, w13_EDH, w2_EHD, offs_E = ctx.saved_tensors
        grad_y_MD = grad_y_MD.contiguous()
        gate, up = h_MH.chunk(2, dim=-1)
        silu = F.silu(gate)
        grad_act = torch._grouped_mm(grad_y_MD, w2_EHD.transpose(-2, -1), offs=offs_E)  # (M, H)
        grad_w2 = (torch._grouped_mm((silu * up).t(), grad_y_MD, offs=offs_E)  # (E, H, D)
                   if ctx.needs_input_grad[2] else None)
        grad_h = torch.empty_like(h_MH)  # [d/dgate, d/dup], written in place
        g_gate, g_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_act, silu, out=g_up)
        torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=g_gate)
        grad_x = (torch._grouped_mm(grad_h, w13_EDH.transpose(-2, -1), offs=offs_E)
                  if ctx.needs_input_grad[0] else None)
        grad_w13 = (torch._grouped_mm(x_MD.t(), grad_h, offs=offs_E)  # (E, D, 2H)
                    if ctx.needs_input_grad[1] else None)
        return grad_x, grad_w13, grad_w2, None


# A compile graph break: _grouped_mm's fake-tensor kernel takes bf16 only (eager CPU takes fp32 too).
grouped_swiglu = torch.compiler.disable(GroupedSwiGLU.apply)


@register_flop_formula(torch.ops.aten._grouped_mm)
def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `torch._grouped_mm` for torch's FlopCounterMode, which has no formula for it: 2-D x 2-D
    with groups along the contraction (a weight gradient) is one (m, k) @ (k, n) product; otherwise each
    output element is a length-k dot product (2-D x 3-D: the tokens of each expert; 3-D x 3-D: batched)."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights, applied to expert-sorted tokens."""

    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        nn.init.normal_(self.w13, std=dim ** -0.5)
        nn.init.normal_(self.w2, std=hidden ** -0.5)

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted (M, dim) grouped by expert, tokens_per_expert (E,) -> (M, dim). `grouped` (auto
        wherever torch has `_grouped_mm`, CPU included, for fp32/bf16/fp16 with widths of 16-byte multiples): one
        `GroupedSwiGLU` node, no host read; `loop`: a matmul per expert."""
        impl = self.impl
        dtype = compute_dtype(x_sorted)
        if impl == "auto":  # _grouped_mm: fp32/bf16/fp16, row strides of whole 16-byte units (dim and hidden)
            ok = dtype in (torch.float32, torch.bfloat16, torch.float16) and all(
                n * dtype.itemsize % 16 == 0 for n in self.w2.shape[1:])
            impl = "grouped" if hasattr(torch, "_grouped_mm") and ok else "loop"
        if impl == "grouped":
            offs_E = tokens_per_expert.cumsum(0).to(torch.int32)
            # stacked weights cast once per layer (autocast does not cover _grouped_mm)
            return grouped_swiglu(x_sorted.to(dtype).contiguous(), self.w13.to(dtype), self.w2.to(dtype), offs_E)
        return self._loop(x_sorted.to(dtype), tokens_per_expert)

    @torch.compiler.disable  # reads the counts to the host: a compiled graph would specialise on them
    def _loop(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """A matmul per expert over its contiguous slice (torch without `_grouped_mm`; docs/design.md §12)."""
        counts = tokens_per_expert.tolist()
        outs = [x_sorted.new_empty(0, self.w2.shape[-1])]
        # The stacked weights cast once (autocast would cast each expert's slice at every matmul).
        # With autograd, unbind rather than w13[e]: indexing makes backward write a full (E, d, 2h) zero
        # gradient per expert; split, not slices, for the same reason on x_sorted.
        w13, w2 = self.w13.to(x_sorted.dtype), self.w2.to(x_sorted.dtype)
        grad = torch.is_grad_enabled() and self.w13.requires_grad
        w13s, w2s = (w13.unbind(0), w2.unbind(0)) if grad else (w13, w2)
        for e, x_e in enumerate(x_sorted.split(counts)):
            if counts[e]:  # experts without tokens are skipped
                gate, up = (x_e @ w13s[e]).chunk(2, dim=-1)
                outs.append((F.silu(gate) * up) @ w2s[e])
        return torch.cat(outs)

    def per_token(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Few tokens (decoding, N·K <= E, no autograd): Σ_k weight · expert_k(x). x_ND (N, dim), experts_NK
        and weights_NK (N, K) -> (N, dim). On CPU each of the N·K (token, expert) pairs multiplies by
        its expert's weights in place (the ids read to the host, free there): a batch-1 decode step is
        a matrix-vector product, memory-bound on the weights, and gathering them first (the CUDA path:
        one batched matmul per projection, no host read) copied 3 MiB per layer per token, 2x the
        layer's time. Indexing the stacked weights would make backward write full zero gradients,
        hence no autograd."""
        N, K = experts_NK.shape
        if not x_ND.is_cuda:
            pairs = zip(x_ND.repeat_interleave(K, 0).unbind(0), experts_NK.reshape(-1).tolist())
            y = torch.stack([swiglu(x, self.w13[e], self.w2[e]) for x, e in pairs])  # (N·K, dim)
            return (y.view(N, K, -1) * weights_NK[..., None].to(y.dtype)).sum(1).to(x_ND.dtype)
        idx = experts_NK.reshape(-1)
        x = x_ND[:, None].expand(N, K, x_ND.shape[-1]).reshape(N * K, 1, -1)
        gate, up = torch.bmm(x, self.w13.index_select(0, idx)).chunk(2, dim=-1)  # (N·K, 1, h) each
        act = F.silu(gate) * up * weights_NK.reshape(-1, 1, 1).to(up.dtype)  # routing weight applied here
        return torch.bmm(act, self.w2.index_select(0, idx)).view(N, K, -1).sum(1).to(x_ND.dtype)


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: x (..., dim), w13 (dim, 2h), w2 (h, dim) -> (..., dim)."""
    gate, up = (x @ w13).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype for x: autocast's when it is on (it does not cover _grouped_mm, and casts a
    weight slice at every matmul), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def shared_expert(shared: SwiGLU, gate: nn.Linear | None, x_ND: torch.Tensor) -> torch.Tensor:
    """The shared expert's output (N, dim), scaled by its gate sigmoid(w·x) (N, 1) when it has one."""
    y = shared(x_ND)
    return y if gate is None else y * torch.sigmoid(gate(x_ND))


def count_per_expert(experts_M: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(M,) expert ids -> (E,) assignments per expert; a fixed output shape (bincount's depends on
    the data, which torch.compile cannot trace)."""
    return experts_M.new_zeros(num_experts).scatter_add_(0, experts_M, torch.ones_like(experts_M))


def route(logits_NE: torch.Tensor, top_k: int, norm_topk_prob: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> softmax probs_NE (N, E) fp32, the top-k weights_NK (N, K) (renormalised
    to sum to 1 with `norm_topk_prob`) and their experts_NK (N, K)."""
    probs_NE = logits_NE.float().softmax(-1)
    weights_NK, experts_NK = probs_NE.topk(top_k, dim=-1)
    if norm_topk_prob:
        weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
    return probs_NE, weights_NK, experts_NK


def dispatch(x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor, num_experts: int,
             experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropless dispatch: sort the M = N·K assignments by expert, run `experts(x_sorted (M, D),
    tokens_per_expert (E,)) -> (M, D)` on them (our `Experts`, or expert parallelism's exchange with
    the ranks owning them: cmoe_vlm/training/expert_parallel.py), weight and add back per token.
    Returns out_ND (N, D) and tokens_per_expert (E,)."""
    K = experts_NK.shape[1]
    experts_M = experts_NK.reshape(-1)
    tokens_per_expert = count_per_expert(experts_M, num_experts)
    order_M = experts_M.argsort(stable=True)
    token_M = order_M // K
    y_M = experts(x_ND.index_select(0, token_M), tokens_per_expert)  # backward: index_add
    y_M = y_M * weights_NK.reshape(-1)[order_M, None].to(y_M.dtype)
    return torch.zeros_like(x_ND).index_add_(0, token_M, y_M.to(x_ND.dtype)), tokens_per_expert


def mean_router_probs(probs_NE: torch.Tensor) -> torch.Tensor:
    """(N, E) -> (E,) mean router probability per expert (zeros without tokens)."""
    return probs_NE.mean(0) if probs_NE.shape[0] > 0 else probs_NE.sum(0)


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, dim, cfg.expert_hidden, cfg.impl)
        self.shared = SwiGLU(dim, cfg.shared_expert_hidden) if cfg.shared_expert_hidden else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor, with_stats: bool = True) -> tuple[torch.Tensor, MoEStats | None]:
        """x (..., dim) -> (..., dim), stats (None without `with_stats`: decoding reads no balance
        loss or expert counts, and skipping them saves ~10 small ops per layer per token)."""
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        N, E, K = x_ND.shape[0], self.cfg.num_experts, self.cfg.top_k
        probs_NE, weights_NK, experts_NK = route(self.router(x_ND), K, self.cfg.norm_topk_prob)
        if N * K <= E and not torch.is_grad_enabled():  # decoding: fewer assignments than experts
            out_ND = self.experts.per_token(x_ND, experts_NK, weights_NK)
            tokens_per_expert = count_per_expert(experts_NK.reshape(-1), E) if with_stats else None
        else:
            out_ND, tokens_per_expert = dispatch(x_ND, weights_NK, experts_NK, E, self.experts)
        if self.shared is not None:
            out_ND = out_ND + shared_expert(self.shared, self.shared_gate, x_ND)
        if not with_stats:
            return out_ND.view(shape), None
        return out_ND.view(shape), MoEStats(mean_router_probs(probs_NE), tokens_per_expert.detach())

"""Compute reallocation (docs/design.md §8): ConceptMoE configs matched to a baseline MoE in
activated FLOPs (attention map excluded) and total params.

Strategies, with A = the per-token, per-layer cost of a concept layer that does not scale
with top_k (attention projections + router + shared expert) and e = the FLOPs of one expert:
1. more active experts: k' = round(R·k + (R − 1)·A/e), so that (A + k'e)/R = A + ke;
2. looping: loop_layers and k' with (L_C + L_loop)(A + k'e)/R ≈ L_C(A + ke);
3. wider concept model: concept_dim ≈ √R·d (and expert_hidden ≈ √R·h, so a concept layer costs
   R× per concept and 1× per token), with the number of concept experts chosen to keep total params.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..model.config import ModelConfig
from .accounting import Cost, account, expert_flops, fixed_layer_flops, flops_breakdown, flops_per_token, total_params

STRATEGIES = ("baseline", "efficiency", "more_experts", "looped", "wider")


@dataclass
class Proposal:
    """One config proposed for a strategy, with its cost relative to the baseline.

    `config` and `cost` are None when the strategy does not fit (the reason is in `note`)."""
    strategy: str
    config: ModelConfig | None
    cost: Cost | None
    flops_ratio: float | None = None        # flops_per_token / baseline's
    params_diff_pct: float | None = None    # (total params / baseline's − 1) · 100
    attn_map_ratio: float | None = None     # attention-map FLOPs / baseline's at the same seq_len
    kv_ratio: float | None = None           # KV bytes per token / baseline's
    note: str = ""

    def summary(self) -> dict:
        """Plain-data record (JSON-friendly)."""
        c, cm = self.config, self.config.concept_moe_cfg if self.config else None
        return {
            "strategy": self.strategy,
            "fits": c is not None,
            "concept_top_k": cm.top_k if cm else None,
            "concept_experts": cm.num_experts if cm else None,
            "concept_expert_hidden": cm.expert_hidden if cm else None,
            "loop_layers": c.loop_layers if c else None,
            "concept_dim": c.concept_width if c else None,
            "ratio": self.cost.ratio if self.cost else None,
            "total_params": self.cost.total_params if self.cost else None,
            "activated_params": self.cost.activated_params if self.cost else None,
            "flops_per_token": self.cost.flops_per_token if self.cost else None,
            "attn_map_flops": self.cost.attn_map_flops if self.cost else None,
            "attn_map_flops_per_token": self.cost.attn_map_flops_per_token if self.cost else None,
            "kv_bytes_per_token": self.cost.kv_bytes_per_token if self.cost else None,
            "seq_len": self.cost.seq_len if self.cost else None,
            "flops_ratio": self.flops_ratio,
            "params_diff_pct": self.params_diff_pct,
            "attn_map_ratio": self.attn_map_ratio,
            "kv_ratio": self.kv_ratio,
            "note": self.note,
        }


def more_experts_top_k(top_k: int, ratio: float, a_over_e: float) -> int:
    """Strategy 1's rule: k' = round(R·k + (R − 1)·A/e), from (A + k'e)/R = A + ke."""
    return int(round(ratio * top_k + (ratio - 1) * a_over_e))


def _check_baseline(baseline: ModelConfig, ratio: float) -> None:
    if baseline.chunk.enabled:
        raise ValueError("the baseline must have chunking off (model.chunk.enabled = false)")
    if ratio <= 1:
        raise ValueError(f"ratio = {ratio}: must be > 1 to reallocate compute")


def _with_chunking(baseline: ModelConfig, ratio: float, **changes) -> ModelConfig:
    chunk = dataclasses.replace(baseline.chunk, enabled=True, ratio_mode="joint", target_ratio=float(ratio))
    return dataclasses.replace(baseline, chunk=chunk, **changes)


def proposal_for(strategy: str, cfg: ModelConfig, base: Cost, ratio: float, note: str = "") -> Proposal:
    cost = account(cfg, ratio, base.seq_len)
    return Proposal(
        strategy, cfg, cost, flops_ratio=cost.flops_per_token / base.flops_per_token,
        params_diff_pct=100 * (cost.total_params / base.total_params - 1),
        attn_map_ratio=cost.attn_map_flops / base.attn_map_flops,
        kv_ratio=cost.kv_bytes_per_token / base.kv_bytes_per_token, note=note,
    )


def _no_fit(strategy: str, note: str) -> Proposal:
    return Proposal(strategy, None, None, note=note)


def propose_efficiency(baseline: ModelConfig, ratio: float, seq_len: int | None = None) -> Proposal:
    """Chunking on, nothing reallocated: the same layers run on N/R concepts (fewer FLOPs)."""
    _check_baseline(baseline, ratio)
    base = account(baseline, seq_len=seq_len)
    return proposal_for("efficiency", _with_chunking(baseline, ratio), base, ratio,
                     "same depth and experts; concept layers run on N/R concepts")


def flops_mismatch(match: str, cfg: ModelConfig, baseline: ModelConfig, ratio: float) -> float:
    """Relative FLOPs mismatch of a candidate: of the concept layers alone (`concept`, the paper's
    equations) or of the whole model (`model`: chunk, joint-decoding and d→d_c→d overheads included)."""
    if match == "concept":
        part = lambda c, r: flops_breakdown(c, r)["concept"]  # noqa: E731
    elif match == "model":
        part = flops_per_token
    else:
        raise ValueError(f"match = {match!r}: must be 'concept' or 'model'")
    return part(cfg, ratio) / part(baseline, None) - 1


def propose_more_experts(baseline: ModelConfig, ratio: float, seq_len: int | None = None,
                         match: str = "concept") -> Proposal:
    """Strategy 1: raise the concept layers' top_k to k' = round(R·k + (R − 1)·A/e).

    match="model" instead takes the k' that best matches the whole model's activated FLOPs, paying
    for the chunk module and joint decoding out of the concept layers (a smaller k')."""
    _check_baseline(baseline, ratio)
    base = account(baseline, seq_len=seq_len)
    moe, dc = baseline.concept_moe_cfg, baseline.concept_width
    a_over_e = fixed_layer_flops(baseline, dc, moe) / expert_flops(dc, moe)
    build = lambda k: _with_chunking(baseline, ratio, concept_moe=dataclasses.replace(moe, top_k=k))  # noqa: E731
    k_new = more_experts_top_k(moe.top_k, ratio, a_over_e)
    how = f"k' = {ratio:g}·{moe.top_k} + {ratio - 1:g}·A/e (A/e = {a_over_e:.2f}) -> top{k_new}"
    if match != "concept":
        if moe.num_experts == 1:
            k_model = 1
        else:  # FLOPs are affine in top_k: solve with two valid probes, then round
            f1, f2 = (flops_mismatch(match, build(k), baseline, ratio) for k in (1, 2))
            k_model = max(1, int(round(1 - f1 / (f2 - f1))))
        how += f"; matched to the whole model: top{k_model}"
        k_new = k_model
    if k_new > moe.num_experts:
        return _no_fit("more_experts", (
            f"does not fit: {how} > num_experts = {moe.num_experts}; adding experts would add total params, "
            f"which this strategy keeps fixed: use looping or a wider concept model, or a smaller R"))
    return proposal_for("more_experts", build(k_new), base, ratio, how)


def propose_looped(baseline: ModelConfig, ratio: float, seq_len: int | None = None,
                   loop_layers: int | None = None, tolerance: float = 0.025, match: str = "concept") -> Proposal:
    """Strategy 2: loop L_loop concept layers and raise top_k to k' > k so that
    (L_C + L_loop)(A + k'e)/R ≈ L_C(A + ke)  (match="model": whole-model FLOPs instead).

    Searches L_loop in 1..L_C (or the given `loop_layers`) and k' in k+1..num_experts. Among the pairs
    that match within `tolerance` it takes the most looping (then the closer match); if none does,
    the closest match. The paper's own pick (top11-loop8) is one of several pairs that fit; pass
    `loop_layers` to fix the loop and get the matching k'.
    """
    _check_baseline(baseline, ratio)
    base = account(baseline, seq_len=seq_len)
    moe, L, k = baseline.concept_moe_cfg, baseline.concept_layers, baseline.concept_moe_cfg.top_k
    build = lambda n, kk: _with_chunking(baseline, ratio, loop_layers=n,  # noqa: E731
                                         concept_moe=dataclasses.replace(moe, top_k=kk))
    loops = [loop_layers] if loop_layers is not None else range(1, L + 1)
    pairs = []  # (relative mismatch, loop, k')
    for n_loop in loops:
        if not 1 <= n_loop <= L:
            raise ValueError(f"loop_layers = {n_loop}: must be between 1 and concept_layers = {L}")
        for k_new in range(k + 1, moe.num_experts + 1):
            pairs.append((abs(flops_mismatch(match, build(n_loop, k_new), baseline, ratio)), n_loop, k_new))
    fitting = [p for p in pairs if p[0] <= tolerance]
    best = max(fitting, key=lambda p: (p[1], -p[0])) if fitting else min(pairs, default=None)
    if best is None or best[0] > 0.1:
        A, e = fixed_layer_flops(baseline, baseline.concept_width, moe), expert_flops(baseline.concept_width, moe)
        why = (f"no top_k in {k + 1}..{moe.num_experts} to choose from" if best is None
               else f"the closest, top{best[2]}-loop{best[1]}, is {100 * best[0]:.0f}% off")
        return _no_fit("looped", f"does not fit: {why} (concept layers {L}, A/e = {A / e:.2f}, R = {ratio:g}); "
                                 f"looping needs R·(A+ke) > A+(k+1)e per looped layer")
    _, n_loop, k_new = best
    return proposal_for("looped", build(n_loop, k_new), base, ratio, f"top{k_new}-loop{n_loop}")


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def propose_wider(baseline: ModelConfig, ratio: float, seq_len: int | None = None,
                  scale: float | None = None, match: str = "concept") -> Proposal:
    """Strategy 3: concept_dim = s·d rounded to a multiple of 2·num_heads, s = √R by default, and the
    experts widened to match: expert_hidden is the one that best matches the FLOPs (≈ s·h; a concept
    layer then costs ≈ R× the baseline's per concept, 1× per token). The concept layers'
    num_experts is then the one that brings total params closest to the baseline's (and >= top_k)."""
    _check_baseline(baseline, ratio)
    base = account(baseline, seq_len=seq_len)
    s = math.sqrt(ratio) if scale is None else scale
    moe, d0 = baseline.concept_moe_cfg, baseline.concept_width
    dc = _round_to(s * d0, 2 * baseline.num_heads)
    shared = int(round(s * moe.shared_expert_hidden))

    def build(num_experts: int, hidden: int) -> ModelConfig:
        cm = dataclasses.replace(moe, num_experts=num_experts, expert_hidden=hidden, shared_expert_hidden=shared)
        return _with_chunking(baseline, ratio, concept_dim=dc if dc != baseline.dim else None, concept_moe=cm)

    def fit_hidden(num_experts: int) -> int:  # FLOPs are affine in expert_hidden: solve, then round
        f1, f2 = (flops_mismatch(match, build(num_experts, h), baseline, ratio) for h in (1, 2))
        return max(1, int(round(1 - f1 / (f2 - f1))))

    def fit_experts(hidden: int) -> int:  # total params are affine in num_experts: solve, then round
        k = moe.top_k
        p1, p2 = (total_params(build(n, hidden)) for n in (k, k + 1))
        guess = k + (base.total_params - p1) / (p2 - p1)
        return min({max(k, math.floor(guess)), max(k, math.ceil(guess))},
                   key=lambda n: abs(total_params(build(n, hidden)) - base.total_params))

    n_exp, hidden = moe.num_experts, moe.expert_hidden
    for _ in range(3):  # the router's FLOPs depend on num_experts: iterate to a fixed point
        hidden = fit_hidden(n_exp)
        n_exp = fit_experts(hidden)
    cfg = build(n_exp, hidden)
    note = (f"s = {s:.3f}: concept_dim {d0}->{dc}, expert_hidden {moe.expert_hidden}->{hidden}, "
            f"experts {moe.num_experts}->{n_exp}")
    if n_exp == moe.top_k and total_params(cfg) > base.total_params * 1.02:
        note += "; cannot shrink further (num_experts = top_k): params above the baseline"
    return proposal_for("wider", cfg, base, ratio, note)


def propose_flops_matched(baseline: ModelConfig, ratio: float, seq_len: int | None = None) -> Proposal:
    """The first strategy that fits: more experts, else looped concept layers, else a wider concept
    model (the quality-oriented ConceptMoE for a baseline). If none fits, a no-fit Proposal whose
    note gives every strategy's reason."""
    notes = []
    for proposer in (propose_more_experts, propose_looped, propose_wider):
        p = proposer(baseline, ratio, seq_len)
        if p.config is not None:
            return p
        notes.append(p.note)
    return _no_fit("flops_matched", "; ".join(notes))


def propose(baseline: ModelConfig, ratio: float, seq_len: int | None = None,
            loop_layers: int | None = None, match: str = "concept") -> list[Proposal]:
    """The baseline row, the efficiency-oriented variant and the three strategies' proposals.

    match="concept" (default) matches the concept layers' FLOPs as the paper's equations do, so the
    chunk module and joint decoding come on top (a few % at scale, ~10% on tiny CPU models);
    match="model" matches the whole model's activated FLOPs."""
    _check_baseline(baseline, ratio)
    base = account(baseline, seq_len=seq_len)
    rows = [Proposal("baseline", baseline, base, 1.0, 0.0, 1.0, 1.0, "chunking off")]
    rows.append(propose_efficiency(baseline, ratio, seq_len))
    rows.append(propose_more_experts(baseline, ratio, seq_len, match=match))
    rows.append(propose_looped(baseline, ratio, seq_len, loop_layers, match=match))
    rows.append(propose_wider(baseline, ratio, seq_len, match=match))
    return rows

"""FLOPs and parameter accounting from a `ModelConfig`, and compute reallocation (spec §8).

Everything here is derived from the config alone (no model is built), so it works for a
paper-scale config that would never fit in memory here. Conventions:

- FLOPs are 2 × multiply-adds of the matmuls of one forward pass, per token. Elementwise work
  (norms, RoPE, softmax, SiLU, the EMA) is not counted; the embedding lookup is 0; the LM head is
  counted. Training costs about 3× the forward.
- "Activated FLOPs" exclude the attention map (QK^T and AV), which depends on the sequence length
  and is reported separately by `attention_map_flops`.
- Concept-level work runs on N/R concepts for N tokens, so per token it is divided by R: the
  concept layers in execution order (looped layers count again, `cfg.concept_schedule()`) and the
  d→d_c→d maps of a wider concept model. Token-level work is not: encoder and decoder layers, the
  chunk module's q/k projections, joint-decoding projections and the LM head.
- The dechunk EMA is a linear recurrence, O(d) per concept, and is not counted (its blocked scan,
  `ema_scan`, does elementwise work only).
- Activated params: every parameter a token touches (embedding row and LM head included, see
  `activated_params_non_embedding` without them); a routed MoE layer counts its top_k experts.

Strategies (spec §8), with A = the per-token, per-layer cost of a concept layer that does not scale
with top_k (attention projections + router + shared expert) and e = the FLOPs of one expert:
1. more active experts: k' = round(R·k + (R − 1)·A/e), so that (A + k'e)/R = A + ke;
2. looping: loop_layers and k' with (L_C + L_loop)(A + k'e)/R ≈ L_C(A + ke);
3. wider concept model: concept_dim ≈ √R·d (and expert_hidden ≈ √R·h, so a concept layer costs
   R× per concept and 1× per token), with the number of concept experts chosen to keep total params.

CLI: `python -m cmoe_vlm.flops CONFIG.yaml [--ratio R] [--seq-len N]` (or `cmoe-flops`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, from_dict, load_yaml
from .layers.moe import MoEConfig
from .model import ModelConfig

STRATEGIES = ("baseline", "efficiency", "more_experts", "looped", "wider")


# ---------------------------------------------------------------------------------------------
# Per-layer pieces
def _attn_widths(cfg: ModelConfig, dim: int) -> tuple[int, int]:
    """(query width, key/value width) of an attention layer of hidden size `dim`."""
    head_dim = dim // cfg.num_heads
    return cfg.num_heads * head_dim, cfg.kv_heads * head_dim


def expert_flops(dim: int, moe: MoEConfig) -> int:
    """e: forward FLOPs of one SwiGLU expert on one token (w13: dim→2h, w2: h→dim)."""
    return 2 * 3 * dim * moe.expert_hidden


def attention_projection_flops(cfg: ModelConfig, dim: int, joint: bool = False) -> int:
    """Q/K/V and output projections of one layer per token (+ the concept Q/K/V when joint)."""
    q, kv = _attn_widths(cfg, dim)
    qkv = 2 * dim * (q + 2 * kv)
    return qkv + 2 * q * dim + (qkv if joint else 0)


def layer_flops(cfg: ModelConfig, dim: int, moe: MoEConfig, joint: bool = False) -> dict[str, int]:
    """Forward FLOPs of one block on one token (or concept), by part."""
    return {
        "attention": attention_projection_flops(cfg, dim, joint=False),
        "joint": attention_projection_flops(cfg, dim, joint=True) - attention_projection_flops(cfg, dim)
        if joint else 0,
        "router": 2 * dim * moe.num_experts,
        "experts": moe.top_k * expert_flops(dim, moe),
        "shared": 2 * 3 * dim * moe.shared_expert_hidden,
    }


def fixed_layer_flops(cfg: ModelConfig, dim: int, moe: MoEConfig) -> int:
    """A: the per-token cost of a (non-joint) layer that does not scale with top_k."""
    f = layer_flops(cfg, dim, moe)
    return f["attention"] + f["router"] + f["shared"]


def layer_params(cfg: ModelConfig, dim: int, moe: MoEConfig, joint: bool = False) -> dict[str, int]:
    """Parameters of one block, by part ("experts" = all routed experts, "expert" = one of them)."""
    q, kv = _attn_widths(cfg, dim)
    one_expert = 3 * dim * moe.expert_hidden
    return {
        "norms": 2 * dim + (dim if joint else 0),
        "attention": dim * (q + 2 * kv) + q * dim,
        "joint": dim * (q + 2 * kv) if joint else 0,
        "router": dim * moe.num_experts,
        "experts": moe.num_experts * one_expert,
        "shared": 3 * dim * moe.shared_expert_hidden,
        "expert": one_expert,
    }


def _decoder_joint_flags(cfg: ModelConfig) -> list[bool]:
    n_plain = cfg.decoder_layers - cfg.num_joint_layers
    return [i >= n_plain for i in range(cfg.decoder_layers)]


def _ratio(cfg: ModelConfig, ratio: float | None) -> float:
    """The compression the concept layers run at: 1 without chunking, else `ratio` or the target."""
    if not cfg.chunk.enabled:
        return 1.0
    if ratio is None:
        if cfg.chunk.ratio_mode != "joint":
            raise ValueError("a per_modality chunk config has no single target ratio: pass ratio=R "
                             "(the overall tokens/concepts you expect)")
        ratio = cfg.chunk.target_ratio
    if ratio < 1:
        raise ValueError(f"ratio = {ratio}: must be >= 1")
    return float(ratio)


# ---------------------------------------------------------------------------------------------
# Whole-model accounting
def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by component; "total" equals `sum(p.numel() for p in ConceptMoE(cfg).parameters())`."""
    d, dc, V = cfg.dim, cfg.concept_width, cfg.vocab_size
    block_total = lambda p: sum(v for k, v in p.items() if k != "expert")  # noqa: E731
    out = {
        "embedding": V * d,
        "encoder": cfg.encoder_layers * block_total(layer_params(cfg, d, cfg.moe)),
        "chunk": 2 * d * d if cfg.chunk.enabled else 0,
        "concept_maps": 2 * d * dc if dc != d else 0,
        "concept": cfg.concept_layers * block_total(layer_params(cfg, dc, cfg.concept_moe_cfg)),
        "decoder": sum(block_total(layer_params(cfg, d, cfg.moe, joint=j)) for j in _decoder_joint_flags(cfg)),
        "final_norm": d,
        "lm_head": 0 if cfg.tie_embeddings else V * d,
    }
    out["total"] = sum(out.values())
    return out


def total_params(cfg: ModelConfig) -> int:
    return param_counts(cfg)["total"]


def _inactive_expert_params(cfg: ModelConfig) -> int:
    def inactive(dim, moe):
        return (moe.num_experts - moe.top_k) * 3 * dim * moe.expert_hidden
    return ((cfg.encoder_layers + cfg.decoder_layers) * inactive(cfg.dim, cfg.moe)
            + cfg.concept_layers * inactive(cfg.concept_width, cfg.concept_moe_cfg))


def activated_params(cfg: ModelConfig) -> int:
    """Parameters one token touches: all but the routed experts it is not sent to. Looped concept
    layers reuse their weights, so they add nothing."""
    return total_params(cfg) - _inactive_expert_params(cfg)


def activated_params_non_embedding(cfg: ModelConfig) -> int:
    p = param_counts(cfg)
    return activated_params(cfg) - p["embedding"] - p["lm_head"]


def flops_breakdown(cfg: ModelConfig, ratio: float | None = None) -> dict[str, float]:
    """Activated forward FLOPs per token by component (attention map excluded); "total" is their sum.

    `ratio` is the achieved tokens/concepts (default: the config's target ratio; 1 without chunking).
    """
    R = _ratio(cfg, ratio)
    d, dc = cfg.dim, cfg.concept_width
    enc = sum(layer_flops(cfg, d, cfg.moe).values()) * cfg.encoder_layers
    dec = sum(sum(layer_flops(cfg, d, cfg.moe, joint=j).values()) for j in _decoder_joint_flags(cfg))
    concept_layer = sum(layer_flops(cfg, dc, cfg.concept_moe_cfg).values())
    out = {
        "encoder": float(enc),
        "chunk": float(2 * 2 * d * d) if cfg.chunk.enabled else 0.0,
        "concept_maps": 2 * 2 * d * dc / R if dc != d else 0.0,
        "concept": len(cfg.concept_schedule()) * concept_layer / R,
        "decoder": float(dec),
        "lm_head": float(2 * d * cfg.vocab_size),
    }
    out["total"] = sum(out.values())
    return out


def flops_per_token(cfg: ModelConfig, ratio: float | None = None) -> float:
    """Activated forward FLOPs per token, attention map excluded."""
    return flops_breakdown(cfg, ratio)["total"]


def attention_map_flops(cfg: ModelConfig, seq_len: int, ratio: float | None = None, causal: bool = False) -> float:
    """QK^T and AV FLOPs of one forward over a sequence of `seq_len` tokens (one document).

    Per layer 4·L²·q_width (2·L²·width each for QK^T and AV): token-level layers at L = N, concept
    layers (looped ones again) at L = N/R with their own width. `causal=False` counts the dense
    product a masked kernel computes (the paper's L_C·d·N² scaling); `causal=True` halves it, as a
    kernel that skips masked blocks does.
    """
    R = _ratio(cfg, ratio)
    q, _ = _attn_widths(cfg, cfg.dim)
    qc, _ = _attn_widths(cfg, cfg.concept_width)
    n, m = float(seq_len), seq_len / R
    total = (cfg.encoder_layers + cfg.decoder_layers) * 4 * n * n * q + len(cfg.concept_schedule()) * 4 * m * m * qc
    return total / 2 if causal else total


def kv_cache_bytes_per_token(cfg: ModelConfig, ratio: float | None = None, bytes_per_value: int = 2) -> float:
    """KV-cache bytes per cached token: token-level layers in full, concept layers (one cache per
    concept-schedule position, looped ones included) divided by R. Default bf16 (2 bytes)."""
    R = _ratio(cfg, ratio)
    _, kv = _attn_widths(cfg, cfg.dim)
    _, kvc = _attn_widths(cfg, cfg.concept_width)
    token = (cfg.encoder_layers + cfg.decoder_layers) * 2 * kv
    concept = len(cfg.concept_schedule()) * 2 * kvc / R
    return (token + concept) * bytes_per_value


@dataclass
class Cost:
    """Everything `account` computes for one config at one compression ratio and sequence length."""
    ratio: float
    seq_len: int
    total_params: int
    activated_params: int
    activated_params_non_embedding: int
    flops_per_token: float               # activated forward FLOPs per token, attention map excluded
    attn_map_flops: float                # QK^T + AV over one sequence of seq_len tokens (dense count)
    kv_bytes_per_token: float
    flops: dict[str, float] = field(default_factory=dict)   # flops_per_token by component
    params: dict[str, int] = field(default_factory=dict)    # total params by component

    @property
    def attn_map_flops_per_token(self) -> float:
        return self.attn_map_flops / self.seq_len

    @property
    def train_flops_per_token(self) -> float:
        """≈ 3 × forward (forward + backward), attention map included."""
        return 3 * (self.flops_per_token + self.attn_map_flops_per_token)


def account(cfg: ModelConfig, ratio: float | None = None, seq_len: int | None = None,
            bytes_per_value: int = 2) -> Cost:
    """All the numbers for `cfg` (ratio: see `flops_breakdown`; seq_len default cfg.max_seq_len)."""
    R = _ratio(cfg, ratio)
    seq_len = seq_len or cfg.max_seq_len
    fl = flops_breakdown(cfg, R)
    return Cost(
        ratio=R, seq_len=seq_len, total_params=total_params(cfg), activated_params=activated_params(cfg),
        activated_params_non_embedding=activated_params_non_embedding(cfg), flops_per_token=fl["total"],
        attn_map_flops=attention_map_flops(cfg, seq_len, R), kv_bytes_per_token=kv_cache_bytes_per_token(
            cfg, R, bytes_per_value), flops=fl, params=param_counts(cfg),
    )


# ---------------------------------------------------------------------------------------------
# Compute reallocation (spec §8)
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


def _proposal(strategy: str, cfg: ModelConfig, base: Cost, ratio: float, note: str = "") -> Proposal:
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
    return _proposal("efficiency", _with_chunking(baseline, ratio), base, ratio,
                     "same depth and experts; concept layers run on N/R concepts")


def _mismatch(match: str, cfg: ModelConfig, baseline: ModelConfig, ratio: float) -> float:
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
            f1, f2 = (_mismatch(match, build(k), baseline, ratio) for k in (1, 2))
            k_model = max(1, int(round(1 - f1 / (f2 - f1))))
        how += f"; matched to the whole model: top{k_model}"
        k_new = k_model
    if k_new > moe.num_experts:
        return _no_fit("more_experts", (
            f"does not fit: {how} > num_experts = {moe.num_experts}; adding experts would add total params, "
            f"which this strategy keeps fixed: use looping or a wider concept model, or a smaller R"))
    return _proposal("more_experts", build(k_new), base, ratio, how)


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
            pairs.append((abs(_mismatch(match, build(n_loop, k_new), baseline, ratio)), n_loop, k_new))
    fitting = [p for p in pairs if p[0] <= tolerance]
    best = max(fitting, key=lambda p: (p[1], -p[0])) if fitting else min(pairs, default=None)
    if best is None or best[0] > 0.1:
        A, e = fixed_layer_flops(baseline, baseline.concept_width, moe), expert_flops(baseline.concept_width, moe)
        why = (f"no top_k in {k + 1}..{moe.num_experts} to choose from" if best is None
               else f"the closest, top{best[2]}-loop{best[1]}, is {100 * best[0]:.0f}% off")
        return _no_fit("looped", f"does not fit: {why} (concept layers {L}, A/e = {A / e:.2f}, R = {ratio:g}); "
                                 f"looping needs R·(A+ke) > A+(k+1)e per looped layer")
    _, n_loop, k_new = best
    return _proposal("looped", build(n_loop, k_new), base, ratio, f"top{k_new}-loop{n_loop}")


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
        f1, f2 = (_mismatch(match, build(num_experts, h), baseline, ratio) for h in (1, 2))
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
    return _proposal("wider", cfg, base, ratio, note)


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


# ---------------------------------------------------------------------------------------------
# Config files and the CLI
def model_config_from_data(data: dict) -> ModelConfig:
    """A ModelConfig from YAML data: a top-level `model:` section, or a bare ModelConfig mapping."""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="cmoe-flops",
        description="Params, activated FLOPs/token (attention map excluded), attention-map FLOPs and KV "
                    "bytes of a model config, and ConceptMoE configs matched to it in activated FLOPs "
                    "by the paper's three compute-reallocation strategies.")
    ap.add_argument("config", help="YAML with a top-level `model:` section, or a bare ModelConfig mapping")
    ap.add_argument("--ratio", type=float, default=None,
                    help="compression R (default: the config's model.chunk.target_ratio)")
    ap.add_argument("--seq-len", type=int, default=None, help="for attention-map FLOPs (default: max_seq_len)")
    ap.add_argument("--loop-layers", type=int, default=None, help="fix the looped strategy's loop_layers")
    ap.add_argument("--match", choices=("concept", "model"), default="concept",
                    help="match the concept layers' FLOPs (the paper's equations, default) or the whole model's")
    ap.add_argument("--kv-bytes", type=int, default=2, help="bytes per cached value (default 2, bf16)")
    ap.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        cfg = load_model_config(args.config)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
        print(f"error: ratio = {ratio}: must be > 1 (pass --ratio)", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())

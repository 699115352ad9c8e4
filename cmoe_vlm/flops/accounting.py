"""FLOPs and parameter accounting from a `ModelConfig` (docs/design.md §8).

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
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..model.config import ModelConfig
from ..model.layers.moe import MoEConfig


# ---------------------------------------------------------------------------------------------
# Per-layer pieces
def _attn_widths(cfg: ModelConfig, dim: int) -> tuple[int, int]:
    """(query width, key/value width) of an attention layer of hidden size `dim`."""
    attn = cfg.attention(dim)
    return attn.q_dim, attn.kv_dim


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
        "shared": 2 * 3 * dim * moe.shared_expert_hidden + (2 * dim if moe.shared_expert_gate else 0),
    }


def fixed_layer_flops(cfg: ModelConfig, dim: int, moe: MoEConfig) -> int:
    """A: the per-token cost of a (non-joint) layer that does not scale with top_k."""
    f = layer_flops(cfg, dim, moe)
    return f["attention"] + f["router"] + f["shared"]


def layer_params(cfg: ModelConfig, dim: int, moe: MoEConfig, joint: bool = False) -> dict[str, int]:
    """Parameters of one block, by part ("experts" = all routed experts, "expert" = one of them)."""
    attn = cfg.attention(dim)
    q, kv = attn.q_dim, attn.kv_dim
    one_expert = 3 * dim * moe.expert_hidden
    qk_norm = {"none": 0, "head": 2 * attn.head_dim, "full": q + kv}[attn.qk_norm]
    bias = (q + 2 * kv if attn.qkv_bias else 0) + (dim if attn.out_bias else 0)
    return {
        "norms": 2 * dim + (dim if joint else 0) + qk_norm,
        "attention": dim * (q + 2 * kv) + q * dim + bias,
        "joint": dim * (q + 2 * kv) if joint else 0,
        "router": dim * moe.num_experts,
        "experts": moe.num_experts * one_expert,
        "shared": 3 * dim * moe.shared_expert_hidden + (dim if moe.shared_expert_gate else 0),
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


Lengths = Sequence[Sequence[int]]  # per row, the lengths of its documents (tokens, or concepts)

TOKEN_LEVEL = ("encoder", "chunk", "decoder", "lm_head")  # flops_breakdown parts that run on every token
CONCEPT_LEVEL = ("concept_maps", "concept")               # and on every concept (at R = 1: per concept)


def realized_flops(cfg: ModelConfig, tokens: Lengths, concepts: Lengths | None = None) -> dict[str, float]:
    """Forward FLOPs of one packed forward as it ran: token-level work for each real token, concept-level
    work for each real concept (`concepts`: concepts per document of each row, as the merger counted
    them; None without chunking, where the concept layers run on the tokens), and the attention map
    of each document at its own length, causal (2·q_width·n² per layer for n positions: half the
    dense QK^T + AV, as `attention_map_flops(causal=True)`). Padding is not credited.
    Returns {"linear", "attention", "total"}."""
    if cfg.chunk.enabled and concepts is None:
        raise ValueError("a ConceptMoE forward needs its realized concept counts (ModelOutput.concept_lengths)")
    concepts = tokens if concepts is None else concepts
    per = flops_breakdown(cfg, 1.0)
    n_tok = sum(n for row in tokens for n in row)
    n_con = sum(n for row in concepts for n in row)
    linear = n_tok * sum(per[k] for k in TOKEN_LEVEL) + n_con * sum(per[k] for k in CONCEPT_LEVEL)
    q, _ = _attn_widths(cfg, cfg.dim)
    qc, _ = _attn_widths(cfg, cfg.concept_width)
    squares = lambda lengths: sum(n * n for row in lengths for n in row)  # noqa: E731
    attention = (2 * q * (cfg.encoder_layers + cfg.decoder_layers) * squares(tokens)
                 + 2 * qc * len(cfg.concept_schedule()) * squares(concepts))
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


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

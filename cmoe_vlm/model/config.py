"""ModelConfig: the ConceptMoE language model's shape, one dataclass (docs/design.md §1, §8).

With `chunk.enabled = False` it describes the baseline MoE: the same stack, every token its own
concept, no joint decoding. Values derived from others are properties, stated nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cmoe_base import check

from .chunk import ChunkConfig
from .layers.attention import AttentionConfig
from .layers.moe import MoEConfig
from .layers.rope import RopeScaling


@dataclass
class ModelConfig:
    vocab_size: int = 262
    dim: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None        # None = num_heads (plain MHA); fewer = GQA
    encoder_layers: int = 2
    concept_layers: int = 2
    decoder_layers: int = 2
    loop_layers: int = 0                   # the first N concept layers run a second time (shared weights)
    concept_dim: int | None = None         # wider concept model (None = dim), with d→d_c→d maps
    joint_layers: int | None = None        # last N decoder layers use joint decoding (None = all)
    moe: MoEConfig = field(default_factory=MoEConfig)            # encoder and decoder layers
    concept_moe: MoEConfig | None = None   # concept layers (None = same as moe)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # scaled RoPE frequencies (linear, llama3, yarn); None = plain
    lb_loss_weight: float = 0.01
    init_std: float = 0.02
    tie_embeddings: bool = False
    # Layer options of imported families (docs/design.md §16); the defaults are the plain layers.
    head_dim: int | None = None            # None = width / num_heads; set: q/k/v heads of this size
    attention_bias: Literal["none", "qkv", "all"] = "none"  # bias on q/k/v (Qwen2-MoE), and on the output
    qk_norm: Literal["none", "head", "full"] = "none"       # RMSNorm of q and k before RoPE (see AttentionConfig)
    clip_qkv: float | None = None          # clamp q/k/v to ±clip_qkv (OLMoE)
    norm_eps: float = 1e-6                 # every RMSNorm's epsilon

    def __post_init__(self):
        check(self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be >= 2")
        check(self.num_heads > 0, "num_heads", self.num_heads, "must be > 0")
        if self.head_dim is None:
            check(self.dim > 0 and self.dim % self.num_heads == 0, "num_heads", self.num_heads,
                  f"must divide dim={self.dim}")
            check((self.dim // self.num_heads) % 2 == 0, "num_heads", self.num_heads,
                  f"dim/num_heads must be even for RoPE (dim={self.dim})")
        else:
            check(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", self.head_dim,
                  "must be a positive even number (RoPE rotates pairs), or null for dim / num_heads")
        check(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv", self.clip_qkv, "must be > 0, or null")
        check(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        kv = self.kv_heads
        check(kv > 0 and self.num_heads % kv == 0, "num_kv_heads", self.num_kv_heads,
              f"must divide num_heads={self.num_heads}")
        for name in ("encoder_layers", "decoder_layers"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        check(self.concept_layers >= 1, "concept_layers", self.concept_layers, "must be >= 1")
        check(0 <= self.loop_layers <= self.concept_layers, "loop_layers", self.loop_layers,
              f"must be between 0 and concept_layers={self.concept_layers}")
        cdim = self.concept_width
        check(self.head_dim is not None or (cdim % self.num_heads == 0 and (cdim // self.num_heads) % 2 == 0),
              "concept_dim", self.concept_dim, f"must be a multiple of 2*num_heads={2 * self.num_heads}")
        check(self.joint_layers is None or 0 <= self.joint_layers <= self.decoder_layers, "joint_layers",
              self.joint_layers, f"must be between 0 and decoder_layers={self.decoder_layers} (or null = all)")
        check(self.max_seq_len > 0, "max_seq_len", self.max_seq_len, "must be > 0")
        check(self.lb_loss_weight >= 0, "lb_loss_weight", self.lb_loss_weight, "must be >= 0")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def concept_width(self) -> int:
        return self.concept_dim or self.dim

    @property
    def concept_moe_cfg(self) -> MoEConfig:
        return self.concept_moe or self.moe

    @property
    def num_joint_layers(self) -> int:
        if not self.chunk.enabled:
            return 0
        return self.decoder_layers if self.joint_layers is None else self.joint_layers

    def attention(self, width: int) -> AttentionConfig:
        """The attention layers of a stack of hidden size `width` (dim, or concept_width)."""
        return AttentionConfig(dim=width, num_heads=self.num_heads, num_kv_heads=self.kv_heads,
                               head_dim=self.head_dim or width // self.num_heads,
                               qkv_bias=self.attention_bias != "none", out_bias=self.attention_bias == "all",
                               qk_norm=self.qk_norm, clip_qkv=self.clip_qkv, norm_eps=self.norm_eps)

    def concept_schedule(self) -> list[int]:
        """Concept layer indices in execution order: all layers, then the looped ones again."""
        return list(range(self.concept_layers)) + list(range(self.loop_layers))

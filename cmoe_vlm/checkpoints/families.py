"""Hugging Face MoE families as our layers (docs/design.md §16): configs and weight names, both ways.

A family is one transformers architecture whose forward our baseline MoE reproduces exactly with
the right layer options (`ModelConfig` fields): Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

    family = FAMILIES["mixtral"]
    cfg = family.model_config(hf_config, raw_json)     # ModelConfig, or Unsupported naming the field
    rules = family.import_rules(cfg, source_names)     # our weight <- their tensors (tensor_files.Rule)
    hf_json = family.hf_config(cfg, base)              # and back: their config.json ...
    rules = family.export_rules(cfg)                   # ... and their weight names

Their layer i becomes our concept layer i (a baseline is one stack; `cmoe_vlm.cli.convert` re-splits it).
What differs between the families, as transformers 5.24 computes it:

| | Mixtral | Qwen2-MoE | Qwen3-MoE | OLMoE |
|---|---|---|---|---|
| top-k weights | renormalised | `norm_topk_prob` | `norm_topk_prob` | `norm_topk_prob` |
| shared expert | - | sigmoid-gated | - | - |
| attention bias | - | q/k/v (`qkv_bias`) | q/k/v/o (`attention_bias`) | q/k/v/o (`attention_bias`) |
| q/k norm | - | - | per head | whole q and k, then `clip_qkv` |
| expert width | `intermediate_size` | `moe_intermediate_size` | `moe_intermediate_size` | `intermediate_size` |

Anything their forward does that ours does not (sliding windows, dense MLP layers, other
activations, other RoPE types, quantised weights, remote code, a key we do not know) raises
`Unsupported` with one line naming it: an import never has different logits.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model.chunk import ChunkConfig
from ..model.config import ModelConfig
from ..model.layers.moe import MoEConfig
from ..model.layers.rope import RopeScaling
from .tensor_files import Rule

LAYER = "lm.concept.layers.{i}."  # our name of their decoder layer i (a baseline is one stack)
# Keys every transformers config.json may hold that do not change the forward (or are checked elsewhere).
GENERIC_KEYS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
                "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "return_dict",
                "output_hidden_states", "output_attentions", "output_router_logits", "router_aux_loss_coef",
                "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
                "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "hidden_act", "rms_norm_eps", "num_experts_per_tok", "attention_dropout"}


class Unsupported(ValueError):
    """A checkpoint feature our layers do not reproduce; the message is one line naming it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise Unsupported(message)


def _first(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _cat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(ts), dim=0)


def _part(start: int, stop: int) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    return lambda ts: ts[0][start:stop].contiguous()


# ------------------------------------------------------------------------------------------ RoPE
def rope_from_hf(hf: Any) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from a transformers config's normalised `rope_parameters`."""
    p = dict(getattr(hf, "rope_parameters", None) or {})
    theta = float(p.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    partial = p.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    _require(partial in (None, 1, 1.0), f"partial_rotary_factor = {partial}: RoPE on part of each head is not "
                                        f"supported")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return theta, None
    factor = p.get("factor")
    original = p.get("original_max_position_embeddings")
    if kind == "linear":
        return theta, RopeScaling("linear", float(factor))
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(factor), int(original), low_freq_factor=float(p["low_freq_factor"]),
                                  high_freq_factor=float(p["high_freq_factor"]))
    if kind == "yarn":
        factor = float(factor) if factor is not None else hf.max_position_embeddings / original
        attention = p.get("attention_factor")
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if attention is None and mscale and mscale_all:
            def m(scale: float, k: float) -> float:
                return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0
            attention = m(factor, mscale) / m(factor, mscale_all)
        return theta, RopeScaling("yarn", factor, int(original), beta_fast=float(p.get("beta_fast") or 32),
                                  beta_slow=float(p.get("beta_slow") or 1),
                                  attention_factor=None if attention is None else float(attention),
                                  truncate=bool(p.get("truncate", True)))
    raise Unsupported(f"rope_type = {kind!r}: supported are default, linear, llama3 and yarn")


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` for a transformers config."""
    s = cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": "default" if s is None else s.type, "rope_theta": cfg.rope_theta}
    if s is None:
        return out
    out["factor"] = s.factor
    if s.type == "llama3":
        out.update(original_max_position_embeddings=s.original_max_position, low_freq_factor=s.low_freq_factor,
                   high_freq_factor=s.high_freq_factor)
    elif s.type == "yarn":
        out.update(original_max_position_embeddings=s.original_max_position, beta_fast=s.beta_fast,
                   beta_slow=s.beta_slow, truncate=s.truncate)
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
    return out


# ------------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    name: str                  # transformers' model_type
    architecture: str          # the CausalLM class
    moe_module: str            # the MoE block's name in hub checkpoints
    expert_names: tuple[str, str, str]  # one expert's gate, up and down projections in hub checkpoints
    expert_width_key: str
    num_experts_key: str
    shared_expert: bool = False
    bias_key: str | None = None       # config key of the attention bias
    bias_on_output: bool = False
    qk_norm: str = "none"             # "head" or "full" when the family normalises q and k
    family_keys: frozenset[str] = frozenset()  # keys of its own, each handled in model_config

    # ------------------------------------------------------------------ config
    def check_keys(self, raw: dict[str, Any]) -> None:
        """Refuse a config.json with a key we do not know for this family (quantisation, remote code, ...)
        or another architecture; run before transformers reads it."""
        known = GENERIC_KEYS | self.family_keys | {self.expert_width_key, self.num_experts_key}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise Unsupported(f"config key {unknown[0]!r} (= {raw[unknown[0]]!r}) is not something this importer "
                              f"knows for {self.name}; refusing rather than ignoring it")
        archs = raw.get("architectures") or [self.architecture]
        _require(self.architecture in archs, f"architectures = {archs}: expected {self.architecture}")

    def model_config(self, hf: Any, raw: dict[str, Any]) -> ModelConfig:
        """Our baseline's config for their config (`hf`: the transformers config object, whose defaults
        fill what `raw`, the config.json, leaves out). Raises Unsupported for anything we cannot reproduce."""
        self.check_keys(raw)
        _require(hf.hidden_act == "silu", f"hidden_act = {hf.hidden_act!r}: only silu (SwiGLU experts) is supported")
        _require(not getattr(hf, "attention_dropout", 0), f"attention_dropout = {hf.attention_dropout}: our "
                                                          f"attention has no dropout (set it to 0 to import)")
        self._check_family(hf)
        heads, dim = hf.num_attention_heads, hf.hidden_size
        head_dim = getattr(hf, "head_dim", None) or dim // heads
        theta, scaling = rope_from_hf(hf)
        num_experts, top_k = getattr(hf, self.num_experts_key), hf.num_experts_per_tok
        moe = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=getattr(hf, self.expert_width_key),
                        shared_expert_hidden=hf.shared_expert_intermediate_size if self.shared_expert else 0,
                        shared_expert_gate=self.shared_expert,
                        norm_topk_prob=True if self.name == "mixtral" else bool(hf.norm_topk_prob))
        bias = bool(getattr(hf, self.bias_key)) if self.bias_key else False
        return ModelConfig(
            vocab_size=hf.vocab_size, dim=dim, num_heads=heads, num_kv_heads=hf.num_key_value_heads or heads,
            head_dim=None if head_dim * heads == dim else head_dim,
            encoder_layers=0, concept_layers=hf.num_hidden_layers, decoder_layers=0, moe=moe,
            chunk=ChunkConfig(enabled=False), max_seq_len=hf.max_position_embeddings, rope_theta=theta,
            rope_scaling=scaling, lb_loss_weight=float(getattr(hf, "router_aux_loss_coef", 0.001)) * top_k,
            init_std=float(getattr(hf, "initializer_range", 0.02)), tie_embeddings=bool(hf.tie_word_embeddings),
            attention_bias=("all" if self.bias_on_output else "qkv") if bias else "none", qk_norm=self.qk_norm,
            clip_qkv=getattr(hf, "clip_qkv", None), norm_eps=float(hf.rms_norm_eps))

    def _check_family(self, hf: Any) -> None:
        if self.name == "mixtral":
            _require(hf.sliding_window is None, f"sliding_window = {hf.sliding_window}: sliding-window attention is "
                                                f"not supported (set it to null if no input exceeds it)")
            _require(not hf.router_jitter_noise, f"router_jitter_noise = {hf.router_jitter_noise}: router noise in "
                                                 f"training is not supported (set it to 0 to import)")
        if self.name in ("qwen2_moe", "qwen3_moe"):
            _require(not hf.use_sliding_window, "use_sliding_window = true: sliding-window attention is not supported")
            _require(not hf.mlp_only_layers and hf.decoder_sparse_step == 1,
                     f"mlp_only_layers = {hf.mlp_only_layers}, decoder_sparse_step = {hf.decoder_sparse_step}: dense "
                     f"(non-MoE) layers are not supported; every layer must be an MoE layer")
        if self.name == "qwen2_moe":
            _require(all(t == "full_attention" for t in hf.layer_types),
                     f"layer_types = {hf.layer_types}: sliding-window layers are not supported")
            _require(hf.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size = 0 is not supported")
        if self.name == "olmoe":
            head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
            _require(head_dim * hf.num_attention_heads == hf.hidden_size,
                     f"head_dim = {head_dim}: OLMoE's k norm assumes hidden_size / num_attention_heads")

    def check_exportable(self, cfg: ModelConfig) -> None:
        """Raise Unsupported unless `cfg` is a baseline this family's config can state exactly."""
        _require(not cfg.chunk.enabled, "a ConceptMoE (chunking on) has no transformers family: export a baseline")
        _require(cfg.loop_layers == 0 and cfg.concept_dim in (None, cfg.dim),
                 "looped or wider concept layers have no transformers family")
        _require(cfg.concept_moe in (None, cfg.moe), "layers with different MoE configs have no transformers family")
        m = cfg.moe
        shared = "needs a sigmoid-gated shared expert" if self.shared_expert else "has no shared expert"
        _require(bool(m.shared_expert_hidden) == self.shared_expert and m.shared_expert_gate == self.shared_expert,
                 f"{self.name} {shared} (moe.shared_expert_hidden = {m.shared_expert_hidden}, "
                 f"shared_expert_gate = {m.shared_expert_gate})")
        _require(m.norm_topk_prob or self.name != "mixtral", "mixtral always renormalises the top-k weights "
                                                             "(moe.norm_topk_prob = false)")
        allowed_bias = {"none"} | ({"all" if self.bias_on_output else "qkv"} if self.bias_key else set())
        _require(cfg.attention_bias in allowed_bias, f"attention_bias = {cfg.attention_bias!r}: {self.name} allows "
                                                     f"{sorted(allowed_bias)}")
        _require(cfg.qk_norm == self.qk_norm, f"qk_norm = {cfg.qk_norm!r}: {self.name} has {self.qk_norm!r}")
        _require(cfg.clip_qkv is None or self.name == "olmoe", f"clip_qkv: {self.name} has none")
        _require(cfg.head_dim in (None, cfg.dim // cfg.num_heads) or self.name in ("mixtral", "qwen3_moe"),
                 f"head_dim = {cfg.head_dim}: {self.name} derives it from hidden_size / num_attention_heads")

    def hf_config(self, cfg: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """Their config.json for our baseline `cfg`: `base` (the imported config.json, if any) with every
        field our config decides overwritten."""
        self.check_exportable(cfg)
        m = cfg.moe
        dropped = ("rope_theta", "rope_scaling", "torch_dtype", "layer_types")  # transformers derives them
        out = {k: v for k, v in (base or {}).items() if k not in dropped}
        out.update(
            model_type=self.name, architectures=[self.architecture], vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
            num_hidden_layers=cfg.encoder_layers + cfg.concept_layers + cfg.decoder_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_parameters=rope_to_hf(cfg),
            tie_word_embeddings=cfg.tie_embeddings, num_experts_per_tok=m.top_k, attention_dropout=0.0,
            initializer_range=cfg.init_std, router_aux_loss_coef=cfg.lb_loss_weight / m.top_k,
            **{self.num_experts_key: m.num_experts, self.expert_width_key: m.expert_hidden})
        if self.name in ("mixtral", "qwen3_moe"):  # the others derive it from hidden_size / heads
            out["head_dim"] = cfg.attention(cfg.dim).head_dim
        if self.bias_key:
            out[self.bias_key] = cfg.attention_bias != "none"
        if self.name != "mixtral":
            out["norm_topk_prob"] = m.norm_topk_prob
        if self.shared_expert:
            out["shared_expert_intermediate_size"] = m.shared_expert_hidden
        if self.name == "olmoe":
            out["clip_qkv"] = cfg.clip_qkv
        return out

    # ------------------------------------------------------------------ weights
    def _hf_layer(self, i: int) -> str:
        return f"model.layers.{i}."

    def import_rules(self, cfg: ModelConfig, names: Sequence[str]) -> list[Rule]:
        """Our weights from theirs. Experts are read in either of transformers' layouts: one tensor per
        expert and projection (what `save_pretrained` writes) or fused per layer (its in-memory names)."""
        a = cfg.attention(cfg.dim)
        present = set(names)
        rules = [Rule("lm.embed.weight", ("model.embed_tokens.weight",), _first),
                 Rule("lm.norm.weight", ("model.norm.weight",), _first)]
        head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
        rules.append(Rule("lm.lm_head.weight", (head,), _first))
        for i in range(cfg.concept_layers):
            ours, theirs = LAYER.format(i=i), self._hf_layer(i)
            att = theirs + "self_attn."
            rules += [Rule(ours + "attn_norm.weight", (theirs + "input_layernorm.weight",), _first),
                      Rule(ours + "ffn_norm.weight", (theirs + "post_attention_layernorm.weight",), _first),
                      Rule(ours + "attn.qkv.weight", tuple(f"{att}{p}_proj.weight" for p in "qkv"), _cat),
                      Rule(ours + "attn.out.weight", (att + "o_proj.weight",), _first)]
            if a.qkv_bias:
                rules.append(Rule(ours + "attn.qkv.bias", tuple(f"{att}{p}_proj.bias" for p in "qkv"), _cat))
            if a.out_bias:
                rules.append(Rule(ours + "attn.out.bias", (att + "o_proj.bias",), _first))
            if a.qk_norm != "none":
                rules += [Rule(ours + f"attn.{p}_norm.weight", (f"{att}{p}_norm.weight",), _first) for p in "qk"]
            rules += self._moe_import_rules(cfg, i, present)
        return rules

    def _moe_import_rules(self, cfg: ModelConfig, i: int, present: set[str]) -> list[Rule]:
        ours = LAYER.format(i=i) + "moe."
        hub, fused = self._hf_layer(i) + self.moe_module + ".", self._hf_layer(i) + "mlp."
        E = cfg.moe.num_experts
        if fused + "experts.gate_up_proj" in present:  # (E, 2I, H) gate first, (E, H, I)
            base = fused
            rules = [Rule(ours + "experts.w13", (fused + "experts.gate_up_proj",),
                          lambda ts: ts[0].transpose(1, 2).contiguous()),
                     Rule(ours + "experts.w2", (fused + "experts.down_proj",),
                          lambda ts: ts[0].transpose(1, 2).contiguous())]
        else:
            base = hub
            g, u, d = self.expert_names
            rules = [Rule(ours + "experts.w13",
                          tuple(f"{hub}experts.{e}.{p}.weight" for e in range(E) for p in (g, u)),
                          lambda ts: torch.stack([torch.cat([ts[2 * e].T, ts[2 * e + 1].T], dim=1)
                                                  for e in range(len(ts) // 2)])),
                     Rule(ours + "experts.w2", tuple(f"{hub}experts.{e}.{d}.weight" for e in range(E)),
                          lambda ts: torch.stack([t.T for t in ts]))]
        rules.append(Rule(ours + "router.weight", (base + "gate.weight",), _first))
        if self.shared_expert:
            s = base + "shared_expert."
            rules += [Rule(ours + "shared.w13.weight", (s + "gate_proj.weight", s + "up_proj.weight"), _cat),
                      Rule(ours + "shared.w2.weight", (s + "down_proj.weight",), _first),
                      Rule(ours + "shared_gate.weight", (base + "shared_expert_gate.weight",), _first)]
        return rules

    def export_rules(self, cfg: ModelConfig) -> list[Rule]:
        """Their weights (hub names, one tensor per expert) from our baseline's."""
        self.check_exportable(cfg)
        a = cfg.attention(cfg.dim)
        q, kv = a.q_dim, a.kv_dim
        I, Is = cfg.moe.expert_hidden, cfg.moe.shared_expert_hidden
        rules = [Rule("model.embed_tokens.weight", ("lm.embed.weight",), _first),
                 Rule("model.norm.weight", ("lm.norm.weight",), _first)]
        if not cfg.tie_embeddings:
            rules.append(Rule("lm_head.weight", ("lm.lm_head.weight",), _first))
        layers = [f"lm.{stack}.layers.{j}." for stack, n in (("encoder", cfg.encoder_layers),
                                                            ("concept", cfg.concept_layers),
                                                            ("decoder", cfg.decoder_layers)) for j in range(n)]
        for i, ours in enumerate(layers):
            theirs = self._hf_layer(i)
            att = theirs + "self_attn."
            rules += [Rule(theirs + "input_layernorm.weight", (ours + "attn_norm.weight",), _first),
                      Rule(theirs + "post_attention_layernorm.weight", (ours + "ffn_norm.weight",), _first),
                      Rule(att + "o_proj.weight", (ours + "attn.out.weight",), _first)]
            for name, (lo, hi) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
                rules.append(Rule(f"{att}{name}_proj.weight", (ours + "attn.qkv.weight",), _part(lo, hi)))
                if a.qkv_bias:
                    rules.append(Rule(f"{att}{name}_proj.bias", (ours + "attn.qkv.bias",), _part(lo, hi)))
            if a.out_bias:
                rules.append(Rule(att + "o_proj.bias", (ours + "attn.out.bias",), _first))
            if a.qk_norm != "none":
                rules += [Rule(f"{att}{p}_norm.weight", (ours + f"attn.{p}_norm.weight",), _first) for p in "qk"]
            moe = theirs + self.moe_module + "."
            rules.append(Rule(moe + "gate.weight", (ours + "moe.router.weight",), _first))
            g, u, d = self.expert_names
            for e in range(cfg.moe.num_experts):
                rules += [Rule(f"{moe}experts.{e}.{g}.weight", (ours + "moe.experts.w13",),
                               lambda ts, e=e: ts[0][e, :, :I].T.contiguous()),
                          Rule(f"{moe}experts.{e}.{u}.weight", (ours + "moe.experts.w13",),
                               lambda ts, e=e: ts[0][e, :, I:].T.contiguous()),
                          Rule(f"{moe}experts.{e}.{d}.weight", (ours + "moe.experts.w2",),
                               lambda ts, e=e: ts[0][e].T.contiguous())]
            if self.shared_expert:
                s = moe + "shared_expert."
                rules += [Rule(s + "gate_proj.weight", (ours + "moe.shared.w13.weight",), _part(0, Is)),
                          Rule(s + "up_proj.weight", (ours + "moe.shared.w13.weight",), _part(Is, 2 * Is)),
                          Rule(s + "down_proj.weight", (ours + "moe.shared.w2.weight",), _first),
                          Rule(moe + "shared_expert_gate.weight", (ours + "moe.shared_gate.weight",), _first)]
        return rules


FAMILIES = {f.name: f for f in (
    Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
           "intermediate_size", "num_local_experts", family_keys=frozenset({"sliding_window", "router_jitter_noise"})),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
           "moe_intermediate_size", "num_experts", shared_expert=True, bias_key="qkv_bias",
           family_keys=frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
                                  "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "qkv_bias",
                                  "shared_expert_intermediate_size", "intermediate_size"})),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
           "moe_intermediate_size", "num_experts", bias_key="attention_bias", bias_on_output=True, qk_norm="head",
           family_keys=frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "decoder_sparse_step",
                                  "mlp_only_layers", "norm_topk_prob", "attention_bias", "intermediate_size",
                                  "num_local_experts"})),
    Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
           "intermediate_size", "num_experts", bias_key="attention_bias", bias_on_output=True, qk_norm="full",
           family_keys=frozenset({"norm_topk_prob", "attention_bias", "clip_qkv"})),
)}


def family_of(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise Unsupported(f"model_type = {model_type!r}: supported families are {', '.join(FAMILIES)}")
    return FAMILIES[model_type]

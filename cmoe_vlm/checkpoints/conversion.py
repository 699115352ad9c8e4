"""Conversion of a trained baseline MoE into ConceptMoE for continual training (docs/design.md §2, §5, §8,
§11); the command is `python -m cmoe_vlm.cli.convert` (= `cmoe-convert`, cmoe_vlm/cli/convert.py).

The baseline (an export with `model.chunk.enabled: false`, e.g. a `cmoe_vlm.cli.hf_import` of a
pretrained MoE) is one stack of token-level layers: its encoder + concept + decoder lists, in that
order. The user re-splits that stack: the first `--encoder-layers` become the encoder, the last
`--decoder-layers` the decoder, the rest the concept model; the defaults are the paper's recipe
(4 + 4, joint decoding in the last 4 decoder layers, more active experts in the concept model).
Weights are copied unchanged; what is new:

- the chunk module, W_q = W_k = I (`chunk.init: identity`, the spec's option for converted models),
  merge `last` by default (the demo's mode; a concept is its boundary token's encoder output);
- joint-decoding projections W^c, zero-initialised, in the last `--joint-layers` (default 4, capped
  at the decoder's depth) decoder attention layers, so they change nothing at the start;
- compute reallocation chosen with `flops.py` so the activated FLOPs match the baseline at the
  target R (`--match concept`, default: the concept layers, the paper's equations, so the chunk
  module and joint decoding come on top and show in the table; `--match model`: the whole model):
  `more_experts` raises the concept layers' top_k (same expert weights, larger k), `looped` loops
  some concept layers (shared weights) and raises top_k, `none` keeps both; the before/after table
  is printed. Tiny stacks leave little room for looping: a loop must pay for itself with R·(A+ke)
  > A+(k+1)e, so at R = 1.5 it needs several concept layers (see flops.propose_looped).

Merge `sum` is lossless at R = 1 too (a one-token concept is its token), and is allowed.

Lossless start (tested in tests/cmoe_vlm/test_convert.py). The baseline's decoder receives the
output of its middle layers, y = x + Δ(x) (they are residual blocks, Δ = the sum of their updates).
ConceptMoE's decoder receives z_n = h_n + c̄_{idx(n)}: the encoder output *plus* the smoothed
concept. Feeding the concept model's output ĉ (which already contains its input) would count h
twice. So converted models set `chunk.dechunk_update: true`: the dechunk smooths the concept
model's *update* ĉ_m − x_m (x_m its input, here h at the boundary token) instead of ĉ_m. With every
token a boundary (the boundary policy `AllTokens()`, R = 1) and merge `last`, concept m is token m,
the concept model runs on exactly the baseline's middle-layer inputs at the same positions, every
boundary has p = 1 and ends the EMA exactly (the model treats p = 1 as a reset rather than clamping
P to 1 − 1e−4), so c̄_n = ĉ_n − h_n and z_n = h_n + (ĉ_n − h_n) = ĉ_n: the baseline's decoder input
(up to one rounding of the add/subtract). Joint decoding adds 0·c̄, so the logits match.
With R > 1 a token n inside concept m gets z_n = h_n + (ĉ_m − h_{φ(m)}): its own state plus the
update the concept model made to its concept, a natural starting point for continual training.
The start is lossless for `--strategy none` only: raising top_k or looping changes the computation
by design (the extra compute the reallocation buys).

Continual training: `train_vlm.py CONFIG $(cat OUT/train_overrides.txt) train.init_from=OUT
train.ratio_ramp_steps=N` loads the converted weights and ramps the achieved R from 1 to its target
over N steps (the boundary policy `ConversionRamp`): at step s every token is also made a boundary
(p = 1) with probability 1 − s/N, so the
first steps run the baseline's computation (every token its own concept) and compression is let in
gradually, while the ratio loss steers the chunker's own boundaries to the target from step 0.
(Ramping the ratio loss's *target* from 1 instead does neither: identity W_q/W_k give
p_n = (1 − cos(h_n, h_{n−1}))/2, mostly < 0.5, so the converted model starts at R ≈ 4.6 on text, and
the loss's scale R/(R − 1) makes targets near 1 pull with a gradient norm of ~20 — measured in
bench/compare_conversion.py runs, where it cost the first ~100 steps.)
"""
from __future__ import annotations

import dataclasses

import torch

from .. import flops
from ..config import to_overrides
from ..model.conceptmoe import ModelConfig
from ..model.vlm import ConceptMoEVLM, VLMConfig

STRATEGIES = ("more_experts", "looped", "none")
SECTIONS = ("encoder", "concept", "decoder")


def split_baseline(baseline: ModelConfig, encoder_layers: int, decoder_layers: int) -> ModelConfig:
    """The baseline's layer stack re-split into encoder / concept / decoder (chunking still off)."""
    if baseline.chunk.enabled:
        raise ValueError("the baseline must have chunking off (model.chunk.enabled = false)")
    if baseline.loop_layers or baseline.concept_dim not in (None, baseline.dim):
        raise ValueError("the baseline must be a plain MoE: no loop_layers, no wider concept model")
    total = baseline.encoder_layers + baseline.concept_layers + baseline.decoder_layers
    concept = total - encoder_layers - decoder_layers
    if encoder_layers < 0 or decoder_layers < 0 or concept < 1:
        raise ValueError(f"--encoder-layers {encoder_layers} + --decoder-layers {decoder_layers} must leave at least "
                         f"one concept layer of the baseline's {total} layers")
    same_split = (encoder_layers, decoder_layers) == (baseline.encoder_layers, baseline.decoder_layers)
    if baseline.concept_moe not in (None, baseline.moe) and not same_split:
        raise ValueError("the baseline's concept layers have their own MoE config (model.concept_moe): "
                         "keep its split (encoder/decoder layer counts) so the layer shapes still match")
    return dataclasses.replace(baseline, encoder_layers=encoder_layers, concept_layers=concept,
                               decoder_layers=decoder_layers, concept_moe=baseline.concept_moe_cfg)


def convert_config(baseline: ModelConfig, encoder_layers: int, decoder_layers: int, strategy: str = "more_experts",
                   target_ratio: float = 1.5, merge: str = "last", joint_layers: int = 4,
                   seq_len: int | None = None, match: str = "concept") -> tuple[ModelConfig, list[flops.Proposal]]:
    """The converted model's config and the FLOPs table rows [baseline, converted] (docs/design.md §8).

    match="concept" (default) matches the concept layers' activated FLOPs with the paper's equations, so
    the chunk module and joint decoding come on top (visible in the table's ×base column; ~10% on tiny
    models, a few % at scale); "model" matches the whole model, paying for them out of the concept
    layers (on tiny models that can mean a *smaller* top_k)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}")
    split = split_baseline(baseline, encoder_layers, decoder_layers)
    split = dataclasses.replace(split, joint_layers=min(joint_layers, decoder_layers))
    if strategy == "more_experts":
        proposal = flops.propose_more_experts(split, target_ratio, seq_len, match=match)
    elif strategy == "looped":
        proposal = flops.propose_looped(split, target_ratio, seq_len, match=match)
    else:
        proposal = flops.propose_efficiency(split, target_ratio, seq_len)
    if proposal.config is None:
        raise ValueError(f"strategy {strategy}: {proposal.note}")
    chunk = dataclasses.replace(proposal.config.chunk, init="identity", merge=merge, dechunk_update=True)
    cfg = dataclasses.replace(proposal.config, chunk=chunk)
    base = flops.account(split, seq_len=proposal.cost.seq_len)
    rows = [flops.Proposal("baseline", split, base, 1.0, 0.0, 1.0, 1.0, "the baseline, chunking off"),
            flops.proposal_for(f"converted ({strategy})", cfg, base, target_ratio, proposal.note)]
    return cfg, rows


def layer_map(baseline: ModelConfig, converted: ModelConfig) -> dict[str, str]:
    """Converted model's block prefix -> the baseline's, e.g. 'lm.concept.layers.0.' -> 'lm.encoder.layers.2.'."""
    def stack(cfg: ModelConfig) -> list[str]:
        counts = (cfg.encoder_layers, cfg.concept_layers, cfg.decoder_layers)
        return [f"lm.{name}.layers.{i}." for name, n in zip(SECTIONS, counts) for i in range(n)]
    old, new = stack(baseline), stack(converted)
    assert len(old) == len(new)
    return dict(zip(new, old))


def convert_state(baseline: ConceptMoEVLM, converted: ConceptMoEVLM) -> dict[str, torch.Tensor]:
    """Load the baseline's weights into `converted` (in place) and zero the joint-decoding projections.

    Returns the converted state dict. Raises if a baseline weight is left unused or a converted
    weight other than the chunk module and joint-decoding ones is left unset."""
    mapping = layer_map(baseline.cfg.model, converted.cfg.model)
    src = baseline.state_dict()
    used: set[str] = set()
    new_state = converted.state_dict()
    for key in new_state:
        prefix = next((p for p in mapping if key.startswith(p)), None)
        src_key = mapping[prefix] + key[len(prefix):] if prefix else key
        if ".joint." in key:
            if key.endswith("joint.proj.weight"):
                new_state[key] = torch.zeros_like(new_state[key])  # zero-init: no effect at the start
            continue  # joint.norm keeps its init (ones)
        if key.startswith("lm.chunk."):
            continue  # identity init from the model's own reset_parameters
        if src_key not in src:
            raise KeyError(f"converted weight {key} has no baseline counterpart {src_key}")
        if src[src_key].shape != new_state[key].shape:
            raise ValueError(f"{key}: shape {tuple(new_state[key].shape)} != baseline {src_key} "
                             f"{tuple(src[src_key].shape)}")
        new_state[key] = src[src_key].clone()
        used.add(src_key)
    unused = sorted(set(src) - used)
    if unused:
        raise ValueError(f"baseline weights not used by the conversion: {unused[:5]}")
    converted.load_state_dict(new_state)
    return new_state


def convert(baseline: ConceptMoEVLM, encoder_layers: int, decoder_layers: int, strategy: str = "more_experts",
            target_ratio: float = 1.5, merge: str = "last", joint_layers: int = 4,
            seq_len: int | None = None, match: str = "concept") -> tuple[ConceptMoEVLM, list[flops.Proposal]]:
    """Baseline VLM -> converted ConceptMoE VLM (eval mode) and the FLOPs rows [baseline, converted]."""
    cfg, rows = convert_config(baseline.cfg.model, encoder_layers, decoder_layers, strategy, target_ratio, merge,
                               joint_layers, seq_len, match)
    vcfg = dataclasses.replace(baseline.cfg, model=cfg)
    vcfg = dataclasses.replace(vcfg, vision=dataclasses.replace(vcfg.vision, pretrained=False, checkpoint_path=None))
    converted = ConceptMoEVLM(vcfg)
    convert_state(baseline, converted)
    return converted.eval(), rows


def overrides_for(cfg: VLMConfig, parts: list[str] | None = None) -> list[str]:
    """`model.* vision.* projector.*` key=value overrides that make an experiment config build this model
    (only `model.*` for an export whose trained parts are the LM alone, e.g. an import)."""
    sections = ("model",) if parts == ["lm"] else ("model", "vision", "projector")
    return [line for section in sections for line in to_overrides(getattr(cfg, section), section)]

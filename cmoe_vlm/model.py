"""ConceptMoE language model (docs/design.md §1): embed → encoder → chunk → concept model → dechunk → decoder.

Three ways through it, each a straight line through the same stages:

    forward(batch)            a packed `Batch` (training, scoring): logits, losses, compression
    extend(batch, state)      the next tokens of cached rows (prefill, continuation spans)
    step(input_ids, state)    one token per row (decoding)

`new_state(B)` allocates the decoding state of B rows, which is each stage's own (§9): the encoder
and decoder KV caches, the chunk module's last key, the merger's carry, the concept model's
concept-level caches, the dechunk module's c̄. `cmoe_vlm.session.InferenceSession` holds one.

Which boundaries the model uses is a boundary policy (cmoe_vlm/boundaries.py) passed with each
call; the default is the chunk module's own. With `chunk.enabled = False` the same stack is the
baseline MoE: every token is its own concept, the concept layers run on tokens and the decoder has
no joint decoding.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cmoe_base import IGNORE_INDEX, Batch, DocumentLayout, Modality

from .boundaries import BoundaryPolicy, Learned
from .chunking import (Boundaries, ChunkModule, ChunkState, ModalityStats, boundary_rates, compression_stats,
                       forced_boundaries, image_ids, margin_loss, per_group_ratio_loss, ratio_loss, token_sets)
from .concept_model import ConceptModel
from .dechunk import DechunkModule, DechunkState, straight_through_one
from .layers.attention import AttentionLayout, KVCache
from .layers.block import Block, LayerStack
from .layers.moe import MoEStats
from .layers.norm import RMSNorm
from .layers.rope import rope_angles
from .merge import MERGE_RULES, MergeState
from .model_config import ModelConfig

__all__ = ["ConceptMoE", "DecodingState", "ModelConfig", "ModelOutput"]


@dataclass
class ModelOutput:
    """Logits always; from `forward` also the losses and the compression record."""
    logits: torch.Tensor                       # (B, T, V)
    loss: torch.Tensor | None = None           # lm + λ_ratio · ratio + λ_lb · lb (with labels)
    lm_loss: torch.Tensor | None = None
    ratio_loss: torch.Tensor | None = None
    lb_loss: torch.Tensor | None = None
    compression: dict[str, ModalityStats] = field(default_factory=dict)  # "all", "text", "image"
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # one (E,) per MoE layer call
    boundary_probs: torch.Tensor | None = None  # (B, T) of the boundaries used
    boundaries: torch.Tensor | None = None      # (B, T) bool
    concept_lengths: tuple[tuple[int, ...], ...] | None = None  # host: concepts per document of each row (chunking)


@dataclass
class DecodingState:
    """The decoding state of B rows, one document each: every stage's own (docs/design.md §9)."""
    encoder: list[KVCache]
    chunk: ChunkState | None      # None with chunking off
    merge: MergeState | None
    concept: list[KVCache]        # one per concept-schedule position; concept-level when chunking
    dechunk: DechunkState | None
    decoder: list[KVCache]
    num_tokens: torch.Tensor      # (B,) tokens fed so far (the next token's position)
    max_tokens: int = 0           # host: an upper bound of num_tokens.max() (the max_seq_len check reads no device)

    @property
    def num_concepts(self) -> torch.Tensor:
        return self.concept[0].lengths

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (b,) of the batch, in that order (e.g. drop rows that finished generating)."""
        for cache in self.encoder + self.concept + self.decoder:
            cache.select(rows)
        for part in (self.chunk, self.merge, self.dechunk):
            if part is not None:
                part.select(rows)
        self.num_tokens = self.num_tokens[rows]

    def cache_bytes(self) -> dict[str, int]:
        return {name: sum(c.bytes() for c in caches)
                for name, caches in (("encoder", self.encoder), ("concept", self.concept), ("decoder", self.decoder))}


class ConceptMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.attn_cfg = cfg.attention(d)
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.encoder = LayerStack([Block(self.attn_cfg, cfg.moe) for _ in range(cfg.encoder_layers)], self.attn_cfg)
        self.concept = ConceptModel(cfg)
        n_plain = cfg.decoder_layers - cfg.num_joint_layers
        self.decoder = LayerStack([Block(self.attn_cfg, cfg.moe, joint=i >= n_plain) for i in range(cfg.decoder_layers)],
                                  self.attn_cfg)
        self.chunk = ChunkModule(d, cfg.chunk) if cfg.chunk.enabled else None
        self.merger = MERGE_RULES[cfg.chunk.merge]() if cfg.chunk.enabled else None
        self.dechunk = DechunkModule() if cfg.chunk.enabled else None
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.chunk.enabled and cfg.chunk.ratio_integral > 0:
            # integral term of the ratio control, one per token set; a buffer, so checkpoints keep it
            self.register_buffer("ratio_mu", torch.zeros(len(cfg.chunk.targets())))
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_load_state_dict_pre_hook(upgrade_legacy_keys)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, zero biases; residual output projections scaled by 1/sqrt(2·depth)."""
        std = self.cfg.init_std
        depth = len(self.encoder) + len(self.concept.schedule) + len(self.decoder)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            if p.dim() < 2 or name.startswith("chunk."):
                continue
            residual = name.endswith(("attn.out.weight", "experts.w2", "shared.w2.weight"))
            nn.init.normal_(p, std=std / math.sqrt(2 * depth) if residual else std)
        if self.chunk is not None:
            self.chunk.reset_parameters()

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level RoPE angles, computed once per forward and used by every token-level layer."""
        return rope_angles(positions, self.attn_cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)

    # ---------------------------------------------------------------------------------------- training
    def forward(self, batch: Batch, inputs_embeds: torch.Tensor | None = None, above_index: torch.Tensor | None = None,
                boundaries: BoundaryPolicy | None = None) -> ModelOutput:
        """A packed batch -> logits and (with labels) the losses. inputs_embeds (B, T, d) replaces the
        token embeddings (the VLM passes text and image embeddings); above_index (B, T) is the position
        of the patch above each image patch (−1 if none), for 2D image chunking."""
        _check_not_empty(batch)
        tokens = batch.layout
        self._check_length(max((n for docs in tokens.lengths for n in docs), default=0))
        x = self.embed(batch.input_ids) if inputs_embeds is None else inputs_embeds
        rope, attn = self._rope(tokens.positions), AttentionLayout.of(tokens)
        h, encoder_stats = self.encoder(x, rope, attn)
        if self.chunk is None:  # the baseline: every token its own concept
            z, concept_stats = self.concept(h, tokens.positions, attn)
            y, decoder_stats = self.decoder(z, rope, attn)
            own = used = None
        else:
            own = self.chunk(h, self._forced(tokens.starts, batch.modality), above_index)
            used = (boundaries or Learned())(own, tokens.positions, tokens.valid, batch.modality)
            concepts = self.merger(h, used, tokens)
            c_hat, concept_stats = self.concept(concepts.x, concepts.layout.positions,
                                                AttentionLayout.of(concepts.layout))
            c_bar = self.dechunk(c_hat, concepts)
            y, decoder_stats = self.decoder(self._decoder_input(h, c_bar, used), rope, attn, concept=c_bar)
        logits = self.lm_head(self.norm(y))
        out = self._output(logits, batch, own, used, encoder_stats + concept_stats + decoder_stats)
        if own is not None:
            out.concept_lengths = concepts.layout.lengths  # what the concept model ran on (MFU, cmoe_vlm/flops)
        if own is not None and self.cfg.chunk.ratio_integral > 0 and self.training and torch.is_grad_enabled():
            self._update_ratio_integral(own, batch)  # the one buffer a training forward writes
        return out

    def _forced(self, starts: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Boundaries every policy keeps (document starts, modality run ends): docs/design.md §2."""
        return forced_boundaries(starts, modality, self.cfg.chunk.split_at_modality_switch)

    @staticmethod
    def _decoder_input(h: torch.Tensor, c_bar: torch.Tensor, used: Boundaries) -> torch.Tensor:
        """z_n = h_n + c̄_n · STE(c_n): the factor is exactly 1; it exists for its gradient to p."""
        if torch.is_grad_enabled():
            return h + c_bar * straight_through_one(used.confidence)[..., None]
        return h + c_bar

    def _output(self, logits: torch.Tensor, batch: Batch, own: Boundaries | None, used: Boundaries | None,
                moe_stats: list[MoEStats]) -> ModelOutput:
        valid, modality = batch.layout.valid, batch.modality
        if used is None:
            p = torch.ones(batch.shape, device=logits.device)
            b = torch.ones(batch.shape, dtype=torch.bool, device=logits.device)
        else:
            p, b = used.p, used.b
        out = ModelOutput(logits=logits, tokens_per_expert=[s.tokens_per_expert for s in moe_stats],
                          boundary_probs=p, boundaries=b, compression=compression_stats(p, b, modality, valid))
        out.lb_loss = torch.stack([s.lb_loss for s in moe_stats]).mean() if moe_stats else logits.sum() * 0
        out.ratio_loss = p.sum() * 0 if own is None else self._ratio_loss(own, modality, valid)
        if batch.labels is not None:
            # mean over the predicted tokens; a batch without any (images only) adds 0, not 0/0 = NaN
            labels = batch.labels.reshape(-1)
            out.lm_loss = (F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels, ignore_index=IGNORE_INDEX,
                                           reduction="sum") / (labels != IGNORE_INDEX).sum().clamp_min(1))
            out.loss = (out.lm_loss + self.cfg.chunk.ratio_loss_weight * out.ratio_loss
                        + self.cfg.lb_loss_weight * out.lb_loss)
        return out

    def _ratio_loss(self, own: Boundaries, modality: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The paper's loss per token set (docs/design.md §3) on the chunk module's own boundaries, plus
        μ_i · G_i with the integral term: μ_i accumulates the steady rate error η · (R·F − 1) (a PI
        controller's I), cancelling another steady force on p (the LM loss preferring fewer image
        boundaries, say) that the paper's loss, whose pull ∝ (R·F − 1), would leave off target.
        [ours] Options on images: `ratio_statistic: per_image` takes F, G per image; the margin term
        `image_margin_weight` pushes image p away from the 0.5 threshold."""
        cfg = self.cfg.chunk
        sets = token_sets(modality, valid)
        integral = cfg.ratio_integral > 0
        losses = []
        if cfg.image_margin_weight > 0:
            losses.append(cfg.image_margin_weight * margin_loss(own.p, sets["image"], cfg.image_margin))
        for i, (name, target) in enumerate(cfg.targets().items()):
            if name == "image" and cfg.ratio_statistic == "per_image":
                loss = per_group_ratio_loss(own.p, own.b, target, torch.where(sets[name], image_ids(modality), -1))
            else:
                loss = ratio_loss(own.p, own.b, target, sets[name])
            if integral and target > 1:
                _, g, n = boundary_rates(own.p, own.b, sets[name])
                loss = loss + torch.where(n > 0, self.ratio_mu[i].clone() * g, 0.0)  # a copy: μ changes below
            losses.append(loss)
        return torch.stack(losses).sum()

    @torch.no_grad()
    def _update_ratio_integral(self, own: Boundaries, batch: Batch) -> None:
        """μ_i += η · (R_i · F_i − 1) for every token set with a target and tokens in this batch."""
        sets = token_sets(batch.modality, batch.layout.valid)
        for i, (name, target) in enumerate(self.cfg.chunk.targets().items()):
            if target > 1:
                f, _, n = boundary_rates(own.p, own.b, sets[name])
                self.ratio_mu[i] += torch.where(n > 0, self.cfg.chunk.ratio_integral * (target * f - 1), 0.0)

    # ---------------------------------------------------------------------------------------- decoding
    def new_state(self, batch_size: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> DecodingState:
        """Empty decoding state for `batch_size` rows (one document each)."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        d, chunking = self.cfg.dim, self.chunk is not None
        return DecodingState(
            encoder=self.encoder.new_caches(batch_size, device, dtype),
            chunk=self.chunk.new_state(batch_size, device, dtype) if chunking else None,
            merge=self.merger.new_state(batch_size, d, device, dtype) if chunking else None,
            concept=self.concept.new_state(batch_size, device, dtype),
            dechunk=self.dechunk.new_state(batch_size, d, device, dtype) if chunking else None,
            decoder=self.decoder.new_caches(batch_size, device, dtype),
            num_tokens=torch.zeros(batch_size, dtype=torch.long, device=device))

    def extend(self, batch: Batch, state: DecodingState, inputs_embeds: torch.Tensor | None = None,
               above_index: torch.Tensor | None = None, boundaries: BoundaryPolicy | None = None) -> ModelOutput:
        """The next tokens of the rows of `state` (from a new state: the prefill). Each row of `batch`
        holds one document, its next tokens, then padding (rows may differ in length; a row may have
        none). Padding enters no cache, opens no concept and leaves the state alone; its logits are
        meaningless. Returns logits and the boundaries used (no losses)."""
        _check_not_empty(batch)
        if any(len(docs) > 1 for docs in batch.layout.lengths):
            raise ValueError("cached decoding takes one document per row (doc_ids 0, or −1 for tail padding)")
        B, T = batch.shape
        n_tokens = [sum(docs) for docs in batch.layout.lengths]
        self._advance_length(state, max(n_tokens), n_tokens)
        lengths = T if all(n == T for n in n_tokens) else torch.tensor(n_tokens, device=state.num_tokens.device)
        x = self.embed(batch.input_ids) if inputs_embeds is None else inputs_embeds
        valid = batch.layout.valid
        positions = state.num_tokens[:, None] + torch.arange(T, device=x.device)
        span = DocumentLayout(batch.doc_ids, batch.layout.lengths, (positions == 0) & valid, positions)
        rope = self._rope(positions)
        h = self.encoder.extend(x, rope, state.encoder, lengths)
        if self.chunk is None:
            z = self.concept.extend(h, positions, lengths, state.concept)
            y = self.decoder.extend(z, rope, state.decoder, lengths)
            p, b = torch.ones(B, T, device=x.device), valid
        else:
            own = self.chunk.extend(h, self._forced(span.starts, batch.modality), lengths, state.chunk, above_index)
            used = (boundaries or Learned())(own, positions, valid, batch.modality)
            used = Boundaries(p=used.p, b=used.b & valid, forced=used.forced)
            concepts = self.merger.extend(h * valid[..., None], used, span, state.merge)
            c_hat = self.concept.extend(concepts.x, concepts.layout.positions, concepts.counts, state.concept)
            c_bar = self.dechunk.extend(c_hat, concepts, state.dechunk)
            y = self.decoder.extend(self._decoder_input(h, c_bar, used), rope, state.decoder, lengths, concept=c_bar)
            p, b = used.p, used.b
        state.num_tokens += lengths
        return ModelOutput(logits=self.lm_head(self.norm(y)), boundary_probs=p, boundaries=b)

    def step(self, input_ids: torch.Tensor, state: DecodingState, active: torch.Tensor | None = None,
             boundaries: BoundaryPolicy | None = None) -> torch.Tensor:
        """One text token per row, input_ids (B,); rows with active False (B,) do not advance.
        Returns the logits (B, V). The same values as `extend` on one-token spans, without the
        span's (B, M) bookkeeping: a row whose token is no boundary skips the concept model, and
        when no row has one the concept model does not run."""
        advance = 1 if active is None else active.long()
        self._advance_length(state, 1, advance)
        x = self.embed(input_ids)  # (B, d)
        positions = state.num_tokens
        rope = self._rope(positions[:, None])
        h = self.encoder.extend(x[:, None], rope, state.encoder, advance)[:, 0]
        if self.chunk is None:
            z = self.concept.step(h, positions, active, state.concept)
            y = self.decoder.extend(z[:, None], rope, state.decoder, advance)
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool) if active is None else active
            modality = torch.full_like(input_ids, Modality.TEXT)
            own = self.chunk.step(h, (positions == 0) & valid, state.chunk, active)  # text after text: no run ends
            used = (boundaries or Learned())(own, positions, valid, modality)
            b = used.b & valid
            x_c = self.merger.step(h * valid[:, None], b, state.merge)
            if bool(b.any()):
                c_hat = self.concept.step(x_c, positions, b, state.concept)
                c_bar = self.dechunk.step(c_hat, used.p, b, state.dechunk)
            else:
                c_bar = state.dechunk.c_bar
            z = self._decoder_input(h, c_bar, used)
            y = self.decoder.extend(z[:, None], rope, state.decoder, advance, concept=c_bar[:, None])
        state.num_tokens += advance
        return self.lm_head(self.norm(y))[:, 0]

    def _check_length(self, longest: int) -> None:
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"a document of {longest} tokens is longer than model.max_seq_len = {self.cfg.max_seq_len}: "
                             f"RoPE positions past it were never trained (split the input, or build the model with a "
                             f"larger max_seq_len)")

    def _advance_length(self, state: DecodingState, most: int, added: torch.Tensor | list[int] | int) -> None:
        """Check that rows growing by `added` ((B,) or an int; at most `most`) stay within max_seq_len:
        on the host bound alone, unless it passes the limit (then the lengths are read once)."""
        state.max_tokens += most
        if state.max_tokens > self.cfg.max_seq_len:
            state.max_tokens = int((state.num_tokens + torch.as_tensor(added, device=state.num_tokens.device)).max())
            self._check_length(state.max_tokens)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_not_empty(batch: Batch) -> None:
    if batch.shape[1] == 0:
        raise ValueError("the input has no tokens (sequence length 0): give at least one token")


# Weight names of exports written before the stacks, the concept model and joint decoding had
# classes of their own (format version 1), relative to the ConceptMoE module: (pattern, replacement).
LEGACY_KEYS = ((r"^(encoder|concept|decoder)\.", r"\1.layers."), (r"^concept_in\.", "concept.proj_in."),
               (r"^concept_out\.", "concept.proj_out."), (r"\.attn\.concept_norm\.", ".joint.norm."),
               (r"\.attn\.concept_qkv\.", ".joint.proj."))
_LEGACY_STACK = re.compile(r"^(encoder|concept|decoder)\.\d")


def upgrade_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook of ConceptMoE: a state dict with version-1 weight names (a numbered
    layer right under a stack) is renamed in place, so older exports and checkpoints load."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not any(_LEGACY_STACK.match(k[len(prefix):]) for k in keys):
        return
    for key in keys:
        name = key[len(prefix):]
        for pattern, repl in LEGACY_KEYS:
            name = re.sub(pattern, repl, name)
        state_dict[prefix + name] = state_dict.pop(key)

"""ConceptMoE language model (docs/design.md §1): embed → encoder → chunk → concept model → dechunk → decoder.

Three ways through it, each a straight line through the same stages:

    forward(batch)            a packed `Batch` (training, scoring): logits, boundaries, the statistics the
                              losses read (cmoe_vlm/objective.py computes them), compression
    extend(batch, state)      the next tokens of cached rows (prefill, continuation spans)
    step(input_ids, state)    one token per row (decoding)

`new_state(B)` allocates the decoding state of B rows, which is each stage's own (§9): the encoder
and decoder KV caches, the chunk module's last key, the merger's carry, the concept model's
concept-level caches, the dechunk module's c̄. `cmoe_vlm.inference.session.InferenceSession` holds one.

Which boundaries the model uses is a boundary policy (cmoe_vlm/model/boundaries.py) passed with each
call; the default is the chunk module's own. With `chunk.enabled = False` the same stack is the
baseline MoE: every token is its own concept, the concept layers run on tokens and the decoder has
no joint decoding.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from cmoe_base import Batch, DocumentLayout, Modality

from .boundaries import BoundaryPolicy, Learned
from .chunk import Boundaries, ChunkModule, ChunkState, forced_boundaries
from .compression import ModalityStats, compression_stats
from .concept_model import ConceptModel
from .config import ModelConfig
from .dechunk import DechunkModule, DechunkState, straight_through_one
from .layers.attention import AttentionLayout, KVCache
from .layers.block import Block, LayerStack
from .layers.moe import MoEStats
from .layers.norm import RMSNorm
from .layers.rope import rope_angles
from .merge import MERGE_RULES, MergeState

__all__ = ["ConceptMoE", "DecodingState", "ModelConfig", "ModelOutput"]


@dataclass
class ModelOutput:
    """Logits and the boundaries used; from `forward` also what the losses (cmoe_vlm/objective.py) and
    the logs read. No losses: the model computes none."""
    logits: torch.Tensor                        # (B, T, V)
    boundary_probs: torch.Tensor | None = None  # (B, T) of the boundaries used
    boundaries: torch.Tensor | None = None      # (B, T) bool
    own_boundaries: Boundaries | None = None    # forward with chunking: the chunk module's own (the ratio loss's)
    moe_stats: list[MoEStats] = field(default_factory=list)  # forward: one per MoE layer call
    compression: dict[str, ModalityStats] = field(default_factory=dict)  # "all", "text", "image"
    concept_lengths: tuple[tuple[int, ...], ...] | None = None  # host: concepts per document of each row (chunking)

    @property
    def tokens_per_expert(self) -> list[torch.Tensor]:
        """(E,) assignments per expert of each MoE layer call."""
        return [s.tokens_per_expert for s in self.moe_stats]


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

    # ---------------------------------------------------------------------------------- packed batches
    def forward(self, batch: Batch, inputs_embeds: torch.Tensor | None = None, above_index: torch.Tensor | None = None,
                boundaries: BoundaryPolicy | None = None) -> ModelOutput:
        """A packed batch -> logits, boundaries and the losses' statistics. inputs_embeds (B, T, d) replaces the
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
            own = self.chunk(self._chunk_input(h, batch.modality), forced_boundaries(tokens.starts, batch.modality),
                             above_index)
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
        return out

    def _chunk_input(self, h: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """What the chunk module scores, (B, T, d): the encoder outputs, detached with `chunk.detach_images`
        at image positions and at the token before each image token (the one an image's first token is
        scored against, which attends to earlier images): the same values, and no gradient from an image
        token's boundary into what the model sees."""
        if not self.cfg.chunk.detach_images:
            return h
        image = modality == Modality.IMAGE
        scored_against = torch.cat([image[:, 1:], torch.zeros_like(image[:, :1])], dim=1)
        return torch.where((image | scored_against)[..., None], h.detach(), h)

    @staticmethod
    def _decoder_input(h: torch.Tensor, c_bar: torch.Tensor, used: Boundaries) -> torch.Tensor:
        """z_n = h_n + c̄_n · STE(c_n): the factor is exactly 1; it exists for its gradient to p."""
        if torch.is_grad_enabled():
            return h + c_bar * straight_through_one(used.confidence)[..., None]
        return h + c_bar

    @staticmethod
    def _output(logits: torch.Tensor, batch: Batch, own: Boundaries | None, used: Boundaries | None,
                moe_stats: list[MoEStats]) -> ModelOutput:
        valid, modality = batch.layout.valid, batch.modality
        if used is None:
            p = torch.ones(batch.shape, device=logits.device)
            b = torch.ones(batch.shape, dtype=torch.bool, device=logits.device)
        else:
            p, b = used.p, used.b
        return ModelOutput(logits=logits, boundary_probs=p, boundaries=b, own_boundaries=own, moe_stats=moe_stats,
                           compression=compression_stats(p, b, modality, valid))

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
               above_index: torch.Tensor | None = None, boundaries: BoundaryPolicy | None = None,
               last_only: bool = False) -> ModelOutput:
        """The next tokens of the rows of `state` (from a new state: the prefill). Each row of `batch`
        holds one document, its next tokens, then padding (rows may differ in length; a row may have
        none). Padding enters no cache, opens no concept and leaves the state alone; its logits are
        meaningless. Returns logits (B, T, V), or with `last_only` only each row's last token's (B, 1, V):
        a prefill needs no more, and the LM head over every prompt token was ~15% of its time
        (B 2 x T 2048, vocab 4096), and the boundaries used (no losses)."""
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
            forced = forced_boundaries(span.starts, batch.modality)
            own = self.chunk.extend(self._chunk_input(h, batch.modality), forced, lengths, state.chunk, above_index)
            used = (boundaries or Learned())(own, positions, valid, batch.modality)
            used = Boundaries(p=used.p, b=used.b & valid, forced=used.forced)
            concepts = self.merger.extend(h * valid[..., None], used, span, state.merge)
            c_hat = self.concept.extend(concepts.x, concepts.layout.positions, concepts.counts, state.concept)
            c_bar = self.dechunk.extend(c_hat, concepts, state.dechunk)
            y = self.decoder.extend(self._decoder_input(h, c_bar, used), rope, state.decoder, lengths, concept=c_bar)
            p, b = used.p, used.b
        state.num_tokens += lengths
        if last_only:
            last = (torch.as_tensor(n_tokens, device=y.device) - 1).clamp_min(0)
            y = y.gather(1, last[:, None, None].expand(-1, 1, y.shape[-1]))
        return ModelOutput(logits=self.lm_head(self.norm(y)), boundary_probs=p, boundaries=b)

    def step(self, input_ids: torch.Tensor, state: DecodingState, active: torch.Tensor | None = None,
             boundaries: BoundaryPolicy | None = None) -> torch.Tensor:
        """One text token per row, input_ids (B,); rows with active False (B,) do not advance.
        Returns the logits (B, V). The same values as `extend` on one-token spans, without the
        span's (B, M) bookkeeping in the stages where it costs (docs/design.md §9: merge, concept model,
        dechunk): a row whose token is no boundary skips the concept model, and when no row has one the
        concept model does not run."""
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
            forced = ((positions == 0) & valid)[:, None]  # text after text: no modality run ends
            own = self.chunk.extend(h[:, None], forced, advance, state.chunk).at(0)  # a one-token span
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
    """load_state_dict pre-hook of ConceptMoE: state dicts of older versions load. `ratio_mu`, the ratio
    controller's state that models held until the controller became the training loop's
    (cmoe_vlm/objective.py), is dropped (a resume takes it into the controller: training/checkpoint.py);
    version-1 weight names (a numbered layer right under a stack) are renamed in place."""
    state_dict.pop(prefix + "ratio_mu", None)
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not any(_LEGACY_STACK.match(k[len(prefix):]) for k in keys):
        return
    for key in keys:
        name = key[len(prefix):]
        for pattern, repl in LEGACY_KEYS:
            name = re.sub(pattern, repl, name)
        state_dict[prefix + name] = state_dict.pop(key)

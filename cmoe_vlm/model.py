"""ConceptMoE language model (spec §1): embed → encoder → chunk → concept model → dechunk → decoder.

With `chunk.enabled = False` the same stack is the baseline MoE: every token is its own concept,
the concept layers run on tokens and the decoder has no joint-decoding projections.

Batches (packed rows, see data_pipelines): input_ids (B, T); doc_ids (B, T) document index
inside the row, −1 for padding; modality (B, T) 0 text / 1 image; labels (B, T) already shifted,
−100 where there is no loss. Positions restart at 0 in every document.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .chunking import (Boundaries, ChunkConfig, ChunkModule, ModalityStats, TEXT, IMAGE, compression_stats,
                       merge_concepts, ratio_loss)
from .config import check
from .dechunk import DechunkModule, plug_back, straight_through_one
from .layers.attention import KVCache, document_causal_mask
from .layers.block import Block
from .layers.moe import MoEConfig
from .layers.norm import RMSNorm
from .layers.rope import rope_angles


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
    lb_loss_weight: float = 0.01
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self):
        check(self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be >= 2")
        check(self.dim > 0 and self.num_heads > 0 and self.dim % self.num_heads == 0, "num_heads", self.num_heads,
              f"must divide dim={self.dim}")
        check((self.dim // self.num_heads) % 2 == 0, "num_heads", self.num_heads,
              f"dim/num_heads must be even for RoPE (dim={self.dim})")
        kv = self.kv_heads
        check(kv > 0 and self.num_heads % kv == 0, "num_kv_heads", self.num_kv_heads,
              f"must divide num_heads={self.num_heads}")
        for name in ("encoder_layers", "decoder_layers"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        check(self.concept_layers >= 1, "concept_layers", self.concept_layers, "must be >= 1")
        check(0 <= self.loop_layers <= self.concept_layers, "loop_layers", self.loop_layers,
              f"must be between 0 and concept_layers={self.concept_layers}")
        cdim = self.concept_width
        check(cdim % self.num_heads == 0 and (cdim // self.num_heads) % 2 == 0, "concept_dim", self.concept_dim,
              f"must be a multiple of 2*num_heads={2 * self.num_heads}")
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

    def concept_schedule(self) -> list[int]:
        """Concept layer indices in execution order: all layers, then the looped ones again."""
        return list(range(self.concept_layers)) + list(range(self.loop_layers))


@dataclass
class ModelOutput:
    """Logits always; the losses and the compression record unless this was a cached forward
    without labels (decoding), which skips them."""
    logits: torch.Tensor                       # (B, T, V)
    loss: torch.Tensor | None = None           # lm + λ_ratio · ratio + λ_lb · lb
    lm_loss: torch.Tensor | None = None
    ratio_loss: torch.Tensor | None = None
    lb_loss: torch.Tensor | None = None
    compression: dict[str, ModalityStats] = field(default_factory=dict)  # "all", "text", "image"
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # one (E,) per MoE layer call
    boundary_probs: torch.Tensor | None = None  # (B, T)
    boundaries: torch.Tensor | None = None      # (B, T) bool


@dataclass
class InferenceState:
    """Everything a cached forward needs to continue a batch of single-document rows (spec §9)."""
    encoder: list[KVCache]
    concept: list[KVCache]   # one per concept-schedule position; concept-level when chunking
    decoder: list[KVCache]
    num_tokens: torch.Tensor     # (B,)
    last_key: torch.Tensor       # (B, d) the chunk module's unit key of the last token
    last_modality: torch.Tensor  # (B,)
    carry: torch.Tensor          # (B, d) sum of tokens since the last boundary (sum merge)
    c_bar: torch.Tensor          # (B, d) latest smoothed concept

    @property
    def num_concepts(self) -> torch.Tensor:
        return self.concept[0].lengths

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (b,) of the batch, in that order (e.g. drop rows that finished generating)."""
        for cache in self.encoder + self.concept + self.decoder:
            cache.select(rows)
        for name in ("num_tokens", "last_key", "last_modality", "carry", "c_bar"):
            setattr(self, name, getattr(self, name)[rows])

    def cache_bytes(self) -> dict[str, int]:
        return {name: sum(c.bytes() for c in caches)
                for name, caches in (("encoder", self.encoder), ("concept", self.concept), ("decoder", self.decoder))}


def document_positions(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (B, T) -> (starts (B, T) bool, positions (B, T) restarting at 0 in each document)."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start_idx = torch.where(starts, idx, 0).cummax(dim=1).values
    return starts, idx - start_idx


class ConceptMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, dc = cfg.dim, cfg.concept_width
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.encoder = nn.ModuleList(self._block(d, cfg.moe) for _ in range(cfg.encoder_layers))
        self.concept = nn.ModuleList(self._block(dc, cfg.concept_moe_cfg) for _ in range(cfg.concept_layers))
        n_plain = cfg.decoder_layers - cfg.num_joint_layers
        self.decoder = nn.ModuleList(self._block(d, cfg.moe, joint=i >= n_plain) for i in range(cfg.decoder_layers))
        self.concept_in = nn.Linear(d, dc, bias=False) if dc != d else None
        self.concept_out = nn.Linear(dc, d, bias=False) if dc != d else None
        self.chunk = ChunkModule(d, cfg.chunk) if cfg.chunk.enabled else None
        self.dechunk = DechunkModule() if cfg.chunk.enabled else None
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.forced_boundary_prob = 0.0  # training forwards: extra random boundaries (the conversion ramp)
        if cfg.chunk.enabled and cfg.chunk.ratio_integral > 0:
            # integral term of the ratio control, one per token set; a buffer, so checkpoints keep it
            self.register_buffer("ratio_mu", torch.zeros(len(cfg.chunk.targets())))
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _block(self, dim: int, moe: MoEConfig, joint: bool = False) -> Block:
        c = self.cfg
        return Block(dim, c.num_heads, c.kv_heads, moe, joint=joint)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2·depth)."""
        std = self.cfg.init_std
        depth = len(self.encoder) + len(self.cfg.concept_schedule()) + len(self.decoder)
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.startswith("chunk."):
                continue
            residual = name.endswith(("attn.out.weight", "experts.w2", "shared.w2.weight"))
            nn.init.normal_(p, std=std / math.sqrt(2 * depth) if residual else std)
        if self.chunk is not None:
            self.chunk.reset_parameters()

    # ----------------------------------------------------------------------------------------------
    def new_state(self, batch_size: int, device=None, dtype=None) -> InferenceState:
        """Empty caches for cached decoding of `batch_size` rows (one document each)."""
        c = self.cfg
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        hd, chd = c.dim // c.num_heads, c.concept_width // c.num_heads
        mk = lambda head_dim: KVCache(batch_size, c.kv_heads, head_dim, device, dtype)  # noqa: E731
        zeros = torch.zeros(batch_size, c.dim, device=device, dtype=dtype)
        return InferenceState(
            encoder=[mk(hd) for _ in self.encoder],
            concept=[mk(chd) for _ in c.concept_schedule()],
            decoder=[mk(hd) for _ in self.decoder],
            num_tokens=torch.zeros(batch_size, dtype=torch.long, device=device),
            last_key=zeros, last_modality=torch.zeros(batch_size, dtype=torch.long, device=device),
            carry=zeros.clone(), c_bar=zeros.clone(),
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        above_index: torch.Tensor | None = None,
        state: InferenceState | None = None,
    ) -> ModelOutput:
        """Full forward over packed rows, or (with `state`) the next tokens of cached rows.

        inputs_embeds (B, T, d) replaces input_ids (the VLM passes text and image embeddings);
        above_index (B, T) is the position of the patch above each image patch (−1 if none), used by
        2D image chunking. Returns logits and, with labels, the losses.

        With `state`, each row holds one document: doc_ids (B, T) is 0 for the row's next tokens and
        −1 for padding after them (rows of a span may differ in length, e.g. prompts of different
        lengths; a row may have none). Padding enters no cache, opens no concept and leaves the
        carried state alone; its logits are meaningless.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("the input has no tokens (sequence length 0): give at least one token")
        modality = torch.zeros(B, T, dtype=torch.long, device=x.device) if modality is None else modality
        if state is None:
            doc_ids = torch.zeros(B, T, dtype=torch.long, device=x.device) if doc_ids is None else doc_ids
            starts, positions = document_positions(doc_ids)
            mask = document_causal_mask(doc_ids)
        else:
            full = doc_ids is None  # every row takes all T tokens: lengths also known as the int T
            lengths = self._span_lengths(doc_ids, B, T, x.device)
            positions = state.num_tokens[:, None] + torch.arange(T, device=x.device)
            if full:
                doc_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
                starts = positions == 0
            else:
                doc_ids = torch.where(torch.arange(T, device=x.device) < lengths[:, None], 0, -1)
                starts = (positions == 0) & (doc_ids >= 0)
            mask = None
        valid = doc_ids >= 0
        # A cached forward without labels (decoding) reads no loss or statistics: skip computing them.
        with_stats = state is None or labels is not None
        expert_counts: list[torch.Tensor] = []
        lb_losses: list[torch.Tensor] = []

        def run(blocks, h, rope, m, caches, concept=None, rows=None):
            for i, blk in enumerate(blocks):
                h, st = blk(h, rope, m, concept, caches[i] if caches else None, rows, with_stats)
                if with_stats:
                    lb_losses.append(st.lb_loss)
                    expert_counts.append(st.tokens_per_expert)
            return h

        rope = self._rope(positions, self.cfg.dim)  # computed once, used by every token-level layer
        h = run(self.encoder, x, rope, mask, state.encoder if state else None)
        schedule = [self.concept[i] for i in self.cfg.concept_schedule()]
        if self.chunk is None:
            z = run(schedule, h, rope, mask, state.concept if state else None)
            concept_tok = None
            p = torch.ones(B, T, device=x.device)
            b = torch.ones(B, T, dtype=torch.bool, device=x.device)
            chunker = Boundaries(p, b)
        else:
            bnd = self.chunk(h, starts, modality, state.last_key if state else None,
                             state.last_modality if state else None, above_index)
            if state is not None:  # padded tail tokens of a span open no concept and add no content
                bnd.b = bnd.b & valid
            chunker = bnd  # the ratio loss steers the chunker's own boundaries
            if self.training and self.forced_boundary_prob > 0:
                bnd = self._force_random_boundaries(bnd, valid)
            p, b = bnd.p, bnd.b
            if state is not None and T == 1:  # decoding: one token per row
                concept_tok = self._concept_token_step(schedule, h * valid[..., None], bnd, modality, positions,
                                                       state, run)
            else:
                concept_tok = self._concepts(schedule, h, bnd, starts, doc_ids, positions, modality, valid, state,
                                             run)
            if torch.is_grad_enabled():  # the factor is exactly 1; it exists for its gradient to p
                confidence = torch.where(b, p, 1 - p)
                z = h + concept_tok * straight_through_one(confidence)[..., None]
            else:
                z = h + concept_tok
        y = run(self.decoder, z, rope, mask, state.decoder if state else None, concept=concept_tok)
        logits = self.lm_head(self.norm(y))

        if state is not None:
            for cache in state.encoder + state.decoder + ([] if self.chunk else state.concept):
                cache.advance(T if full else lengths)
            state.num_tokens += lengths
            if full:
                state.last_modality = modality[:, -1]
                if self.chunk is not None:
                    state.last_key = chunker.k[:, -1].clone()  # not a view that keeps all T keys
            else:
                has, last = lengths > 0, (lengths - 1).clamp_min(0)
                state.last_modality = torch.where(has, modality.gather(1, last[:, None])[:, 0], state.last_modality)
                if self.chunk is not None:
                    last_key = chunker.k.gather(1, last[:, None, None].expand(-1, 1, chunker.k.shape[-1]))[:, 0]
                    state.last_key = torch.where(has[:, None], last_key, state.last_key)

        out = ModelOutput(logits=logits, tokens_per_expert=expert_counts, boundary_probs=p, boundaries=b)
        if not with_stats:
            return out
        out.compression = compression_stats(p, b, modality, valid)
        out.lb_loss = torch.stack(lb_losses).mean() if lb_losses else logits.sum() * 0
        out.ratio_loss = self._ratio_loss(chunker.p, chunker.b, modality, valid)
        if labels is not None:
            # mean over the predicted tokens; a batch without any (images only) adds 0, not 0/0 = NaN
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1),
                                          ignore_index=-100, reduction="sum") / (labels != -100).sum().clamp_min(1)
            out.loss = (out.lm_loss + self.cfg.chunk.ratio_loss_weight * out.ratio_loss
                        + self.cfg.lb_loss_weight * out.lb_loss)
        return out

    @staticmethod
    def _span_lengths(doc_ids: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
        """Valid tokens per row of a cached span: doc_ids 0 for tokens, −1 for padding at the row's end."""
        if doc_ids is None:
            return torch.full((B,), T, dtype=torch.long, device=device)
        if int(doc_ids.max()) > 0:
            raise ValueError("cached decoding takes one document per row (doc_ids 0, or −1 for tail padding)")
        valid = doc_ids >= 0
        lengths = valid.sum(1)
        if not torch.equal(valid, torch.arange(T, device=device) < lengths[:, None]):
            raise ValueError("cached decoding: padding (doc_ids −1) must come after a row's tokens")
        return lengths

    def _rope(self, positions: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_angles(positions, width // self.cfg.num_heads, self.cfg.rope_theta)

    def _concepts(self, schedule, h, bnd, starts, doc_ids, positions, modality, valid,
                  state: InferenceState | None, run) -> torch.Tensor:
        """Merge → concept model → dechunk for a whole span (training, prefill). Returns each token's
        smoothed concept c̄ (B, T, d); with a state, also updates its carry and c̄."""
        cpt = merge_concepts(h if state is None else h * valid[..., None], bnd, starts, doc_ids, positions,
                             self.cfg.chunk.merge, modality, carry=state.carry if state else None,
                             carry_modality=state.last_modality if state else None)
        xc = cpt.x if self.concept_in is None else self.concept_in(cpt.x)
        if state is None:
            rope = self._rope(cpt.positions, self.cfg.concept_width)
            c_hat = run(schedule, xc, rope, document_causal_mask(cpt.doc_ids), None)
        else:
            c_hat = self._concept_step(schedule, xc, cpt.counts, cpt.positions, state, run)
        c_hat = c_hat if self.concept_out is None else self.concept_out(c_hat)
        if self.cfg.chunk.dechunk_update:  # converted models: only the concept layers' residual update
            c_hat = c_hat - cpt.x
        # A boundary with p = 1 (forced) ends the EMA exactly: c̄_m = ĉ_m, as a reset, not 1 − 1e−4.
        c_bar = self.dechunk(c_hat, cpt.p, cpt.reset | (cpt.p >= 1), init=state.c_bar if state else None)
        if state is None:
            return plug_back(c_bar, cpt.token_index)
        c_bar = torch.cat([state.c_bar[:, None], c_bar], dim=1)  # index 0 = the concept carried in
        state.carry = cpt.tail
        state.c_bar = c_bar.gather(1, cpt.counts[:, None, None].expand(-1, 1, c_bar.shape[-1]))[:, 0]
        return plug_back(c_bar, cpt.token_index + 1)

    def _concept_token_step(self, schedule, h, bnd, modality, positions, state: InferenceState, run) -> torch.Tensor:
        """`_concepts` for one token per row (decoding), without the (B, M) bookkeeping of a span:
        h (B, 1, d) with padding rows zeroed, bnd.b already False for them. A row whose token is a
        boundary closes a concept (carry + token under `sum` merge), runs it through the concept
        model and takes one EMA step; the others add the token to the carry and keep c̄.
        Returns c̄ (B, 1, d); the same values as the span path (tests/cmoe_vlm/test_generation.py)."""
        b, h1 = bnd.b[:, 0], h[:, 0]
        if self.cfg.chunk.merge == "sum":
            joins = state.last_modality == modality[:, 0]  # no concept mixes modalities
            x = h1 + state.carry * joins[:, None]
            state.carry = torch.where(b[:, None], torch.zeros_like(h1), state.carry + h1)
        else:
            x = h1
        if not bool(b.any()):  # no row closes a concept: the concept model does not run, c̄ stays
            return state.c_bar[:, None]
        x = x[:, None]  # (B, 1, d)
        xc = x if self.concept_in is None else self.concept_in(x)
        c_hat = self._concept_step(schedule, xc, b.long(), positions, state, run, one_each=True)
        c_hat = c_hat if self.concept_out is None else self.concept_out(c_hat)
        if self.cfg.chunk.dechunk_update:
            c_hat = c_hat - x
        p = bnd.p[:, 0]
        c_bar = self.dechunk.step(c_hat[:, 0], p, p >= 1, state.c_bar)
        state.c_bar = torch.where(b[:, None], c_bar, state.c_bar)
        return state.c_bar[:, None]

    def _concept_step(self, schedule, xc, counts, positions, state: InferenceState, run,
                      one_each: bool = False) -> torch.Tensor:
        """Run the concept model on the new concepts (xc (B, M, dc), the first counts (B,) of each row,
        at positions (B, M)) of the rows that have any, with their caches. one_each: counts are 0 or 1
        (decoding), so the rows that run advance their caches by the int 1."""
        rows = (counts > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return torch.zeros_like(xc)
        all_rows = rows.numel() == xc.shape[0]
        h = xc if all_rows else xc[rows]
        rope = self._rope(positions if all_rows else positions[rows], self.cfg.concept_width)
        rows = None if all_rows else rows
        for blk, cache in zip(schedule, state.concept):
            h = run([blk], h, rope, None, [cache], rows=rows)
            cache.advance(1 if one_each else counts if rows is None else counts[rows], rows)
        return h if rows is None else torch.zeros_like(xc).index_copy(0, rows, h)

    def _ratio_loss(self, p, b, modality, valid) -> torch.Tensor:
        if self.chunk is None:
            return p.sum() * 0
        sets = {"all": valid, "text": valid & (modality == TEXT), "image": valid & (modality == IMAGE)}
        losses = []
        for i, (name, target) in enumerate(self.cfg.chunk.targets().items()):
            loss = ratio_loss(p, b, target, sets[name])
            if self.cfg.chunk.ratio_integral > 0 and target > 1 and sets[name].any():
                loss = loss + self._ratio_integral_term(i, p[sets[name]], b[sets[name]], target)
            losses.append(loss)
        return torch.stack(losses).sum()

    def _ratio_integral_term(self, i: int, p: torch.Tensor, b: torch.Tensor, target: float) -> torch.Tensor:
        """μ_i · G, with μ_i += η · (R·F − 1) after every training forward (F = boundary fraction of
        this batch, G = mean p). The paper's loss pulls G with a gradient ∝ (R·F − 1), so another
        steady force on p (the LM loss preferring fewer image boundaries, say) leaves the ratio off
        target; μ accumulates that steady error until it cancels the force (a PI controller's I)."""
        term = self.ratio_mu[i].clone() * p.float().mean()  # a copy: μ is updated in place below
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.ratio_mu[i] += self.cfg.chunk.ratio_integral * (target * b.float().mean() - 1)
        return term

    def _force_random_boundaries(self, bnd: Boundaries, valid: torch.Tensor) -> Boundaries:
        """Make each valid token a boundary with probability `forced_boundary_prob`, with p = 1 as at
        any forced boundary (its concept is its own: the EMA resets). At probability 1 every token is
        its own concept, so a converted model computes what the baseline did; lowering it to 0 moves
        the achieved R from 1 to the chunker's own while the ratio loss steers the chunker throughout
        (`train.ratio_ramp_steps`)."""
        extra = (torch.rand(bnd.b.shape, device=bnd.b.device) < self.forced_boundary_prob) & valid
        return Boundaries(p=torch.where(extra, torch.ones_like(bnd.p), bnd.p), b=bnd.b | extra)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

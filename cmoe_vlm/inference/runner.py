"""One loaded checkpoint, ready to score and generate: what evaluation and inspection go through.

    runner = ModelRunner.load("runs/tiny/final")
    runner.loglikelihood([[image, "Question: What colour is the circle? Answer:"]], [" red"])
    runner.generate([[image, "Question: How many squares? Answer:"]], max_new_tokens=8)
    runner.text_nll("some long text")              # summed over windows of max_seq_len
    runner.chat([[Message("user", [image, "How many squares?"])]], max_new_tokens=8)  # chat template

Prompts are lists of pieces (text or PIL images), laid out exactly as in training by
`data_pipelines.sequence.build_sequence` (bos, no eos). Scoring batches rows of different lengths
left-aligned with padding at the end (doc_ids = −1), which no real token attends to. Generation is
`cmoe_vlm.inference.generation.generate` (greedy, an InferenceSession). The tasks, the long-context probes,
the harness adapters (lm-eval, lmms-eval) and the inspection all call these methods, so they agree
by construction.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmoe_base import Batch, ConfigError, Modality
from data_pipelines.chat import DEFAULT_CHAT_TEMPLATE, Message, render_chat
from data_pipelines.images import to_rgb
from data_pipelines.sequence import TokenSequence, build_sequence
from data_pipelines.tokenizer import Tokenizer, load_tokenizer

from ..checkpoints.export import load_pretrained
from ..model.boundaries import BoundaryPolicy
from ..model.conceptmoe import ModelOutput
from ..model.vlm import ConceptMoEVLM
from .generation import generate, prompt_batch

Pieces = list[Any]  # str | PIL.Image.Image | image tensor (3, H, W)


@dataclass
class Scored:
    """Log-likelihood of a continuation given its context."""

    logprob: float    # sum over the continuation's tokens (natural log)
    is_greedy: bool   # every continuation token is the argmax at its position
    num_tokens: int


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ModelRunner:
    """A `ConceptMoEVLM` in eval mode with its tokenizer and image transform."""

    def __init__(self, model: ConceptMoEVLM, tokenizer: Tokenizer, batch_size: int = 8, name: str = "model",
                 boundaries: BoundaryPolicy | None = None):
        check_vocab(tokenizer, model.cfg.model.vocab_size, name)
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = batch_size
        self.name = name
        self.boundaries = boundaries  # the policy every scoring forward uses (None: the chunker's own)
        self.tokens_per_image = model.sequence_tokens_per_image()  # a count, or per image (vision.max_pixels)
        self.max_len = model.cfg.model.max_seq_len
        self.transform = model.image_transform(train=False)
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", batch_size: int = 8) -> ModelRunner:
        model, meta = load_pretrained(folder, device=device)
        spec = meta.get("tokenizer", "byte")
        if spec is None:
            raise ConfigError(f"{folder}: the export has no tokenizer (imported from a folder without tokenizer "
                              "files): import again from a folder holding them")
        if meta.get("parts") == ["lm"]:
            warnings.warn(f"{folder}: an import of a language model only: its vision tower and projector are random "
                          "placeholders, so image results mean nothing until it is trained on images", stacklevel=2)
        return cls(model, load_tokenizer(spec), batch_size, name=Path(folder).as_posix())

    # ------------------------------------------------------------------ sequences
    def sequence(self, pieces: Pieces, add_eos: bool = False) -> TokenSequence:
        """Pieces -> token sequence (bos first; images transformed to tensors)."""
        pieces = [p if isinstance(p, (str, torch.Tensor)) else self.transform(to_rgb(p)) for p in pieces]
        return build_sequence(pieces, self.tok, self.tokens_per_image, add_bos=True, add_eos=add_eos)

    def _check_len(self, n: int, what: str) -> None:
        if n > self.max_len:
            raise ValueError(f"{what} has {n} tokens, more than the model's max_seq_len = {self.max_len}")

    @torch.no_grad()
    def forward(self, seqs: list[TokenSequence], boundaries: BoundaryPolicy | None = None) -> tuple[ModelOutput, Batch]:
        """One scoring forward over sequences (one row each, left-aligned; eval-mode boundaries
        unless a policy, given here or to the runner, says otherwise): the model's output and the
        batch it ran on."""
        batch = prompt_batch(self.model, seqs)
        return self.model(batch, boundaries=boundaries or self.boundaries), batch

    def logits(self, seqs: list[TokenSequence]) -> torch.Tensor:
        """fp32 logits (B, T, V) of a scoring forward over `seqs`."""
        return self.forward(seqs)[0].logits.float()

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, contexts: list[Pieces], continuations: list[str]) -> list[Scored]:
        """log P(continuation | context) for each pair. An empty continuation is an error."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        items = []
        for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
            seq = self.sequence(ctx)
            cont_ids = self.tok.encode(cont)
            if not cont_ids:
                raise ValueError(f"request {i}: the continuation {cont!r} encodes to no tokens")
            n_ctx = len(seq)
            seq.input_ids += cont_ids
            seq.modality += [int(Modality.TEXT)] * len(cont_ids)
            self._check_len(len(seq), f"request {i} (context + continuation)")
            items.append((seq, n_ctx, cont_ids))
        return self._score(items)

    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """Text-only scoring of token ids: (context ids, continuation ids) per request. The context
        is used as given (include bos yourself); it must not be empty."""
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation")
            ids = list(ctx) + list(cont)
            self._check_len(len(ids), f"request {i}")
            items.append((TokenSequence(input_ids=ids, modality=[int(Modality.TEXT)] * len(ids)), len(ctx),
                          list(cont)))
        return self._score(items)

    def _score(self, items: list[tuple[TokenSequence, int, list[int]]]) -> list[Scored]:
        results: list[Scored] = []
        for chunk in _batches(items, self.batch_size):
            logits = self.logits([s for s, _, _ in chunk])
            logp = F.log_softmax(logits, dim=-1)
            for r, (_, n_ctx, cont_ids) in enumerate(chunk):
                pos = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont_ids), device=logp.device)
                target = torch.tensor(cont_ids, device=logp.device)
                lp = logp[r, pos]  # (n_cont, V)
                results.append(Scored(float(lp.gather(1, target[:, None]).sum()),
                                      bool((lp.argmax(-1) == target).all()), len(cont_ids)))
        return results

    def text_nll(self, text: str) -> tuple[float, int]:
        """(summed NLL in nats, predicted tokens) of a text document, in windows of max_seq_len.

        The first token after bos is predicted from bos alone; a text longer than one window is
        cut into consecutive windows, each starting again from bos (no overlap)."""
        ids = self.tok.encode(text)
        if not ids:
            raise ValueError("text_nll: empty text")
        step = self.max_len - 1
        windows = [[self.tok.bos_id] + ids[i:i + step] for i in range(0, len(ids), step)]
        nll, n = 0.0, 0
        for chunk in _batches(windows, self.batch_size):
            seqs = [TokenSequence(input_ids=w, modality=[int(Modality.TEXT)] * len(w)) for w in chunk]
            logits = self.logits(seqs)
            logp = F.log_softmax(logits, dim=-1)
            for r, w in enumerate(chunk):
                target = torch.tensor(w[1:], device=logp.device)
                nll -= float(logp[r, :len(w) - 1].gather(1, target[:, None]).sum())
                n += len(w) - 1
        return nll, n

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[Pieces], max_new_tokens: int, stop: SequenceABC[str] = (), *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> list[str]:
        """Continuations (KV cache; greedy, or sampled when temperature > 0: see
        `cmoe_vlm.inference.generation.generate`), cut at eos and at the first of the `stop` strings. A stop
        string that is a single token also ends its row's generation early."""
        seqs = [self.sequence(p) for p in prompts]
        for i, s in enumerate(seqs):
            self._check_len(len(s) + max_new_tokens, f"prompt {i} + max_new_tokens")
        stop_ids = (self.tok.eos_id, *(ids[0] for ids in map(self.tok.encode, stop)
                                       if len(ids) == 1 and self.tok.decode(ids) in stop))
        texts: list[str] = []
        for chunk in _batches(seqs, self.batch_size):
            for ids in generate(self.model, chunk, max_new_tokens, stop_ids=stop_ids, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed):
                texts.append(cut_at_stop(self.tok.decode(ids), stop))
        return texts

    def chat(self, chats: list[list[Message]], max_new_tokens: int, **sampling: Any) -> list[str]:
        """The assistant's next reply to each conversation (`data_pipelines.chat.Message`s, images in the
        turns), rendered with the tokenizer's chat template up to the assistant's cue, as chat training
        data and `cmoe-eval --chat` lay it out; cut at the end of the turn (eos, or the default
        template's newline)."""
        template = self.tok.chat_template
        prompts = [render_chat(c, template, add_generation_prompt=True) for c in chats]
        return self.generate(prompts, max_new_tokens, stop=("\n",) if template == DEFAULT_CHAT_TEMPLATE else (),
                             **sampling)


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str = "model") -> None:
    """A tokenizer with more ids than the model's embedding would fail deep inside a forward
    (IndexError in the embedding): refuse it up front, naming both numbers."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                          f"{vocab_size}: use the tokenizer the model was trained with (its export's "
                          f"config.json names it)")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    return nll_nats / math.log(2) / max(num_bytes, 1)

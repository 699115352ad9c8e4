"""Tokenizers: a built-in byte-level one and a wrapper for a local Hugging Face tokenizer.

Both expose the same small interface (`Tokenizer`): `encode(text)` adds no special tokens,
`decode(ids)` drops them, and the special ids the sequence builder needs are attributes.

ByteTokenizer ids: 0..255 are the UTF-8 bytes, then
    pad=256, bos=257, eos=258, img_start=259, img_end=260, image=261;  vocab_size = 262.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cmoe_base import check

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IMAGE_TOKENS = {"img_start": "<img_start>", "img_end": "<img_end>", "image": "<image>"}


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    img_start_id: int
    img_end_id: int
    image_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, six special tokens after them."""

    pad_id, bos_id, eos_id = 256, 257, 258
    img_start_id, img_end_id, image_id = 259, 260, 261
    vocab_size = 262

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers` tokenizer loaded from a local folder, with the image tokens added.

    pad/bos/eos are added too when the tokenizer lacks them. `vocab_size` counts added tokens
    (`len(tokenizer)`), so it is the embedding size the model needs.
    """

    def __init__(self, folder: str | Path | PreTrainedTokenizerBase):
        """A local folder, or a loaded transformers tokenizer (the tokens are added to it in place)."""
        if isinstance(folder, (str, Path)):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        else:
            tok = folder
        missing = {name: f"<{name}>" for name in ("pad", "bos", "eos") if getattr(tok, f"{name}_token") is None}
        if missing:
            tok.add_special_tokens({f"{name}_token": text for name, text in missing.items()})
        tok.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
        self._tok = tok
        self.pad_id, self.bos_id, self.eos_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        ids = {name: tok.convert_tokens_to_ids(text) for name, text in IMAGE_TOKENS.items()}
        self.img_start_id, self.img_end_id, self.image_id = ids["img_start"], ids["img_end"], ids["image"]
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` → ByteTokenizer; otherwise a local folder holding a Hugging Face tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    check(Path(spec).is_dir(), "tokenizer", spec,
          "must be 'byte' or an existing local folder saved with save_pretrained (nothing is downloaded)")
    return HFTokenizer(spec)

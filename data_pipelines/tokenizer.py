"""Tokenizers: a built-in byte-level one and a wrapper for a local Hugging Face tokenizer.

Both expose the same small interface (`Tokenizer`): `encode(text)` adds no special tokens,
`decode(ids)` drops them, and the special ids the sequence builder needs are attributes, as is the
`chat_template` conversations are rendered with (data_pipelines/chat.py): a tokenizer's own, else
`DEFAULT_CHAT_TEMPLATE`, which the ByteTokenizer uses and which is written into exported tokenizer
files that lack one.

ByteTokenizer ids: 0..255 are the UTF-8 bytes, then
    pad=256, bos=257, eos=258, img_start=259, img_end=260, image=261;  vocab_size = 262.

`save_tokenizer(spec, folder)` writes either as Hugging Face tokenizer files, so that an export
folder carries its tokenizer and `transformers.AutoTokenizer.from_pretrained(folder)` loads it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cmoe_base import check
from data_pipelines.chat import DEFAULT_CHAT_TEMPLATE

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
    chat_template: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, six special tokens after them."""

    pad_id, bos_id, eos_id = 256, 257, 258
    img_start_id, img_end_id, image_id = 259, 260, 261
    vocab_size = 262
    chat_template = DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the `tokenizers` ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def auto_tokenizer(folder: str | Path):
    """`transformers.AutoTokenizer` of a local folder. In a cmoe-vlm export, whose config.json is ours
    (transformers knows its model_type only once `cmoe_vlm.hf` is imported), the tokenizer's own
    tokenizer_config.json names its class: no model config is read (nor warned about)."""
    from transformers import AutoTokenizer, PretrainedConfig

    config = Path(folder) / "config.json"
    ours = config.is_file() and json.loads(config.read_text()).get("format") == "cmoe-vlm"
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                         **({"config": PretrainedConfig()} if ours else {}))


def save_byte_tokenizer(out: str | Path) -> None:
    """The ByteTokenizer as `tokenizers` files: a ByteLevel pre-tokenizer with a vocabulary of the 256
    byte characters (id = byte value) and no merges, then the six special tokens at their ids. With
    `split_special_tokens`, text that spells a special token ("<s>") stays bytes, as ByteTokenizer
    encodes it, so `AutoTokenizer.from_pretrained(out).encode(text)` == `ByteTokenizer().encode(text)`."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers

    chars = _bytes_to_unicode()
    raw = RawTokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    specials = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", **IMAGE_TOKENS}
    raw.add_special_tokens(list(specials.values()))  # ids 256.. in ByteTokenizer's order
    assert [raw.token_to_id(t) for t in specials.values()] == list(range(256, ByteTokenizer.vocab_size))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True,
              **{f"{name}_token": specials[name] for name in ("pad", "bos", "eos")},
              "additional_special_tokens": list(IMAGE_TOKENS.values()), "chat_template": DEFAULT_CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


class HFTokenizer:
    """A `transformers` tokenizer loaded from a local folder, with the image tokens added.

    pad/bos/eos are added too when the tokenizer lacks them. `vocab_size` counts added tokens
    (`len(tokenizer)`), so it is the embedding size the model needs.
    """

    def __init__(self, folder: str | Path | PreTrainedTokenizerBase):
        """A local folder, or a loaded transformers tokenizer (the tokens are added to it in place)."""
        tok = auto_tokenizer(folder) if isinstance(folder, (str, Path)) else folder
        missing = {name: f"<{name}>" for name in ("pad", "bos", "eos") if getattr(tok, f"{name}_token") is None}
        if missing:
            tok.add_special_tokens({f"{name}_token": text for name, text in missing.items()})
        tok.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
        self._tok = tok
        self.pad_id, self.bos_id, self.eos_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        ids = {name: tok.convert_tokens_to_ids(text) for name, text in IMAGE_TOKENS.items()}
        self.img_start_id, self.img_end_id, self.image_id = ids["img_start"], ids["img_end"], ids["image"]
        self.vocab_size = len(tok)
        self.chat_template = own_chat_template(tok) or DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def save_tokenizer(spec: str, out: str | Path) -> None:
    """Write the tokenizer named by `spec` (as `load_tokenizer` takes it) into `out` as Hugging Face
    tokenizer files. A local folder's tokenizer is written as loaded, without the image tokens
    `HFTokenizer` adds: loading `out` with `load_tokenizer` adds them again, at the same ids."""
    if spec == "byte":
        save_byte_tokenizer(out)
        return
    check(Path(spec).is_dir(), "tokenizer", spec, "must be 'byte' or an existing local folder")
    tok = auto_tokenizer(spec)
    tok.chat_template = own_chat_template(tok) or DEFAULT_CHAT_TEMPLATE  # what training rendered chats with
    tok.save_pretrained(str(out))


def own_chat_template(tok: PreTrainedTokenizerBase) -> str | None:
    """A transformers tokenizer's default chat template (None when it has none)."""
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` → ByteTokenizer; otherwise a local folder holding a Hugging Face tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    check(Path(spec).is_dir(), "tokenizer", spec,
          "must be 'byte' or an existing local folder saved with save_pretrained (nothing is downloaded)")
    return HFTokenizer(spec)

"""Fixtures shared across the test packages."""
import pytest


def save_bpe_tokenizer(folder, texts: list[str], vocab_size: int, eos: bool):
    """Train a byte-level BPE tokenizer on `texts` and save it as transformers files in `folder`: bos
    `<s>`, unk `<unk>`, eos `</s>` if `eos`, no pad token (as Mistral's has none)."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", *(["</s>"] if eos else [])],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                            **({"eos_token": "</s>"} if eos else {})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_tokenizer_folder(tmp_path_factory):
    """A small BPE tokenizer (~300 ids, bos `<s>`, no pad/eos, no image tokens) saved as transformers
    files: what `data_pipelines.tokenizer.HFTokenizer` loads, adding its special tokens."""
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"),
                              ["two red circles and a blue square", "how many circles? 3"] * 20, 300, eos=False)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A 400-token byte-level BPE tokenizer trained on CPython's pydoc topics, saved as a transformers
    tokenizer folder: bos `<s>`, eos `</s>`, unk `<unk>`, no pad token (as Mistral's has none)."""
    from pydoc_data.topics import topics
    return save_bpe_tokenizer(tmp_path_factory.mktemp("bpe_tokenizer"), [topics[k] for k in sorted(topics)[:20]],
                              400, eos=True)

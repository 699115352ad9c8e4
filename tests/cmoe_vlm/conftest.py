"""Fixtures shared by the model tests: a small real tokenizer, built offline."""
import pytest


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A 400-token byte-level BPE tokenizer trained on CPython's pydoc topics, saved as a transformers
    tokenizer folder: bos `<s>`, eos `</s>`, unk `<unk>`, no pad token (as Mistral's has none)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator([topics[k] for k in sorted(topics)[:20]], trainer)
    folder = tmp_path_factory.mktemp("bpe_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder

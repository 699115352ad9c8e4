"""Fixtures shared across the test packages."""
import pytest


@pytest.fixture(scope="session")
def bpe_tokenizer_folder(tmp_path_factory):
    """A small BPE tokenizer (~300 ids, bos `<s>`, no pad/eos, no image tokens) saved as transformers
    files: what `data_pipelines.tokenizer.HFTokenizer` loads, adding its special tokens."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bpe_tokenizer")
    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["two red circles and a blue square", "how many circles? 3"] * 20, trainer)
    raw.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>").save_pretrained(folder)
    return folder

import pytest

from cmoe_vlm.config import ConfigError
from data_pipelines.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer


def test_byte_tokenizer_roundtrip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    text = "Héllo, wörld — 3 circles ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    specials = (tok.pad_id, tok.bos_id, tok.eos_id, tok.img_start_id, tok.img_end_id, tok.image_id)
    assert specials == (256, 257, 258, 259, 260, 261) and tok.vocab_size == 262
    assert tok.decode([tok.bos_id, *ids, tok.image_id, tok.eos_id]) == text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # bad bytes are replaced, not raised


@pytest.fixture
def hf_folder(bpe_tokenizer_folder):
    return bpe_tokenizer_folder


def test_hf_tokenizer_from_local_folder(hf_folder):
    tok = load_tokenizer(str(hf_folder))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.img_start_id, tok.img_end_id, tok.image_id]
    assert len(set(specials)) == 6 and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in specials)
    text = "two red circles? 3"
    ids = tok.encode(text)
    assert not set(ids) & set(specials)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, tok.img_start_id, *ids, tok.image_id, tok.eos_id]) == text


def test_missing_tokenizer_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))

import pytest
import torch

from cmoe_vlm.config import ConfigError
from data_pipelines.loader import DataConfig
from data_pipelines.packing import RowPacker, collate_rows, sequence_batch
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import ByteTokenizer

from .conftest import check_batch

TOK = ByteTokenizer()
TPI = 4
SHAPE = (3, 2, 2)


def img(v: float) -> torch.Tensor:
    return torch.full(SHAPE, v)


def pack(docs, seq_len):
    packer = RowPacker(seq_len, TOK.pad_id)
    rows = list(packer.rows(iter(enumerate(docs))))
    return collate_rows(rows, SHAPE)


def test_documents_concatenate_and_pad_at_end():
    docs = [build_sequence(["abc"], TOK, TPI), build_sequence(["de"], TOK, TPI)]  # 5 + 4 tokens
    batch = pack(docs, seq_len=12)
    check_batch(batch, TOK, TPI, 12)
    assert batch.doc_ids[0].tolist() == [0] * 5 + [1] * 4 + [-1] * 3
    assert batch.input_ids[0, -3:].tolist() == [TOK.pad_id] * 3
    assert batch.labels[0].tolist() == [97, 98, 99, TOK.eos_id, -100, 100, 101, TOK.eos_id] + [-100] * 4


def test_long_document_is_split_into_a_new_document_without_bos():
    doc = build_sequence(["abcdefghij"], TOK, TPI)  # 12 tokens
    batch = pack([doc], seq_len=8)
    check_batch(batch, TOK, TPI, 8)
    assert batch.input_ids.shape == (2, 8)
    assert batch.input_ids[0].tolist() == doc.input_ids[:8]
    assert batch.input_ids[1, :4].tolist() == doc.input_ids[8:]  # continuation: no bos
    assert batch.doc_ids[1].tolist() == [0] * 4 + [-1] * 4
    assert batch.labels[0, -1].item() == -100  # the split loses the target across rows


def test_split_never_cuts_an_image_block():
    first = build_sequence(["abcd"], TOK, TPI)  # 6 tokens
    second = build_sequence(["x", img(1.0), "y", img(2.0)], TOK, TPI)  # bos x [6] y [6] eos = 16
    batch = pack([first, second], seq_len=12)
    check_batch(batch, TOK, TPI, 12)
    # row 0: first (6) + bos x (2) then the image block (6) does not fit in 4: padded
    assert batch.doc_ids[0].tolist() == [0] * 6 + [1] * 2 + [-1] * 4
    assert batch.num_images.tolist() == [0, 1, 1]  # [img] y | [img] eos: each block whole
    assert torch.equal(batch.images, torch.stack([img(1.0), img(2.0)]))


def test_images_are_row_major_and_counted_per_row():
    docs = [build_sequence([img(float(i)), "cap"], TOK, TPI) for i in range(5)]  # 12 tokens each
    batch = pack(docs, seq_len=24)
    check_batch(batch, TOK, TPI, 24)
    assert batch.num_images.tolist() == [2, 2, 1]
    assert batch.images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_no_images_gives_an_empty_image_tensor():
    batch = pack([build_sequence(["hello"], TOK, TPI)], seq_len=8)
    assert batch.images.shape == (0, *SHAPE)


def test_resume_with_a_split_document_continues_it():
    docs = [build_sequence(["abcdefghijklmnop"], TOK, TPI), build_sequence(["q"], TOK, TPI)]
    packer = RowPacker(8, TOK.pad_id)
    rows = packer.rows(iter(enumerate(docs)))
    first = next(rows)
    assert packer.pending == (0, 8)
    again = RowPacker(8, TOK.pad_id)
    again.resume_with(0, docs[0], 8)
    rest_a = [r.input_ids for r in rows]
    rest_b = [r.input_ids for r in again.rows(iter([(1, docs[1])]))]
    assert first.input_ids == docs[0].input_ids[:8] and rest_a == rest_b


def test_sequence_batch_is_one_unpadded_row():
    seq = build_sequence([img(0.5), "a red circle"], TOK, TPI)
    batch = sequence_batch(seq, SHAPE)
    check_batch(batch, TOK, TPI, len(seq))
    assert batch.labels[0].tolist() == seq.labels()


def test_image_block_longer_than_seq_len_is_a_config_error():
    with pytest.raises(ConfigError, match="seq_len"):
        DataConfig(shards="x", seq_len=10, tokens_per_image=9)

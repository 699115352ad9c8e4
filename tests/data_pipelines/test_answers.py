"""data.loss_on: answers: LM loss only on answers and assistant turns, in documents that have them."""
import pytest
import torch

from cmoe_base import IGNORE_INDEX
from data_pipelines.chat import Chat, Message
from data_pipelines.document import Answer
from data_pipelines.loader import DataConfig
from data_pipelines.packing import RowPacker, collate_rows
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import ByteTokenizer

from cmoe_vlm.config import ConfigError

TOK = ByteTokenizer()
SHAPE = (3, 2, 2)


def predicted(batch, row=0) -> str:
    """The text of the tokens a row's labels predict."""
    return TOK.decode([t for t in batch.labels[row].tolist() if t != IGNORE_INDEX])


def pack(docs, seq_len, loss_on):
    rows = list(RowPacker(seq_len, TOK.pad_id, loss_on).rows(iter(enumerate(docs))))
    return collate_rows(rows, SHAPE)


def test_answers_only_in_documents_with_answers_and_eos_joins_the_last_answer():
    qa = build_sequence([torch.zeros(SHAPE), "Question: q? Answer:", Answer(" red")], TOK, 4)
    text = build_sequence(["plain text"], TOK, 4)
    for loss_on, want_qa in (("all", "Question: q? Answer: red"), ("answers", " red")):
        batch = pack([qa, text], 64, loss_on)
        labels = batch.labels[0]
        qa_labels = labels[:len(qa)]
        got = TOK.decode([t for t in qa_labels.tolist() if t != IGNORE_INDEX])
        assert got == want_qa
        assert TOK.eos_id in qa_labels.tolist()  # the answer teaches the model to stop
        assert TOK.decode([t for t in labels[len(qa):].tolist() if t != IGNORE_INDEX]) == "plain text"


def test_a_split_document_keeps_its_answer_mask():
    doc = build_sequence(["x" * 10, Answer("abcdef")], TOK, 4)  # bos, 10 context, 6 answer, eos
    batch = pack([doc], 12, "answers")
    # the continuation is a new document: its first token ("b") has no predecessor there, so no label
    assert (predicted(batch, 0), predicted(batch, 1)) == ("a", "cdef")
    assert batch.labels[1].tolist().count(TOK.eos_id) == 1


def test_chat_answers_are_the_assistant_turns():
    chat = Chat([Message("user", [torch.zeros(SHAPE), "What colour?"]), Message("assistant", ["red"]),
                 Message("user", ["Shape?"]), Message("assistant", ["a circle"])])
    seq = build_sequence(chat, TOK, 4)
    spans = [TOK.decode(seq.input_ids[a:b]) for a, b in seq.answer_spans]
    assert spans == [" red\n", " a circle\n"]  # the last one ends with eos (dropped by decode)
    assert seq.answer_spans[-1][1] == len(seq)
    assert predicted(pack([seq], 128, "answers")) == " red\n a circle\n"


def test_loss_on_is_checked():
    with pytest.raises(ConfigError, match="loss_on"):
        DataConfig(loss_on="answer")

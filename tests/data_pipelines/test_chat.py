"""Conversations: writer sources (LLaVA, transformers messages, qa JSONL), decoding, chat templates."""
import json

import pytest
from PIL import Image

from data_pipelines.chat import DEFAULT_CHAT_TEMPLATE, Chat, Message, render_chat, render_text
from data_pipelines.document import Answer
from data_pipelines.loader import read_tar
from data_pipelines.sequence import build_sequence
from data_pipelines.shards import decode_sample, main
from data_pipelines.tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer

TOK = ByteTokenizer()


def image(path, colour=(200, 10, 10)):
    Image.new("RGB", (8, 8), colour).save(path)
    return path.name


def samples(out):
    return [decode_sample(s) for tar in sorted(out.glob("*.tar")) for s in read_tar(str(tar))]


def test_default_template_pieces_and_generation_prompt():
    img = Image.new("RGB", (4, 4))
    chat = Chat([Message("system", ["Be brief."]), Message("user", [img, "What colour?"]),
                 Message("assistant", ["red"])])
    pieces = render_chat(chat)
    assert pieces == ["Be brief.\nUser: ", img, "What colour?\nAssistant:", " red\n"]
    assert [type(p) for p in pieces if isinstance(p, str)] == [str, str, Answer]
    prompt = render_chat(chat[:2], add_generation_prompt=True)
    assert prompt[-1] == "What colour?\nAssistant:" and not any(isinstance(p, Answer) for p in prompt)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # renders only the last message: earlier renderings are no prefix of later ones
    template = "{{ messages[-1]['content'] }}"
    chat = Chat([Message("user", ["a"]), Message("assistant", ["b"])])
    with pytest.raises(ValueError, match="not a prefix"):
        render_chat(chat, template)


def test_writer_sources_make_chat_and_qa_samples(tmp_path):
    a, b = image(tmp_path / "a.png"), image(tmp_path / "b.png", (10, 200, 10))
    (tmp_path / "llava.json").write_text(json.dumps([
        {"image": a, "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"},
                                       {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"image": b, "conversations": [{"from": "human", "value": "No marker: the image goes first."},
                                       {"from": "gpt", "value": "green"}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]}]))
    (tmp_path / "messages.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": [a]},
        {"messages": [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "two"}],
         "images": [a, b]},
        {"messages": [{"role": "robot", "content": "x"}]}]) + "\n")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": a, "question": "Colour?", "answer": "red"}) + "\n")
    for source, name in (("llava", "llava.json"), ("messages", "messages.jsonl"), ("qa", "qa.jsonl")):
        main([source, str(tmp_path / name), "--out", str(tmp_path / source)])
    llava = samples(tmp_path / "llava")
    assert len(llava) == 2 and all(isinstance(c, Chat) for c in llava)
    manifest = json.loads((tmp_path / "llava" / "manifest.json").read_text())
    assert manifest["skipped_counts"] == {"bad_json": 1, "missing_image": 1}
    seq = build_sequence(llava[0], TOK, 4)
    assert [TOK.decode(seq.input_ids[s:e]) for s, e in seq.answer_spans] == [" red\n", " yes\n"]
    assert isinstance(llava[1][0].pieces[0], Image.Image) and llava[1][0].pieces[1].startswith("No marker")
    msgs = samples(tmp_path / "messages")
    assert len(msgs) == 2 and [len(c.images()) for c in msgs] == [1, 2]
    assert msgs[1][0].pieces[1] == " and " and msgs[1][1].pieces == ["two"]
    qa = samples(tmp_path / "qa")
    assert qa[0][1:] == ["Question: Colour? Answer:", " red"] and isinstance(qa[0][2], Answer)


def test_export_carries_the_template_and_transformers_renders_the_same(tmp_path):
    save_tokenizer("byte", tmp_path / "tok")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    messages = [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And?"}]
    chat = Chat([Message("user", [Image.new("RGB", (2, 2)), "What colour?"]), Message("assistant", ["red"]),
                 Message("user", ["And?"])])
    want = render_text(chat, DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    assert load_tokenizer(str(tmp_path / "tok")).chat_template == DEFAULT_CHAT_TEMPLATE

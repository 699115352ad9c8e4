"""Export folders carry their tokenizer: files, ids in config.json and generation_config.json."""
import dataclasses
import json
import shutil

import torch

from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.cli.convert import main as convert_main
from cmoe_vlm.checkpoints.export import load_pretrained, save_pretrained
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ModelConfig
from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig
from data_pipelines.tokenizer import ByteTokenizer, load_tokenizer

TEXT = "Héllo, wörld: <s> and </s> are text here\n\tdef f(x): return x ** 2  # ✓"


def tiny(vocab_size: int, chunk: bool = True) -> ConceptMoEVLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, num_heads=2, encoder_layers=1, concept_layers=1, decoder_layers=1,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32), chunk=ChunkConfig(enabled=chunk))
    vcfg = VLMConfig(model=cfg)
    return ConceptMoEVLM(dataclasses.replace(vcfg, vision=dataclasses.replace(vcfg.vision, depth=1)))


def test_byte_tokenizer_export_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    import cmoe_vlm.hf  # noqa: F401  registers the Auto classes

    save_pretrained(tiny(262), tmp_path / "m")
    byte = ByteTokenizer()
    theirs = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert theirs.encode(TEXT, add_special_tokens=False) == byte.encode(TEXT)  # "<s>" spelled out stays bytes
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
    assert [theirs.convert_tokens_to_ids(t) for t in ("<img_start>", "<img_end>", "<image>")] == [259, 260, 261]
    assert theirs.decode([byte.bos_id, *byte.encode(TEXT), byte.image_id], skip_special_tokens=True) == TEXT
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (257, 258, 256)
    gen = GenerationConfig.from_pretrained(tmp_path / "m")
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (257, 258, 256)
    assert json.loads((tmp_path / "m/config.json").read_text())["tokenizer"] == "byte"


def test_hf_tokenizer_travels_with_the_export_and_through_conversion(bpe_tokenizer, tmp_path):
    """An export trained with a local tokenizer folder holds that tokenizer: moved elsewhere, with the
    original folder gone, it loads with the same ids (image tokens and the added pad included), and
    its config names the ids the model was trained with. Conversion keeps both."""
    from transformers import AutoConfig, AutoTokenizer

    import cmoe_vlm.hf  # noqa: F401

    source = tmp_path / "tok"
    shutil.copytree(bpe_tokenizer, source)
    ours = load_tokenizer(str(source))
    expected_ids = ours.encode(TEXT)
    specials = (ours.bos_id, ours.eos_id, ours.pad_id, ours.img_start_id, ours.img_end_id, ours.image_id)
    reference = AutoTokenizer.from_pretrained(source).encode(TEXT)
    save_pretrained(tiny(ours.vocab_size, chunk=False), tmp_path / "a" / "m", tokenizer=str(source))
    shutil.move(tmp_path / "a" / "m", tmp_path / "b")
    shutil.rmtree(source)
    shutil.rmtree(tmp_path / "a")

    model, meta = load_pretrained(tmp_path / "b")
    assert meta["tokenizer"] == str(tmp_path / "b")
    moved = load_tokenizer(meta["tokenizer"])
    assert moved.encode(TEXT) == expected_ids and moved.vocab_size == ours.vocab_size
    assert (moved.bos_id, moved.eos_id, moved.pad_id, moved.img_start_id, moved.img_end_id, moved.image_id) == specials
    assert AutoTokenizer.from_pretrained(tmp_path / "b").encode(TEXT) == reference
    on_disk = json.loads((tmp_path / "b/config.json").read_text())
    assert on_disk["tokenizer"] == "included" and str(tmp_path) not in json.dumps(on_disk)
    config = AutoConfig.from_pretrained(tmp_path / "b")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)

    assert convert_main(["--baseline", str(tmp_path / "b"), "--out", str(tmp_path / "c"), "--encoder-layers", "1",
                         "--decoder-layers", "1", "--strategy", "none"]) == 0
    converted = json.loads((tmp_path / "c/config.json").read_text())
    assert {k: converted[k] for k in ("tokenizer", "bos_token_id", "eos_token_id", "pad_token_id")} == \
        {k: on_disk[k] for k in ("tokenizer", "bos_token_id", "eos_token_id", "pad_token_id")}
    assert load_tokenizer(load_pretrained(tmp_path / "c")[1]["tokenizer"]).encode(TEXT) == expected_ids

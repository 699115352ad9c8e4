"""transformers on an export: generate() with default arguments through our concept-level cache (same
tokens as our generator; greedy, sampling, beams, pipeline), padded batches, images and the
processor, and trust_remote_code without cmoe-vlm installed."""
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from PIL import Image

from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.checkpoints.export import save_pretrained
from cmoe_vlm.inference.generation import generate
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ModelConfig
from cmoe_vlm.inference.runner import ModelRunner
from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import ByteTokenizer, HFTokenizer
from vision import ProjectorConfig, VisionConfig

transformers = pytest.importorskip("transformers")
import cmoe_vlm.hf  # noqa: E402,F401  registers the Auto classes
from cmoe_vlm.hf.generation import ConceptCache  # noqa: E402

TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_vlm(vocab_size: int = TOK.vocab_size) -> ConceptMoEVLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        model=ModelConfig(vocab_size=vocab_size, dim=48, num_heads=4, encoder_layers=1, concept_layers=1,
                          decoder_layers=1, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=48),
                          chunk=ChunkConfig()),
        vision=VisionConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, crop_pct=1.0),
        projector=ProjectorConfig(reduction=1))  # 16 tokens per image
    return ConceptMoEVLM(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model, the transformers model loaded from its export, the export folder)."""
    model = tiny_vlm()
    folder = save_pretrained(model, tmp_path_factory.mktemp("export") / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, hf, folder


def image(seed: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))


def left_padded(seqs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, mm_token_type_ids) of sequences padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), TOK.pad_id)
    mask, modality = torch.zeros_like(ids), torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, T - len(s):] = torch.tensor(s.input_ids)
        mask[r, T - len(s):] = 1
        modality[r, T - len(s):] = torch.tensor(s.modality)
    return ids, mask, modality


def prompt(*pieces):
    return build_sequence(list(pieces), TOK, 16, add_bos=True, add_eos=False)


def test_generate_with_default_arguments_uses_our_cache_and_matches_our_generator(exported):
    """transformers 5.24 crashed here (DynamicCache reads config.num_hidden_layers)."""
    model, hf, _ = exported
    seq = prompt("a red square")
    ids = torch.tensor([seq.input_ids])
    out = hf.generate(ids, return_dict_in_generate=True)  # defaults: greedy, 20 new tokens, cache on
    ours = generate(model, [seq], 20, stop_ids=[TOK.eos_id])[0]
    assert out.sequences[0, ids.shape[1]:].tolist()[:len(ours)] == ours
    cache = out.cache
    assert isinstance(cache, ConceptCache)
    state = cache.session.state  # concept-level: one concept-cache entry per chunk, fewer than tokens
    assert int(state.num_concepts[0]) < int(state.num_tokens[0]) == out.sequences.shape[1] - 1
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    # beams and seeded sampling: the cached path gives what transformers' uncached path gives
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(3)
    sampled = hf.generate(ids, **kw)
    torch.manual_seed(3)
    assert torch.equal(sampled, hf.generate(ids, use_cache=False, **kw))
    with pytest.raises(TypeError, match="ConceptCache"):
        hf.generate(ids, max_new_tokens=2, cache=transformers.DynamicCache())


def test_padded_batches_give_the_logits_of_single_rows(exported):
    model, hf, _ = exported
    seqs = [prompt("a red square above"), prompt("hi")]
    ids, mask, _ = left_padded(seqs)
    single = [hf(torch.tensor([s.input_ids])).logits[0] for s in seqs]
    left = hf(ids, attention_mask=mask).logits
    right = hf(ids.flip(1), attention_mask=mask.flip(1)).logits  # padding at the ends instead
    holes = torch.cat([ids[:, :2], torch.full((2, 3), TOK.pad_id), ids[:, 2:]], 1)  # a masked run inside rows
    hole_mask = torch.cat([mask[:, :2], torch.zeros(2, 3, dtype=torch.long), mask[:, 2:]], 1)
    holed = hf(holes, attention_mask=hole_mask).logits
    for r, s in enumerate(seqs):
        n = len(s)
        torch.testing.assert_close(left[r, -n:], single[r], rtol=0, atol=1e-5)
        torch.testing.assert_close(holed[r][hole_mask[r].bool()], single[r], rtol=0, atol=1e-5)
        ids_r = torch.tensor([s.input_ids[::-1]])  # the flipped batch's row r, alone
        torch.testing.assert_close(right[r, :n], hf(ids_r).logits[0], rtol=0, atol=1e-5)
    # generation from left-padded prompts: what our generator gives each prompt (ragged batch)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    assert out[:, ids.shape[1]:].tolist() == generate(model, seqs, 10)
    chunked = hf.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, prefill_chunk_size=4)
    assert torch.equal(chunked, out)  # the first chunk is all padding in row 1: a span without tokens
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="pad on the left"):
            hf.generate(ids.flip(1), attention_mask=mask.flip(1), max_new_tokens=2, use_cache=use_cache)
    with pytest.raises(TypeError, match="position_ids"):
        hf(ids, attention_mask=mask, position_ids=mask.cumsum(1))


def test_images_through_pixel_values_and_generate(exported):
    model, hf, _ = exported
    seqs = [prompt("look: ", image(0), " it is"), prompt(image(1), "two ", image(2), " x")]
    ids, mask, modality = left_padded(seqs)
    pixels = torch.stack([im for s in seqs for im in s.images])
    logits = hf(ids, attention_mask=mask, pixel_values=pixels, mm_token_type_ids=modality).logits
    alone = hf(torch.tensor([seqs[1].input_ids]), pixel_values=pixels[1:],
               mm_token_type_ids=torch.tensor([seqs[1].modality])).logits[0]
    torch.testing.assert_close(logits[1], alone, rtol=0, atol=1e-5)
    no_images = hf(ids, attention_mask=mask).logits  # pixel_values are used, not swallowed
    assert (no_images - logits).abs().max() > 1e-3
    ours = generate(model, seqs, 8)
    for kw in (dict(pixel_values=pixels, mm_token_type_ids=modality), dict(images=pixels, modality=modality)):
        for use_cache in (True, False):
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, use_cache=use_cache, **kw)
            assert out[:, ids.shape[1]:].tolist() == ours, (kw.keys(), use_cache)
    # beams repeat each row with its own images (row 1 has two)
    kw = dict(attention_mask=mask, pixel_values=pixels, mm_token_type_ids=modality, max_new_tokens=6, num_beams=2)
    assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory, bpe_tokenizer_folder):
    """An export trained with a small BPE tokenizer, its tokenizer files copied in as they are (without
    the image tokens training adds), and that tokenizer as training used it."""
    tok = HFTokenizer(bpe_tokenizer_folder)
    model = tiny_vlm(tok.vocab_size)
    folder = save_pretrained(model, tmp_path_factory.mktemp("bpe") / "m", tokenizer=str(bpe_tokenizer_folder))
    transformers.AutoTokenizer.from_pretrained(bpe_tokenizer_folder).save_pretrained(folder)
    return model, folder, tok


def test_auto_processor_lays_out_prompts_as_training_does(bpe_export):
    model, folder, tok = bpe_export
    processor = transformers.AutoProcessor.from_pretrained(folder)
    pictures = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 30, 200))]
    texts = ["<image> two red circles", "how many <image> circles?"]
    inputs = processor(text=texts, images=pictures)
    runner = ModelRunner(model, tok)
    seqs = [runner.sequence([pictures[0], " two red circles"]), runner.sequence(["how many ", pictures[1], " circles?"])]
    T = inputs["input_ids"].shape[1]
    for r, s in enumerate(seqs):  # left padding, then exactly our sequence
        assert inputs["input_ids"][r, T - len(s):].tolist() == s.input_ids
        assert inputs["mm_token_type_ids"][r, T - len(s):].tolist() == s.modality
        assert inputs["attention_mask"][r].sum() == len(s)
    torch.testing.assert_close(inputs["pixel_values"], torch.stack([im for s in seqs for im in s.images]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = hf.generate(**inputs, max_new_tokens=6, eos_token_id=None)
    assert out[:, T:].tolist() == generate(model, seqs, 6)
    assert processor.batch_decode(out[:, T:]) == [tok.decode(ids) for ids in generate(model, seqs, 6)]
    with pytest.raises(ValueError, match="2 <image> markers in the text but 1 images"):
        processor(text=texts, images=pictures[:1])
    # pipeline("text-generation") with the folder's tokenizer: greedy, through the same cache
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=processor.tokenizer)
    text = "two red"
    ids = tok.encode(text)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=None)[0, len(ids):]
    got = pipe(text, max_new_tokens=5, do_sample=False, eos_token_id=None, return_full_text=False)
    assert got[0]["generated_text"] == processor.tokenizer.decode(expected)


REMOTE = """
import sys, importlib.util
sys.path.append(sys.argv[1])  # the environment's packages, without its .pth files (cmoe-vlm's editable install)
assert importlib.util.find_spec("cmoe_vlm") is None, "cmoe_vlm is importable"
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
folder, resaved = sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert sys.modules["cmoe_vlm"].__file__.startswith("<cmoe_vlm_code>"), sys.modules["cmoe_vlm"].__file__
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(text=["<image> two red"], images=[Image.new("RGB", (32, 32), (200, 30, 30))])
out = model.generate(**inputs, max_new_tokens=4, eos_token_id=None)
print(out[0, inputs["input_ids"].shape[1]:].tolist())
model.save_pretrained(resaved)  # from the bundle: writes the same bundle
processor.save_pretrained(resaved)
again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True).eval()
assert torch.equal(again.generate(**inputs, max_new_tokens=4, eos_token_id=None), out)
import shutil
other = shutil.copytree(resaved, resaved + "_other_version")
code = open(other + "/cmoe_vlm_code.py").read().replace("FILES = {", "FILES = {'cmoe_vlm/other.py': ['x = 1'],", 1)
open(other + "/cmoe_vlm_code.py", "w").write(code)  # another version's bundle: its code must not be replaced by ours
modeling = open(other + "/modeling_cmoe_vlm.py").read()
open(other + "/modeling_cmoe_vlm.py", "w").write(modeling.replace('DIGEST = "', 'DIGEST = "another-', 1))
try:
    AutoModelForCausalLM.from_pretrained(other, trust_remote_code=True)
    raise SystemExit("a second bundle loaded with the first one's code")
except ImportError as e:
    assert "load it in a fresh process" in str(e), e
"""


def test_trust_remote_code_loads_an_export_without_cmoe_vlm(bpe_export, tmp_path):
    model, folder, tok = bpe_export
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    resaved = tmp_path / "resaved"
    proc = subprocess.run([sys.executable, "-S", "-c", REMOTE, sysconfig.get_paths()["purelib"], str(folder),
                           str(resaved)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seq = ModelRunner(model, tok).sequence([Image.new("RGB", (32, 32), (200, 30, 30)), " two red"])
    assert proc.stdout.strip().splitlines()[-1] == str(generate(model, [seq], 4)[0])
    for name in ("cmoe_vlm_code.py", "modeling_cmoe_vlm.py"):
        assert (resaved / name).read_text() == (folder / name).read_text()


def test_a_tokenizer_larger_than_the_model_is_a_config_error_naming_both(bpe_tokenizer_folder, tmp_path, capsys):
    """Was: IndexError inside the embedding, after loading and building everything."""
    from cmoe_base import ConfigError
    from cmoe_vlm.cli.eval import main as eval_main

    folder = save_pretrained(tiny_vlm(), tmp_path / "m", tokenizer=str(bpe_tokenizer_folder))  # 262 < 294
    with pytest.raises(ConfigError, match="the tokenizer has 294 ids but the model's vocab_size is 262"):
        ModelRunner.load(folder)
    assert eval_main(["--model", str(folder), "--suite", "none", "--probes", "passkey", "--out", str(tmp_path)]) == 2
    assert "294 ids" in capsys.readouterr().err


def test_an_export_that_does_not_match_its_config_is_refused_and_bad_inputs_are_errors(exported, tmp_path):
    """transformers alone would load these with random or dropped weights (only a LOAD REPORT on stderr);
    `load_pretrained` refuses them, and so does the wrapper."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    _, model, exported = exported
    ids = torch.tensor([[1, 2, 3, 4]])
    for kwargs, named in ((dict(input_ids=ids[:, :0]), "input_ids has shape"),
                          (dict(input_ids=ids + TOK.vocab_size), "vocabulary"),
                          (dict(input_ids=ids, attention_mask=torch.ones(1, 3)), "attention_mask has shape"),
                          (dict(input_ids=ids, labels=ids[:, :2]), "labels has shape")):
        with pytest.raises(ValueError, match=named):
            model(**kwargs)
    dropped = tmp_path / "dropped"
    shutil.copytree(exported, dropped)
    state = load_file(dropped / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "lm.norm.weight"}, dropped / "model.safetensors")
    more = tmp_path / "more_layers"
    shutil.copytree(exported, more)
    meta = json.loads((more / "config.json").read_text())
    meta["vlm"]["model"]["concept_layers"] += 1
    (more / "config.json").write_text(json.dumps(meta))
    for folder in (dropped, more):
        with pytest.raises(ValueError, match="does not match its config"):
            transformers.AutoModelForCausalLM.from_pretrained(folder)

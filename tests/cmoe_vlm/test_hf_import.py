"""Import of transformers MoE checkpoints, conversion of the import, export back (docs/design.md §16).

Every source is a tiny random model built offline from transformers' own config classes, with its
weights perturbed so that biases and norm weights are not at their initial values, and saved with
`save_pretrained` next to a small real BPE tokenizer.
"""
import json
import shutil

import pytest
import torch

from cmoe_base import Batch, ConfigError
from cmoe_vlm.model.boundaries import AllTokens
from cmoe_vlm.cli.convert import main as convert_main
from cmoe_vlm.checkpoints.export import load_pretrained
from cmoe_vlm.inference.generation import generate
from cmoe_vlm.cli.hf_export import main as export_main
from cmoe_vlm.cli.hf_import import main as import_main
from cmoe_vlm.checkpoints.tensor_files import TensorFileError, TensorSource

VOCAB = 416  # the tokenizer has 400 tokens: the embedding is padded, as real checkpoints often are
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=256)
FAMILIES = {  # each exercises the options its family brings
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",  # head_dim apart from hidden/heads, linear RoPE scaling
                dict(num_local_experts=4, intermediate_size=24, head_dim=16,
                     rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",  # q/k/v bias, gated shared expert, tied, no renorm
                  dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",  # per-head q/k norm, all biases, yarn, renorm
                  dict(num_experts=4, moe_intermediate_size=16, head_dim=12, attention_bias=True, norm_topk_prob=True,
                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "rope_theta": 5000.0})),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",  # full q/k norm, clip_qkv, all biases, llama3 RoPE
              dict(num_experts=4, intermediate_size=16, attention_bias=True, clip_qkv=0.6,
                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                    "rope_theta": 10000.0})),
}
TEXT = "The for statement is used to iterate over the elements of a sequence (such as a string)."


def build_source(family: str, folder, tokenizer_folder, shard: str | None = None, **overrides):
    """A random `family` model (fp32) saved with its tokenizer at `folder`; returns the model (eval)."""
    import transformers
    from transformers import AutoTokenizer

    config_name, model_name, extra = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides}, bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id, pad_token_id=None)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(folder)
    return model


def ragged_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 400, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def imported(tmp_path_factory, bpe_tokenizer):
    """family -> (source model, source folder, import folder), built once per module."""
    root = tmp_path_factory.mktemp("hf_import")
    out = {}
    for family in FAMILIES:
        src, dst = root / f"{family}_src", root / f"{family}_import"
        model = build_source(family, src, bpe_tokenizer, shard="40KB" if family == "mixtral" else None)
        assert import_main([str(src), "--out", str(dst)]) == 0
        out[family] = (model, src, dst)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_the_source_logits_tokens_and_tokenizer(imported, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cmoe_vlm.hf  # noqa: F401  registers model_type cmoe_vlm

    source, src, dst = imported[family]
    if family == "mixtral":
        assert (src / "model.safetensors.index.json").is_file()  # a sharded source, read shard by shard
    ours = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids, mask = ragged_batch()
    with torch.no_grad():
        theirs_logits = source(ids, attention_mask=mask).logits
        ours_logits = ours(ids, attention_mask=mask).logits
    diff = (theirs_logits - ours_logits)[mask.bool()].abs().max().item()
    print(f"{family}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4

    tok_src, tok_dst = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(dst)
    assert tok_dst.encode(TEXT) == tok_src.encode(TEXT) and len(tok_dst) == len(tok_src)
    config = json.loads((dst / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok_src.bos_token_id, tok_src.eos_token_id)
    assert config["parts"] == ["lm"] and config["imported_from"]["family"] == family

    prompt = torch.tensor([tok_src.encode(TEXT)[:12]])
    with torch.no_grad():
        want = source.generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1]:].tolist()
        got_hf = ours.generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1]:]  # our ConceptCache
    model, _ = load_pretrained(dst)
    got = generate(model, Batch.of(prompt), max_new_tokens=10, stop_ids=[tok_src.eos_token_id])[0]
    assert got_hf.tolist() == want
    assert got == (want[:-1] if want[-1] == tok_src.eos_token_id else want)  # ours returns no stop token


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_converted_import_reproduces_the_source_at_r1(imported, family, tmp_path):
    """cmoe_vlm.cli.convert takes an import; with every token a boundary the ConceptMoE gives the source's
    logits, and the converted folder keeps the tokenizer, the ids and the LM-only marker."""
    source, _, dst = imported[family]
    assert convert_main(["--baseline", str(dst), "--out", str(tmp_path / "conv"), "--encoder-layers", "1",
                         "--decoder-layers", "1", "--strategy", "none", "--target-ratio", "2"]) == 0
    model, meta = load_pretrained(tmp_path / "conv")
    assert model.cfg.model.chunk.enabled and meta["parts"] == ["lm"]
    assert meta["bos_token_id"] == json.loads((dst / "config.json").read_text())["bos_token_id"]
    ids, mask = ragged_batch()
    with torch.no_grad():
        want = source(ids, attention_mask=mask).logits
        got = model(Batch.of(ids, doc_ids=torch.where(mask.bool(), 0, -1)), boundaries=AllTokens()).logits
    assert (want - got)[mask.bool()].abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_export_back_to_the_family_format(imported, family, tmp_path):
    import transformers

    source, src, dst = imported[family]
    assert export_main([str(dst), "--out", str(tmp_path / "back")]) == 0
    back = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "back").eval()
    ids, mask = ragged_batch()
    with torch.no_grad():
        diff = (source(ids, attention_mask=mask).logits - back(ids, attention_mask=mask).logits).abs().max()
    assert diff.item() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back").encode(TEXT) == \
        transformers.AutoTokenizer.from_pretrained(src).encode(TEXT)


def test_a_baseline_trained_here_exports_to_a_family(tmp_path):
    """A baseline built in Qwen2-MoE's shape (never imported) exports with --family and runs in
    transformers with our logits; a shape the family cannot state is refused naming the field."""
    from transformers import Qwen2MoeForCausalLM

    from cmoe_vlm.model.chunk import ChunkConfig
    from cmoe_vlm.checkpoints.export import save_pretrained
    from cmoe_vlm.model.layers.moe import MoEConfig
    from cmoe_vlm.model.conceptmoe import ModelConfig
    from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig

    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, num_heads=4, num_kv_heads=2, encoder_layers=1, concept_layers=1, decoder_layers=1,
                      attention_bias="qkv", norm_eps=1e-6, chunk=ChunkConfig(enabled=False),
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, shared_expert_hidden=24,
                                    shared_expert_gate=True, norm_topk_prob=False))
    model = ConceptMoEVLM(VLMConfig(model=cfg)).eval()
    with torch.no_grad():
        for p in model.lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_pretrained(model, tmp_path / "ours")
    assert export_main([str(tmp_path / "ours"), "--out", str(tmp_path / "qwen"), "--family", "qwen2_moe"]) == 0
    back = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "qwen").eval()
    ids, mask = ragged_batch()
    ids = ids.clamp_max(255)
    with torch.no_grad():
        want = model(Batch.of(ids, doc_ids=torch.where(mask.bool(), 0, -1))).logits
        got = back(ids, attention_mask=mask).logits
    assert (want - got)[mask.bool()].abs().max().item() <= 1e-5
    assert export_main([str(tmp_path / "ours"), "--out", str(tmp_path / "mixtral"), "--family", "mixtral"]) == 2


def _with_config(src, tmp_path, name, **changes):
    """A copy of the source folder with config.json keys changed."""
    folder = tmp_path / name
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


REFUSALS = [  # (family, config changes, what the one-line error names)
    ("mixtral", dict(sliding_window=64), "sliding_window"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
    ("mixtral", dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    ("mixtral", dict(model_type="llama"), "model_type"),
    ("mixtral", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    ("qwen2_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
    ("qwen2_moe", dict(use_sliding_window=True), "sliding"),
    ("olmoe", dict(auto_map={"AutoModelForCausalLM": "custom.Model"}), "auto_map"),
]


@pytest.mark.parametrize("family,changes,named", REFUSALS, ids=[r[2] for r in REFUSALS])
def test_unsupported_features_are_refused_in_one_line(imported, tmp_path, capsys, family, changes, named):
    folder = _with_config(imported[family][1], tmp_path, "src", **changes)
    assert import_main([str(folder), "--out", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "dst").exists()


def test_pickles_and_stray_tensors_are_refused(imported, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = imported["qwen2_moe"][1]
    folder = _with_config(src, tmp_path, "bin")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert import_main([str(folder), "--out", str(tmp_path / "dst")]) == 2
    assert "pickle" in capsys.readouterr().err
    folder = _with_config(src, tmp_path, "stray")
    state = load_file(folder / "model.safetensors")
    save_file({**state, "model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}, folder / "model.safetensors")
    assert import_main([str(folder), "--out", str(tmp_path / "dst")]) == 2
    assert "o_proj.bias" in capsys.readouterr().err and not (tmp_path / "dst").exists()
    # a tied checkpoint that also stores its LM head (transformers ties it on load) is fine
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, folder / "model.safetensors")
    assert import_main([str(folder), "--out", str(tmp_path / "dst")]) == 0


def test_truncated_safetensors_is_an_error_not_a_crash(imported, tmp_path):
    src = imported["qwen3_moe"][1]
    data = (src / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(TensorFileError, match="truncated"):
        TensorSource.open(tmp_path)


def test_a_vlm_from_an_imported_lm_and_a_vision_tower(bpe_tokenizer, tmp_path):
    """train.init_from an import + a transformers tower (configs/pretrained.yaml): model.vocab_size follows
    the tokenizer (the image tokens and pad it adds grow the 400-row embedding to 404), the new rows and
    the LM head's start as the mean of the trained ones, the source's rows and logits are kept, the tower
    is the pretrained one (the import's placeholder is not used), and a short run trains and exports."""
    from pathlib import Path

    from transformers import AutoTokenizer, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from cmoe_vlm.training.config import check_experiment, load_experiment
    from cmoe_vlm.training.initial_weights import fit_vocab, load_initial_weights
    from cmoe_vlm.training.loop import train
    from cmoe_vlm.model.vlm import ConceptMoEVLM
    from data_pipelines.builtin import write_builtin_dataset

    source = build_source("mixtral", tmp_path / "src", bpe_tokenizer, vocab_size=400)
    assert import_main([str(tmp_path / "src"), "--out", str(tmp_path / "lm")]) == 0
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=3, image_size=32, patch_size=8)).eval()
    tower.save_pretrained(tmp_path / "tower")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "tower")
    data = write_builtin_dataset(tmp_path / "data", num_train=40, num_heldout=4, maxcount=20, text_chars=400)
    overrides = (tmp_path / "lm" / "train_overrides.txt").read_text().split() + [
        f"train.init_from={tmp_path / 'lm'}", f"data.tokenizer={tmp_path / 'lm'}",
        f"vision.model_name={tmp_path / 'tower'}",
        f"data.shards={data['train']}", "data.seq_len=128", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_buffer=10", "train.steps=2", "train.warmup_steps=1", "train.tensorboard=false",
        f"train.out_dir={tmp_path / 'run'}"]
    config = str(Path(__file__).resolve().parents[2] / "configs" / "pretrained.yaml")
    exp = load_experiment(config, overrides)
    assert exp.model.vocab_size == 400
    with pytest.warns(UserWarning, match="model.vocab_size raised from 400 to 404"):
        exp = fit_vocab(exp, check_experiment(exp, 1))
    without_init = load_experiment(config, [o for o in overrides if not o.startswith("train.init_from")])
    with pytest.raises(ConfigError, match=r"model.vocab_size = 400: must be >= the tokenizer's vocabulary \(404"):
        check_experiment(without_init, 1)  # from scratch the size is stated, not raised
    model = ConceptMoEVLM(exp.vlm).eval()
    load_initial_weights(model, str(tmp_path / "lm"))
    for ours, theirs in ((model.lm.embed.weight, source.model.embed_tokens.weight),
                         (model.lm.lm_head.weight, source.lm_head.weight)):
        assert ours.shape == (404, 32) and torch.equal(ours[:400], theirs)
        torch.testing.assert_close(ours[400:], theirs.mean(0).expand(4, -1))
    torch.testing.assert_close(model.vision.vit.model.state_dict(), tower.state_dict())
    ids, mask = ragged_batch()
    with torch.no_grad():
        want = source(ids, attention_mask=mask).logits
        got = model(Batch.of(ids, doc_ids=torch.where(mask.bool(), 0, -1))).logits[..., :400]
    assert (want - got)[mask.bool()].abs().max().item() <= 1e-4

    summary = train(load_experiment(config, overrides))
    assert summary["step"] == 2
    final, meta = load_pretrained(tmp_path / "run" / "final")
    assert final.cfg.model.vocab_size == 404 and "parts" not in meta and final.cfg.vision.backend == "transformers"
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").encode(TEXT) == \
        AutoTokenizer.from_pretrained(tmp_path / "src").encode(TEXT)


def test_the_papers_recipe_is_the_default_conversion(bpe_tokenizer, tmp_path, capsys):
    """`python -m cmoe_vlm.cli.convert --baseline IMPORT --out DIR` alone: 4 encoder + 4 decoder layers, joint
    decoding in the last 4, more active experts in the concept model, the FLOPs table printed, and the
    command to continue with (tokenizer included)."""
    build_source("mixtral", tmp_path / "src", bpe_tokenizer, num_hidden_layers=10)
    assert import_main([str(tmp_path / "src"), "--out", str(tmp_path / "lm")]) == 0
    assert convert_main(["--baseline", str(tmp_path / "lm"), "--out", str(tmp_path / "conv")]) == 0
    printed = capsys.readouterr().out
    cfg = load_pretrained(tmp_path / "conv")[0].cfg.model
    assert (cfg.encoder_layers, cfg.concept_layers, cfg.decoder_layers, cfg.num_joint_layers) == (4, 2, 4, 4)
    assert cfg.concept_moe_cfg.top_k > cfg.moe.top_k and cfg.chunk.target_ratio == 1.5
    assert "FLOPs/tok" in printed and f"data.tokenizer={tmp_path / 'conv'}" in printed


def test_bf16_checkpoints_import_in_their_dtype(bpe_tokenizer, tmp_path):
    """A bf16 checkpoint (as most published ones are) is read and written in bf16, and the import
    computes the logits of those weights (fp32 compute on both sides)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import cmoe_vlm.hf  # noqa: F401

    source = build_source("qwen2_moe", tmp_path / "src", bpe_tokenizer)
    source.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    assert import_main([str(tmp_path / "src"), "--out", str(tmp_path / "lm")]) == 0
    with safe_open(tmp_path / "lm" / "model.safetensors", "pt") as f:
        assert f.get_slice("lm.concept.layers.0.moe.experts.w13").get_dtype() == "BF16"
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float32).eval()
    ids, mask = ragged_batch()
    with torch.no_grad():
        want = source.float()(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert (want - got)[mask.bool()].abs().max().item() <= 1e-4


def _swap_qk(folder):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    state[q], state[k] = state[k].clone(), state[q].clone()  # same total rows: the concatenation fits
    save_file(state, folder / "model.safetensors")


def _nan_weight(folder):
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.gate.weight"][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors")


def _header_without_shape(folder):
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "data_offsets": [0, 4]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)


def _nan_rope_theta(folder):
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {**(config.get("rope_parameters") or {"rope_type": "default"}), "rope_theta": "NaN"}
    (folder / "config.json").write_text(json.dumps(config).replace('"NaN"', "NaN"))


BROKEN_SOURCES = {  # what a source folder gets -> what the one-line refusal names
    "qk_shapes_swapped": (_swap_qk, "q_proj.weight is (16, 32), its config says (32, 32)"),
    "nan_weights": (_nan_weight, "NaN or inf in the checkpoint's model.layers.1.mlp.gate.weight"),
    "header_without_shape": (_header_without_shape, "model.norm.weight: shape and data_offsets"),
    "config_not_json": (lambda f: (f / "config.json").write_text("{'not': json"), "config.json: not a JSON file"),
    "nan_rope_theta": (_nan_rope_theta, "rope_theta"),
}


@pytest.mark.parametrize("case", BROKEN_SOURCES)
def test_sources_transformers_refuses_are_refused_in_one_line(imported, tmp_path, capsys, case):
    folder = _with_config(imported["qwen2_moe"][1], tmp_path, "src")
    change, named = BROKEN_SOURCES[case]
    change(folder)
    assert import_main([str(folder), "--out", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "dst").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging left


def test_import_output_rules_and_a_hub_cache_snapshot(imported, tmp_path, capsys):
    """--out is never the source; a non-empty --out is replaced whole only with --replace (an older
    export's tokenizer and code do not survive); model.safetensors wins over a stale index as in
    transformers; a hub-cache snapshot (files linked into ../../blobs) imports."""
    src = imported["qwen2_moe"][1]
    assert import_main([str(src), "--out", str(src)]) == 2 and "is the input" in capsys.readouterr().err
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer.json").write_text("an older export's tokenizer")
    assert import_main([str(src), "--out", str(dst)]) == 2 and "--replace" in capsys.readouterr().err
    stale = _with_config(src, tmp_path, "stale")
    (stale / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    assert import_main([str(stale), "--out", str(dst), "--replace"]) == 0
    assert json.loads((dst / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert not (tmp_path / "dst").with_name(".dst.staging").exists()
    cache = tmp_path / "hub" / "models--x--tiny"
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, cache / "blobs" / f.name)
        (snapshot / f.name).symlink_to(f"../../blobs/{f.name}")
    assert import_main([str(snapshot), "--out", str(tmp_path / "from_hub")]) == 0

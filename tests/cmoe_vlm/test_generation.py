"""Generation: cached == uncached token for token, variable-length batches, images, one concept-cache
entry per chunk, stop ids, seeded sampling, streaming order, and the latency benchmark's smoke run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmoe_base import Batch
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.inference.generation import generate, generate_text, generate_with_state, prompt_batch, sample_next
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig
from cmoe_vlm.inference.session import InferenceSession
from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import ByteTokenizer
from vision import ProjectorConfig, VisionConfig

TOK = ByteTokenizer()
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def lm_config(enabled=True, **kw) -> ModelConfig:
    chunk = ChunkConfig(enabled=enabled, **kw.pop("chunk", {}))
    base = dict(vocab_size=TOK.vocab_size, dim=32, num_heads=4, encoder_layers=1, concept_layers=2,
                decoder_layers=1, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32), chunk=chunk)
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = {
    "baseline": dict(enabled=False),
    "sum": dict(),
    "last-gqa": dict(chunk=dict(merge="last"), num_kv_heads=2),
    "looped-wide": dict(loop_layers=1, concept_dim=48),
}


def vlm(name="sum", seed=0, **chunk) -> ConceptMoEVLM:
    kw = dict(VARIANTS[name])
    kw["chunk"] = {**kw.get("chunk", {}), **chunk}
    cfg = VLMConfig(model=lm_config(**kw),
                    vision=VisionConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, crop_pct=1.0),
                    projector=ProjectorConfig(reduction=1))  # 16 tokens per image
    torch.manual_seed(seed)
    return ConceptMoEVLM(cfg).double().eval()  # fp64: greedy ties cannot flip between the two paths


def image(seed: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def seq(*pieces):
    return build_sequence(list(pieces), TOK, 16, add_bos=True, add_eos=False)


TEXT_PROMPTS = [seq("hello"), seq("a much longer prompt than the first one, with more words"), seq("x")]
IMAGE_PROMPTS = [seq(image(0), "a red square"), seq("two: ", image(1), " and ", image(2), " done"),
                 seq("caption", image(3))]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prompts", ["text", "image"])
def test_cached_generation_equals_uncached(name, prompts):
    m = vlm(name)
    p = TEXT_PROMPTS if prompts == "text" else IMAGE_PROMPTS
    fast = generate(m, p, 24)
    ref = generate(m, p, 24, use_cache=False)
    assert fast == ref
    assert all(len(t) == 24 for t in fast)
    # each row of a batch generates what it generates alone
    for i, s in enumerate(p):
        assert generate(m, [s], 24) == [fast[i]]


def test_batch_dict_prompts_and_bare_lm():
    m = vlm("sum")
    batch = prompt_batch(m, IMAGE_PROMPTS)
    assert batch.doc_ids[0].tolist().count(-1) == batch.input_ids.shape[1] - len(IMAGE_PROMPTS[0])
    assert generate(m, batch, 8) == generate(m, IMAGE_PROMPTS, 8)
    lm = m.lm  # a bare ConceptMoE takes text prompts
    assert generate(lm, TEXT_PROMPTS, 8) == generate(lm, TEXT_PROMPTS, 8, use_cache=False)
    with pytest.raises(ValueError, match="text-only"):
        generate(lm, IMAGE_PROMPTS, 4)


@pytest.mark.parametrize("name", ["sum", "last-gqa", "looped-wide"])
def test_concept_cache_holds_one_entry_per_chunk(name):
    m = vlm(name)
    out, session = generate_with_state(m, IMAGE_PROMPTS, 20, stop_ids=[7, 11, 13])
    state = session.state
    # a full forward over prompt + output, row by row, gives the chunks
    for i, (s, new) in enumerate(zip(IMAGE_PROMPTS, out)):
        ids = torch.tensor([s.input_ids + new])
        mod = torch.tensor([s.modality + [0] * len(new)])
        imgs = torch.stack(s.images)
        with torch.no_grad():
            res = m(Batch.of(ids, modality=mod, images=imgs))
        chunks = int(res.boundaries.sum())
        assert 1 < chunks < ids.shape[1]
        for cache in state.concept:
            assert int(cache.lengths[i]) == chunks
        for cache in state.encoder + state.decoder:
            assert int(cache.lengths[i]) == ids.shape[1]
        assert int(state.num_tokens[i]) == ids.shape[1]
    # per layer and per unit of width, the concept caches hold 1/R of the token caches' bytes
    b, c = state.cache_bytes(), m.cfg.model
    per_concept = b["concept"] / (len(state.concept) * c.concept_width)
    per_token = b["encoder"] / (len(state.encoder) * c.dim)
    chunks_total = sum(int(cache.lengths.sum()) for cache in state.concept[:1])
    tokens_total = int(state.num_tokens.sum())
    assert per_concept == pytest.approx(per_token * chunks_total / tokens_total)
    assert per_concept < per_token


def test_padded_span_matches_unpadded():
    """A cached span with tail padding leaves exactly the state the unpadded span leaves."""
    torch.manual_seed(0)
    lm = ConceptMoE(lm_config()).double().eval()
    x = torch.randint(0, 256, (2, 30))
    doc = torch.zeros_like(x)
    doc[0, 18:] = -1
    with torch.no_grad():
        st = lm.new_state(2)
        lm.extend(Batch.of(x, doc_ids=doc), st)
        alone = lm.new_state(1)
        lm.extend(Batch.of(x[:1, :18]), alone)
        for a, b in zip(st.encoder + st.concept + st.decoder, alone.encoder + alone.concept + alone.decoder):
            n = int(b.lengths[0])
            assert int(a.lengths[0]) == n
            torch.testing.assert_close(a.k[0, :, :n], b.k[0, :, :n])
        for f in STATE_FIELDS:
            torch.testing.assert_close(f(st)[0], f(alone)[0])
        # and the next token continues identically
        nxt = torch.tensor([[5], [6]])
        ya = lm.extend(Batch.of(nxt), st).logits[0]
        yb = lm.extend(Batch.of(nxt[:1]), alone).logits[0]
        torch.testing.assert_close(ya, yb)
        with pytest.raises(ValueError, match="padding"):
            bad = torch.zeros_like(x)
            bad[0, 3] = -1
            lm.extend(Batch.of(x, doc_ids=bad), lm.new_state(2))


STATE_FIELDS = (lambda s: s.chunk.last_key, lambda s: s.merge.carry, lambda s: s.dechunk.c_bar,
                lambda s: s.num_tokens)  # the per-row state outside the KV caches


@pytest.mark.parametrize("name", ["sum", "last-gqa", "looped-wide", "converted"])
def test_one_token_steps_equal_the_span_path(name):
    """Decoding takes its own one-token path (merge, concept step and EMA step without the span's
    (B, M) bookkeeping). Fed token by token, with rows idle on some steps, it must leave the same
    logits and state as the same tokens fed as one span. Row 0 starts empty (its first step is a
    document start: a forced boundary that resets the EMA), row 1 after a 4-token prompt."""
    kw = dict(VARIANTS.get(name, {}))
    if name == "converted":
        kw = dict(chunk=dict(dechunk_update=True), concept_dim=48, joint_layers=1)
    torch.manual_seed(1)
    lm = ConceptMoE(lm_config(**kw)).double().eval()
    x = torch.randint(0, 256, (2, 24))
    active = torch.rand(2, 24) < 0.7
    with torch.no_grad():
        st_step, st_span = lm.new_state(2), lm.new_state(2)
        prompt = torch.tensor([[-1] * 4, [0] * 4])
        lm.extend(Batch.of(x[:, :4], doc_ids=prompt), st_step)
        lm.extend(Batch.of(x[:, :4], doc_ids=prompt), st_span)
        step_logits = [[], []]
        for t in range(4, 24):
            out = lm.step(x[:, t], st_step, active=active[:, t])
            for r in range(2):
                if active[r, t]:
                    step_logits[r].append(out[r])
        # the span path: each row's active tokens as one padded span
        rows = [x[r, 4:][active[r, 4:]] for r in range(2)]
        n = max(len(r) for r in rows)
        span = torch.zeros(2, n, dtype=torch.long)
        doc = torch.full((2, n), -1)
        for r, ids in enumerate(rows):
            span[r, :len(ids)], doc[r, :len(ids)] = ids, 0
        ref = lm.extend(Batch.of(span, doc_ids=doc), st_span).logits
    for r in range(2):
        torch.testing.assert_close(torch.stack(step_logits[r]), ref[r, :len(rows[r])])
    for f in STATE_FIELDS:
        torch.testing.assert_close(f(st_step), f(st_span))
    for a, b in zip(st_step.concept, st_span.concept):
        assert torch.equal(a.lengths, b.lengths)
        for r in range(2):
            torch.testing.assert_close(a.k[r, :, :int(a.lengths[r])], b.k[r, :, :int(b.lengths[r])])


def test_stop_ids_and_max_new_tokens():
    m = vlm("sum")
    free = generate(m, TEXT_PROMPTS, 16)
    stop = free[1][5]  # the 6th token of row 1
    out = generate(m, TEXT_PROMPTS, 16, stop_ids=[stop])
    for row, ref in zip(out, free):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert row == ref[:cut] and stop not in row
    assert len(out[1]) == 5
    assert generate(m, TEXT_PROMPTS, 16, stop_ids=[stop], use_cache=False) == out
    assert generate(m, TEXT_PROMPTS, 0) == [[], [], []]
    assert generate(m, TEXT_PROMPTS, 1) == [r[:1] for r in free]


def test_sampling_is_reproducible_with_a_seed():
    m = vlm("sum")
    kw = dict(temperature=1.0, top_p=0.9, top_k=50)
    a = generate(m, TEXT_PROMPTS, 16, seed=3, **kw)
    assert a == generate(m, TEXT_PROMPTS, 16, seed=3, **kw)
    assert a != generate(m, TEXT_PROMPTS, 16, seed=4, **kw)
    assert a != generate(m, TEXT_PROMPTS, 16)  # not greedy
    assert a == generate(m, TEXT_PROMPTS, 16, seed=3, use_cache=False, **kw)
    stop = a[0][3]  # rows finishing early do not shift the other rows' samples
    b = generate(m, TEXT_PROMPTS, 16, seed=3, stop_ids=[stop], **kw)
    assert b[1][:len(b[1])] == a[1][:len(b[1])]


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0))
    assert set(sample_next(logits, 1.0, 1.0, 2, u).tolist()) == {2, 3}
    # top_p = 0.5: token 3 alone has 64% of the mass
    assert set(sample_next(logits, 1.0, 0.5, 0, u).tolist()) == {3}
    assert set(sample_next(logits, 1.0, 1.0, 0, u).tolist()) == {0, 1, 2, 3}
    assert sample_next(logits, 0.0, 1.0, 0, None).tolist() == [3] * 200


def test_streaming_callback_order():
    m = vlm("sum")
    seen = []
    out = generate(m, TEXT_PROMPTS, 6, stream=lambda r, t: seen.append((r, t)))
    expected = [(r, out[r][s]) for s in range(6) for r in range(3)]
    assert seen == expected


def test_generate_text_and_prefill_decode_steps():
    m = vlm("sum")
    text = generate_text(m, TOK, ["look: ", image(5), " it is"], max_new_tokens=8)
    assert isinstance(text, str)
    ids = generate(m, [seq("look: ", image(5), " it is")], 8, stop_ids=[TOK.eos_id])[0]
    assert text == TOK.decode(ids)
    # a session's prefill + step are the building blocks: the cache sizes follow the chunks
    batch = prompt_batch(m, TEXT_PROMPTS)
    session = InferenceSession(m)
    logits = session.prefill(batch)
    assert session.num_tokens.tolist() == [len(p) for p in TEXT_PROMPTS]
    logits2 = session.step(logits.argmax(-1))
    assert logits2.shape == (3, TOK.vocab_size)


def test_latency_bench_quick_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_latency.py"), "--quick", "--out", str(tmp_path),
                           "--decode-batch", "2"],
                          capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "latency.json").read_text())
    assert {"prefill", "decode", "kv_bytes_per_token", "configs"} <= set(data)
    assert (tmp_path / "latency.md").exists() and (tmp_path / "latency.png").exists()
    names = {c["name"] for c in data["configs"]}
    assert "baseline" in names and any(n.startswith("same-depth") for n in names)


def test_latency_bench_splits_decode_into_fixed_and_context_parts():
    """Step time t = fixed + slope·L per config: the increments' speedup is the slopes' ratio, and
    the fixed part's speedup is the ratio at the shortest length."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_latency import context_increments
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = []
    for name, fixed, slope, flops_slope in (("baseline", 3.0, 2.0, 8.0), ("cm", 2.0, 1.0, 2.0)):
        for n in (1, 4, 16):
            rows.append({"config": name, "length": n, "median_s": fixed + slope * n,
                         "predicted_flops": 10.0 + flops_slope * n,
                         "predicted_speedup": (10.0 + 8.0 * n) / (10.0 + flops_slope * n)})
    inc = context_increments(rows)
    assert [(r["config"], r["length"]) for r in inc] == [("cm", 4), ("cm", 16)]
    for r in inc:
        assert r["speedup"] == pytest.approx(2.0)
        assert r["predicted_speedup"] == pytest.approx(4.0)
        assert r["fraction_of_prediction"] == pytest.approx(0.5)
        assert r["fixed_speedup"] == pytest.approx(5.0 / 3.0)


def test_prefill_speedup_script_on_exports(tmp_path):
    """bench/prefill_speedup.py on two exports: the reference's speedup is 1, a baseline's ratio is
    1, and a chunked model reports the ratio its own boundaries give on that text."""
    from cmoe_vlm.checkpoints.export import save_pretrained
    from cmoe_vlm.training.config import load_experiment

    small = ["model.dim=32", "model.moe.expert_hidden=32", "vision.depth=1"]
    folders = []
    for name, extra in (("base", ["model.chunk.enabled=false"]), ("cmoe", [])):
        torch.manual_seed(0)
        folders.append(str(save_pretrained(ConceptMoEVLM(load_experiment(ROOT / "configs/tiny.yaml", small + extra).vlm),
                                           tmp_path / name)))
    out = tmp_path / "prefill.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_speedup.py"), "--model", folders[0],
                           "--model", folders[1], "--length", "300", "--reps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["model"]).name: r for r in json.loads(out.read_text())["rows"]}
    assert rows["base"]["speedup"] == 1.0 and rows["base"]["ratio"] == 1.0
    assert 1.0 < rows["cmoe"]["ratio"] < 300 and rows["cmoe"]["median_s"] > 0


@pytest.mark.parametrize("enabled", [True, False])
def test_prefill_computes_the_last_tokens_logits_only(enabled):
    """`InferenceSession.prefill` runs the LM head on each row's last prompt token only (`last_only`):
    the same logits as the full span's at those tokens (the reference), ragged rows included."""
    torch.manual_seed(0)
    model = ConceptMoE(lm_config(enabled)).eval()
    ids = torch.randint(0, 256, (3, 12))
    doc_ids = torch.zeros_like(ids)
    doc_ids[1, 7:] = -1
    doc_ids[2, 3:] = -1
    batch = Batch.of(ids, doc_ids=doc_ids)
    got = InferenceSession(model).prefill(batch)
    with torch.inference_mode():
        full = model.extend(batch, model.new_state(3)).logits
    want = full[torch.arange(3), torch.tensor([11, 6, 2])]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

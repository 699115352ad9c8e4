import pytest
import torch

from cmoe_base import Batch, DocumentLayout, Modality
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.layers.rope import RopeScaling
from cmoe_vlm.model.conceptmoe import ConceptMoE, ModelConfig
from cmoe_vlm.objective import Objective, RatioController


def tiny(enabled=True, **kw) -> ModelConfig:
    chunk = ChunkConfig(enabled=enabled, **kw.pop("chunk", {}))
    base = dict(vocab_size=64, dim=32, num_heads=4, encoder_layers=1, concept_layers=2, decoder_layers=2,
                moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32), chunk=chunk)
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = {
    "baseline": tiny(False),
    "conceptmoe": tiny(),
    "last-merge-gqa": tiny(chunk=dict(merge="last"), num_kv_heads=2),
    "looped-wide": tiny(loop_layers=1, concept_dim=48, joint_layers=1,
                        concept_moe=MoEConfig(num_experts=4, top_k=3, expert_hidden=32)),
    # the layer options imported families bring (docs/design.md §16), all at once
    "imported-options": tiny(num_kv_heads=2, head_dim=12, attention_bias="all", qk_norm="full", clip_qkv=2.0,
                             norm_eps=1e-5, rope_scaling=RopeScaling("yarn", 4.0, 16),
                             moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, shared_expert_hidden=16,
                                           shared_expert_gate=True, norm_topk_prob=False)),
}


def model_for(name, seed=0):
    torch.manual_seed(seed)
    return ConceptMoE(VARIANTS[name]).eval()


def packed_docs(B=2, T=48):
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 20:] = 1
    doc[0, 35:] = 2
    doc[1, 40:] = -1
    return doc


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_causality(name, packed, training):
    """Changing tokens after position t changes no logit at positions <= t."""
    m = model_for(name).train(training)
    T = 48
    x = torch.randint(0, 64, (2, T))
    doc = packed_docs(T=T) if packed else None
    for t in (0, 7, 21, 36):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, 64, (2, T - t - 1))
        torch.manual_seed(1)  # same boundary samples in training mode
        a = m(Batch.of(x, doc_ids=doc)).logits
        torch.manual_seed(1)
        b = m(Batch.of(y, doc_ids=doc)).logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_attention_across_packed_documents(name):
    m = model_for(name)
    x = torch.randint(0, 64, (2, 48))
    doc = packed_docs()
    y = x.clone()
    y[0, :20] = torch.randint(0, 64, (20,))  # change document 0 of row 0 only
    a, b = m(Batch.of(x, doc_ids=doc)).logits, m(Batch.of(y, doc_ids=doc)).logits
    torch.testing.assert_close(a[0, 20:], b[0, 20:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
    # a packed document behaves exactly as the same document alone at the start of a row
    alone = m(Batch.of(x[:1, 20:35])).logits
    torch.testing.assert_close(a[0, 20:35], alone[0], atol=1e-5, rtol=1e-5)


def test_document_positions():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    layout = DocumentLayout.from_doc_ids(doc)
    assert layout.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert layout.starts.tolist() == [[True, False, False, True, False, True, True, False]]
    assert layout.lengths == ((3, 2, 1),) and not layout.single_document
    assert torch.equal(DocumentLayout.from_lengths([[3, 2, 1]], 8).doc_ids, doc)
    with pytest.raises(ValueError, match="back to back"):
        DocumentLayout.from_doc_ids(torch.tensor([[0, 0, -1, 0]]))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_matches_full_forward(name):
    m = model_for(name)
    x = torch.randint(0, 64, (3, 40))
    with torch.no_grad():
        full = m(Batch.of(x)).logits
        for prefill in (1, 17):
            state = m.new_state(3)
            outs = [m.extend(Batch.of(x[:, :prefill]), state).logits]
            outs += [m.step(x[:, t], state)[:, None] for t in range(prefill, 40)]
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)
        # variable-size continuation spans
        state = m.new_state(3)
        outs = [m.extend(Batch.of(x[:, a:b]), state).logits for a, b in [(0, 5), (5, 6), (6, 30), (30, 40)]]
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["conceptmoe", "looped-wide"])
def test_concept_cache_holds_one_entry_per_chunk(name):
    m = model_for(name)
    x = torch.randint(0, 64, (3, 50))
    with torch.no_grad():
        full = m(Batch.of(x))
        state = m.new_state(3)
        m.extend(Batch.of(x[:, :10]), state)
        for t in range(10, 50):
            m.step(x[:, t], state)
    chunks = full.boundaries.sum(1)
    assert (chunks < 50).all() and (chunks > 1).all()
    for cache in state.concept:
        assert torch.equal(cache.lengths, chunks)
    assert torch.equal(state.encoder[0].lengths, torch.full((3,), 50))
    b = state.cache_bytes()
    assert b["concept"] < b["decoder"]


def test_baseline_has_no_chunking_parts_and_ratio_one():
    base, cm = ConceptMoE(VARIANTS["baseline"]), ConceptMoE(VARIANTS["conceptmoe"])
    assert base.chunk is None and base.dechunk is None
    assert not any(".joint." in n for n, _ in base.named_parameters())
    assert sum(n.endswith("joint.proj.weight") for n, _ in cm.named_parameters()) == 2  # all decoder layers joint
    x = torch.randint(0, 64, (2, 16))
    batch = Batch.of(x, labels=x)
    out = base(batch)
    losses = Objective(base.cfg)(out, batch)
    assert out.compression["all"].ratio == 1.0 and losses.ratio.item() == 0.0
    assert losses.total.item() == pytest.approx(losses.lm.item() + 0.01 * losses.balance.item(), rel=1e-5)


def test_losses_and_backward():
    m = model_for("conceptmoe").train()
    x = torch.randint(0, 64, (2, 48))
    labels = x.roll(-1, 1)
    labels[:, -1] = -100
    batch = Batch.of(x, doc_ids=packed_docs(), labels=labels)
    out = m(batch)
    losses = Objective(m.cfg)(out, batch)
    losses.total.backward()
    assert losses.ratio.item() >= 1.0 - 1e-4  # its minimum is 1
    assert m.chunk.q_proj.weight.grad is not None and m.chunk.q_proj.weight.grad.abs().sum() > 0
    assert len(out.tokens_per_expert) == 1 + 2 + 2
    stats = out.compression
    assert int(stats["all"].tokens) == 88 and int(stats["text"].tokens) == 88 and int(stats["image"].tokens) == 0


def test_ratio_integral_accumulates_the_rate_error_and_adds_mu_times_mean_p():
    from cmoe_vlm.objective import ratio_loss

    torch.manual_seed(0)
    eta = 0.5
    cfg = tiny(chunk=dict(ratio_mode="per_modality", text_ratio=2.0, image_ratio=3.0, ratio_integral=eta))
    model = ConceptMoE(cfg).train()
    x = torch.randint(0, 64, (2, 40))
    modality = torch.zeros_like(x)
    modality[:, 10:26] = Modality.IMAGE
    labels = torch.randint(0, 64, x.shape)
    assert RatioController.of(tiny()) is None  # chunk.ratio_integral = 0: no controller
    controller = RatioController.of(cfg)  # the training loop's state, not the model's
    assert controller.mu.tolist() == [0.0, 0.0] and "ratio_mu" not in model.state_dict()
    mu = torch.tensor([0.3, -0.2])
    controller.load_state_dict({"mu": mu.tolist()})

    batch = Batch.of(x, modality=modality, labels=labels)
    out = model(batch)
    losses = Objective(cfg, controller)(out, batch)
    controller.update(out.own_boundaries, batch)
    p, b = out.boundary_probs, out.boundaries
    sets = {"text": modality == Modality.TEXT, "image": modality == Modality.IMAGE}
    targets = {"text": 2.0, "image": 3.0}
    paper = sum(ratio_loss(p, b, targets[k], sets[k]) for k in sets)
    extra = sum(mu[i] * p[sets[k]].mean() for i, k in enumerate(sets))
    torch.testing.assert_close(losses.ratio, paper + extra)
    want = mu + eta * torch.tensor([targets[k] * b[sets[k]].float().mean() - 1 for k in sets])
    torch.testing.assert_close(controller.mu, want)

    losses.total.backward()  # the μ·G term reaches the chunk projections
    assert model.chunk.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        Objective(cfg, controller)(model(batch), batch)
    torch.testing.assert_close(controller.mu, want)  # evaluation (a loss without an update) leaves it alone


def test_force_all_boundaries_moved_to_a_boundary_policy():
    """Configs written before the boundary policies carry chunk.force_all_boundaries: false (every
    export does); it loads as the default. True asks for what is now AllTokens(): a clear error."""
    from cmoe_vlm.config import ConfigError, from_dict

    assert from_dict(ModelConfig, {"chunk": {"force_all_boundaries": False}}).chunk == ChunkConfig()
    with pytest.raises(ConfigError, match=r"model.chunk.force_all_boundaries = True: .*AllTokens\(\)"):
        from_dict(ModelConfig, {"chunk": {"force_all_boundaries": True}}, prefix="model")


def test_max_seq_len_is_enforced_per_document():
    """A document past max_seq_len is an error naming the field (RoPE would extrapolate silently);
    a packed row longer than it is fine while each document fits; decoding stops at it too."""
    m = ConceptMoE(tiny(max_seq_len=24)).eval()
    x = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_seq_len = 24"):
            m(Batch.of(x[:, :25]))
        m(Batch.of(x, doc_ids=torch.tensor([[0] * 20 + [1] * 20])))  # two documents of 20
        state = m.new_state(1)
        m.extend(Batch.of(x[:, :20]), state)
        for t in range(20, 24):
            m.step(x[:, t], state)
        with pytest.raises(ValueError, match="max_seq_len = 24"):
            m.step(x[:, 24], state)
        state = m.new_state(2)  # rows at different lengths: the exact lengths decide
        m.extend(Batch.of(x[:, :20].expand(2, -1).contiguous(), doc_ids=torch.tensor([[0] * 20, [0] * 4 + [-1] * 16])),
                 state)
        for _ in range(4):
            m.step(x[:, 0].expand(2), state, active=torch.tensor([False, True]))
        assert state.num_tokens.tolist() == [20, 8] and state.max_tokens <= 24
        with pytest.raises(ValueError, match="max_seq_len"):
            m.extend(Batch.of(x[:, :5].expand(2, -1).contiguous()), state)

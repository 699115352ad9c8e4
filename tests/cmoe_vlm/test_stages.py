"""Each stage's ways through agree: `forward` over a whole span, `extend` over the same span cut into
pieces (with the stage's own decoding state carried between them), and one token (or one concept) at a
time: `step` where the stage has one (merge, concept model, dechunk), a one-token `extend` where it has
not (chunk module). fp64, so equality holds to rounding. The end-to-end versions (cached model ==
uncached model) are in test_model.py and test_generation.py."""
import pytest
import torch

from cmoe_base import DocumentLayout, Modality
from cmoe_vlm.model.boundaries import AllTokens, ExternalMask, FixedStride, Learned
from cmoe_vlm.model.chunk import Boundaries, ChunkConfig, ChunkModule, forced_boundaries
from cmoe_vlm.model.concept_model import ConceptModel
from cmoe_vlm.model.conceptmoe import ModelConfig
from cmoe_vlm.model.dechunk import DechunkModule
from cmoe_vlm.model.layers.attention import AttentionLayout
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.merge import MERGE_RULES, Concepts

B, T, D = 3, 21, 8
SPANS = ((0, 6), (6, 7), (7, 15), (15, T))
F64 = dict(device="cpu", dtype=torch.float64)


def rows_with_an_image():
    """Modality (B, T) with an image run in each row at a different place, and the first token of
    each row a document start."""
    modality = torch.zeros(B, T, dtype=torch.long)
    for r in range(B):
        modality[r, 4 + 3 * r: 9 + 3 * r] = Modality.IMAGE
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 0] = True
    return modality, starts


def span_layout(a: int, b: int, starts: torch.Tensor) -> DocumentLayout:
    """Tokens a..b of rows holding one document each, at their absolute positions."""
    positions = torch.arange(a, b).expand(B, b - a)
    return DocumentLayout(torch.zeros(B, b - a, dtype=torch.long), ((b - a,),) * B, starts[:, a:b], positions)


def test_chunk_module_forward_and_extend_agree_in_spans_and_one_token_at_a_time():
    torch.manual_seed(0)
    cm = ChunkModule(D, ChunkConfig()).double().eval()
    h = torch.randn(B, T, D, dtype=torch.float64)
    modality, starts = rows_with_an_image()
    forced = forced_boundaries(starts, modality)  # of the whole rows: what a span holding whole images gives
    full = cm(h, forced)
    assert full.forced[:, 0].all() and 0 < int(full.b.sum()) < B * T

    state = cm.new_state(B, **F64)
    parts = [cm.extend(h[:, a:b], forced[:, a:b], b - a, state) for a, b in SPANS]
    stepped = cm.new_state(B, **F64)  # decoding: one-token spans
    steps = [cm.extend(h[:, t:t + 1], forced[:, t:t + 1], 1, stepped).at(0) for t in range(T)]
    for got in (Boundaries(*(torch.cat([getattr(x, f) for x in parts], 1) for f in ("p", "b", "forced"))),
                Boundaries(*(torch.stack([getattr(x, f) for x in steps], 1) for f in ("p", "b", "forced")))):
        torch.testing.assert_close(got.p, full.p)
        assert torch.equal(got.b, full.b) and torch.equal(got.forced, full.forced)
    torch.testing.assert_close(state.last_key, stepped.last_key)
    # rows idle on some steps (active False) keep their state: each row's tokens, fed whenever it is active
    idle = cm.new_state(B, **F64)
    fed, got = torch.zeros(B, dtype=torch.long), [[] for _ in range(B)]
    g = torch.Generator().manual_seed(5)
    while int(fed.min()) < T:
        active = (torch.rand(B, generator=g) < 0.6) & (fed < T)
        t = fed.clamp_max(T - 1)
        r_ = torch.arange(B)
        out = cm.extend(h[r_, t][:, None], forced[r_, t][:, None], active.long(), idle).at(0)
        for r in active.nonzero().squeeze(1).tolist():
            got[r].append((out.p[r], out.b[r]))
        fed += active.long()
    for r in range(B):
        torch.testing.assert_close(torch.stack([p for p, _ in got[r]]), full.p[r])
        assert torch.equal(torch.stack([b for _, b in got[r]]), full.b[r])


@pytest.mark.parametrize("rule", list(MERGE_RULES))
def test_merger_forward_extend_step_agree(rule):
    torch.manual_seed(1)
    merger = MERGE_RULES[rule]()
    h = torch.randn(B, T, D, dtype=torch.float64)
    modality, starts = rows_with_an_image()
    forced = forced_boundaries(starts, modality)
    b = (torch.rand(B, T) < 0.3) | forced
    b[:, -1] = False  # an open tail at the end
    bnd = Boundaries(torch.rand(B, T, dtype=torch.float64), b, forced)
    full = merger(h, bnd, span_layout(0, T, starts))
    want = [full.x[r, :int(full.counts[r])] for r in range(B)]

    state = merger.new_state(B, D, **F64)
    got = [[] for _ in range(B)]
    for a, e in SPANS:
        part = Boundaries(bnd.p[:, a:e], b[:, a:e], forced[:, a:e])
        c = merger.extend(h[:, a:e], part, span_layout(a, e, starts), state)
        for r in range(B):
            got[r].append(c.x[r, :int(c.counts[r])])
    stepped = merger.new_state(B, D, **F64)
    by_step = [[] for _ in range(B)]
    for t in range(T):
        x = merger.step(h[:, t], b[:, t], stepped)
        for r in range(B):
            if b[r, t]:
                by_step[r].append(x[r])
    for r in range(B):
        torch.testing.assert_close(torch.cat(got[r]), want[r])
        torch.testing.assert_close(torch.stack(by_step[r]), want[r])
    torch.testing.assert_close(state.carry, stepped.carry)  # the open tail (sum) or nothing (last)
    torch.testing.assert_close(state.carry, full.tail)


def test_concept_model_forward_extend_step_agree():
    """Looped, wider concept model: concepts fed as spans, then one at a time with rows closing
    concepts on different steps, give the forward's outputs and grow each row's caches by its own count."""
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=32, dim=16, num_heads=2, encoder_layers=1, concept_layers=2, decoder_layers=1,
                      loop_layers=1, concept_dim=24, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    cm = ConceptModel(cfg).double().eval()
    M = 12
    x = torch.randn(B, M, 16, dtype=torch.float64)
    positions = torch.sort(torch.randperm(40)[:M]).values.expand(B, M)  # concepts at their tokens' positions
    starts = torch.zeros(B, M, dtype=torch.bool)
    starts[:, 0] = True
    with torch.no_grad():
        layout = DocumentLayout(torch.zeros(B, M, dtype=torch.long), ((M,),) * B, starts, positions)
        full, _ = cm(x, positions, AttentionLayout.of(layout))
        caches = cm.new_state(B, **F64)
        spans = torch.cat([cm.extend(x[:, a:b], positions[:, a:b], b - a, caches) for a, b in ((0, 4), (4, 5), (5, M))], 1)
        torch.testing.assert_close(spans, full)
        caches = cm.new_state(B, **F64)
        fed = torch.zeros(B, dtype=torch.long)
        got = [[] for _ in range(B)]
        g = torch.Generator().manual_seed(3)
        while int(fed.min()) < M:
            closes = (torch.rand(B, generator=g) < 0.6) & (fed < M)
            idx = fed.clamp_max(M - 1)
            y = cm.step(x[torch.arange(B), idx], positions[torch.arange(B), idx], closes, caches)
            for r in closes.nonzero().squeeze(1).tolist():
                got[r].append(y[r])
            fed += closes.long()
        for r in range(B):
            torch.testing.assert_close(torch.stack(got[r]), full[r])
        assert all(c.lengths.tolist() == [M] * B for c in caches)


def test_dechunk_forward_extend_step_agree():
    torch.manual_seed(4)
    dechunk = DechunkModule()
    M = 15
    c_hat = torch.randn(B, M, D, dtype=torch.float64)
    p = torch.rand(B, M, dtype=torch.float64)
    p[:, [0, 7]] = 1.0  # forced boundaries (the document start, one inside): the EMA restarts there
    starts = torch.zeros(B, M, dtype=torch.bool)
    starts[:, 0] = True

    def concepts(a, b):  # one token per concept
        layout = DocumentLayout(torch.zeros(B, b - a, dtype=torch.long), ((b - a,),) * B, starts[:, a:b],
                                torch.arange(a, b).expand(B, b - a))
        return Concepts(x=c_hat[:, a:b], layout=layout, p=p[:, a:b], counts=torch.full((B,), b - a),
                        token_index=torch.arange(b - a).expand(B, b - a), tail=torch.zeros(B, D, dtype=torch.float64))

    full = dechunk(c_hat, concepts(0, M))
    state = dechunk.new_state(B, D, **F64)
    spans = torch.cat([dechunk.extend(c_hat[:, a:b], concepts(a, b), state) for a, b in ((0, 5), (5, 6), (6, M))], 1)
    torch.testing.assert_close(spans, full)
    stepped = dechunk.new_state(B, D, **F64)
    closes = torch.ones(B, dtype=torch.bool)
    steps = torch.stack([dechunk.step(c_hat[:, m], p[:, m], closes, stepped) for m in range(M)], 1)
    torch.testing.assert_close(steps, full)
    torch.testing.assert_close(full[:, [0, 7]], c_hat[:, [0, 7]])  # exactly ĉ at a reset, not 1 − 1e−4 of it
    torch.testing.assert_close(state.c_bar, stepped.c_bar)


def test_boundary_policies():
    own = Boundaries(p=torch.full((2, 7), 0.3), b=torch.zeros(2, 7, dtype=torch.bool),
                     forced=torch.zeros(2, 7, dtype=torch.bool))
    own.b[:, 0] = own.forced[:, 0] = True
    pos = torch.arange(7).expand(2, 7)
    valid = torch.ones(2, 7, dtype=torch.bool)
    assert Learned()(own, pos, valid) is own
    every = AllTokens()(own, pos, valid)
    assert every.b.all() and (every.p == 1).all()
    stride = FixedStride(2.0)(own, pos, valid)
    assert stride.b[0].tolist() == [True, False, True, False, True, False, True] and torch.equal(stride.p, own.p)
    long = Boundaries(p=torch.rand(2, 30), b=torch.zeros(2, 30, dtype=torch.bool), forced=torch.zeros(2, 30, dtype=torch.bool))
    assert int(FixedStride(1.5)(long, torch.arange(30).expand(2, 30), valid).b[0].sum()) == 20  # ⌈30/1.5⌉
    one = Boundaries(p=own.p[:, 3], b=own.b[:, 3], forced=own.forced[:, 3])  # a decoding step: shapes (B,)
    assert FixedStride(3.0)(one, torch.tensor([3, 4]), valid[:, 0]).b.tolist() == [True, False]
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 4] = True
    ext = ExternalMask(mask)(own, pos, valid)
    assert ext.b[0].tolist() == [True, False, False, False, True, False, False]
    with pytest.raises(ValueError, match="does not match"):
        ExternalMask(mask[:, :3])(own, pos, valid)

import warnings

import pytest
import torch

from cmoe_base import DocumentLayout
from cmoe_vlm.model.chunk import Boundaries, ChunkConfig, ChunkModule, forced_boundaries, sharpen
from cmoe_vlm.model.compression import ModalityStats
from cmoe_vlm.model.merge import MERGE_RULES
from cmoe_vlm.objective import ratio_loss
from cmoe_vlm.training.collapse import ChunkingCollapseWarning, CollapseMonitor


@pytest.mark.parametrize("R", [1.5, 2.0, 4.0])
def test_ratio_loss_is_minimal_at_target(R):
    def loss_at(rate):
        n = 1000
        b = torch.zeros(n, dtype=torch.bool)
        b[: int(round(rate * n))] = True
        return ratio_loss(torch.full((n,), rate), b, R).item()
    rates = [1 / R * f for f in (0.5, 0.8, 1.0, 1.25)] + [0.99]
    losses = [loss_at(r) for r in rates]
    assert losses[2] == pytest.approx(1.0, abs=1e-3)
    assert min(losses) == losses[2]


@pytest.mark.parametrize("f,sign", [(0.2, 1), (0.8, -1)])
def test_ratio_loss_gradient_moves_rate_toward_target(f, sign):
    # target R=2 -> rate 0.5. Too few boundaries (F=0.2): gradient descent must raise p (dL/dG < 0),
    # too many (F=0.8): lower p.
    p = torch.full((100,), f, requires_grad=True)
    b = torch.arange(100) < int(f * 100)
    ratio_loss(p, b, 2.0).backward()
    assert torch.sign(-p.grad.mean()).item() == sign


def test_ratio_loss_respects_mask_and_skips_empty_sets():
    p = torch.tensor([0.9, 0.1, 0.5])
    b = torch.tensor([True, False, True])
    m = torch.tensor([True, True, False])
    assert ratio_loss(p, b, 2.0, m).item() == pytest.approx(ratio_loss(p[:2], b[:2], 2.0).item())
    assert ratio_loss(p, b, 2.0, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_sharpen():
    p = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0])
    s = sharpen(p, 6.0)
    assert s[0] == 0 and s[-1] == 1 and s[2].item() == pytest.approx(1 - 0.5 ** (1 / 6))
    assert s[1] < 0.3 and s[3] > 0.7


def slow_merge(h, b, doc_ids, merge):
    """Reference: walk the tokens of each row, closing a concept at every boundary."""
    out = []
    for r in range(h.shape[0]):
        concepts, acc, acc_key = [], torch.zeros_like(h[r, 0]), None
        for n in range(h.shape[1]):
            key = int(doc_ids[r, n])
            if acc_key is not None and key != acc_key:
                acc = torch.zeros_like(acc)  # an unclosed tail of another document joins no concept
            acc_key = key
            acc = acc + h[r, n]
            if b[r, n]:
                concepts.append(acc if merge == "sum" else h[r, n])
                acc = torch.zeros_like(acc)
        out.append(concepts)
    return out


@pytest.mark.parametrize("merge", ["sum", "last"])
def test_merge_matches_slow_reference_with_documents(merge):
    torch.manual_seed(0)
    B, T, d = 3, 40, 4
    h = torch.randn(B, T, d)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[1, 15:] = 1
    doc_ids[1, 30:] = 2
    doc_ids[2, 35:] = -1
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    b = (torch.rand(B, T) < 0.3) | starts
    b[1, 14] = False  # doc 0 of row 1 ends with an unclosed tail
    modality = torch.zeros(B, T, dtype=torch.long)
    modality[0, 10:18] = 1  # an image inside row 0: the runs before and in it end in forced boundaries
    b |= forced_boundaries(starts, modality)
    p = torch.rand(B, T)
    pos = torch.arange(T).expand(B, T)
    tokens = DocumentLayout(doc_ids, DocumentLayout.from_doc_ids(doc_ids).lengths, starts, pos)
    c = MERGE_RULES[merge]()(h, Boundaries(p, b, forced=starts), tokens)
    ref = slow_merge(h, b, doc_ids, merge)
    for r in range(B):
        n = len(ref[r])
        assert c.counts[r] == n
        torch.testing.assert_close(c.x[r, :n], torch.stack(ref[r]))
        bt = b[r].nonzero().squeeze(1)
        assert torch.equal(c.layout.positions[r, :n], pos[r, bt]) and torch.equal(c.p[r, :n], p[r, bt])
        assert torch.equal(c.layout.doc_ids[r, :n], doc_ids[r, bt]) and (c.layout.doc_ids[r, n:] == -1).all()
        assert torch.equal(c.layout.starts[r, :n], starts[r, bt])
        assert torch.equal(c.token_index[r], b[r].long().cumsum(0) - 1)
        # the host lengths of the concept-level layout: concepts per document
        docs = doc_ids[r, bt]
        assert list(c.layout.lengths[r]) == [int((docs == d).sum()) for d in range(len(tokens.lengths[r]))]
    if merge == "sum":  # row 0 (one document, an image inside): every token up to its last boundary is in a concept
        last = int(b[0].nonzero().max())
        torch.testing.assert_close(c.x[0, :int(c.counts[0])].sum(0), h[0, :last + 1].sum(0))
        image_concepts = modality[0, b[0].nonzero().squeeze(1)] == 1
        torch.testing.assert_close(c.x[0, :int(c.counts[0])][image_concepts].sum(0), h[0, 10:18].sum(0))


def test_chunk_module_forces_document_starts_and_modality_run_ends():
    torch.manual_seed(0)
    cm = ChunkModule(8, ChunkConfig(init="identity")).eval()
    h = torch.randn(1, 1, 8).expand(1, 12, 8).contiguous()  # identical tokens: cos = 1, p = 0
    starts = torch.zeros(1, 12, dtype=torch.bool)
    starts[0, [0, 9]] = True
    modality = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    out = cm(h, forced_boundaries(starts, modality))
    # the last token of each run before a switch closes it (2: text before the image; 6: the image's last)
    assert out.b[0].nonzero().squeeze(1).tolist() == [0, 2, 6, 9]
    assert out.p[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_training_samples_boundaries_and_eval_thresholds():
    torch.manual_seed(0)
    cm = ChunkModule(16, ChunkConfig())
    h = torch.randn(4, 256, 16)
    starts = torch.zeros(4, 256, dtype=torch.bool)
    starts[:, 0] = True
    mod = torch.zeros(4, 256, dtype=torch.long)
    cm.eval()
    e = cm(h, starts)
    assert torch.equal(e.b, (e.p >= 0.5) | starts)
    cm.train()
    t = cm(h, starts)
    assert torch.equal(t.p, e.p)
    flipped = (t.b != e.b).float().mean().item()
    assert 0.0 < flipped < 0.25  # sampling from sharpened p flips a few percent


def test_2d_image_chunking_uses_patch_above_and_stays_causal():
    torch.manual_seed(0)
    cm = ChunkModule(8, ChunkConfig(image_chunking="2d")).eval()
    T = 10  # text, img_start, 2x3 image patches, img_end, text
    h = torch.randn(1, T, 8, requires_grad=True)
    modality = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0]])
    above = torch.full((1, T), -1)
    above[0, 5:8] = torch.arange(2, 5)
    starts = torch.zeros(1, T, dtype=torch.bool)
    starts[0, 0] = True
    p2d = cm(h, starts, above_index=above).p  # the scores alone: only the document start forced
    p1d = ChunkModule(8, ChunkConfig()).eval()
    p1d.load_state_dict(cm.state_dict())
    p_r = p1d(h, starts).p
    assert (p2d >= p_r - 1e-7).all() and (p2d[0, 5:8] > p_r[0, 5:8]).any()
    assert torch.equal(p2d[0, :5], p_r[0, :5])
    # causality: the score of position n depends only on tokens <= n
    for n in range(T):
        g, = torch.autograd.grad(p2d[0, n], h, retain_graph=True)
        assert g[0, n + 1:].abs().sum() == 0


def test_collapse_monitor_warns_once_and_reports_windowed_ratio():
    mon = CollapseMonitor({"all": 2.0}, window=3)
    ok = ModalityStats(torch.tensor(100), torch.tensor(50), torch.tensor(50.0))
    collapsed = ModalityStats(torch.tensor(100), torch.tensor(100), torch.tensor(100.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert mon.update({"all": ok})["all"] == pytest.approx(2.0)
    with pytest.warns(ChunkingCollapseWarning, match="every token is a boundary"):
        for _ in range(3):
            mon.update({"all": collapsed})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.update({"all": collapsed})  # already reported
    none_left = ModalityStats(torch.tensor(100), torch.tensor(2), torch.tensor(2.0))
    with pytest.warns(ChunkingCollapseWarning, match="almost no boundaries"):
        for _ in range(3):
            mon.update({"all": none_left})

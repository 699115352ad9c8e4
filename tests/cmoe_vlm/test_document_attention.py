"""Document-causal attention without a (T, T) mask equals the dense-mask reference: the CPU bucket
kernel (forward and backward) and the FlexAttention block mask (forward; CPU flex has no backward),
on unequal documents, padding, one-token documents, GQA, and inside the model at the concept level,
whose documents have data-dependent lengths."""
import pytest
import torch
import torch.nn.functional as F

from cmoe_base import Batch, DocumentLayout
from cmoe_vlm.model.layers import document_attention
from cmoe_vlm.model.layers.document_attention import AttentionLayout, SegmentBuckets, bucket_length
from cmoe_vlm.model.conceptmoe import ConceptMoE
from cmoe_vlm.objective import Objective

from .test_model import VARIANTS, packed_docs

ROWS = {
    "unequal": ([[5, 17, 3, 1, 40], [66]], 66),
    "padding": ([[10, 20], [1], [30, 7]], 50),
    "one-token documents": ([[1] * 9 + [20], [1, 1, 2, 1]], 29),
    "long and short": ([[300, 2, 600, 1], [903]], 903),  # lengths past SHORT_SEGMENT
}


def dense_reference(doc_ids: torch.Tensor, q, k, v, enable_gqa: bool) -> torch.Tensor:
    """The dense (B, 1, L, L) document-causal mask (padding one more document)."""
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def qkv(B: int, L: int, heads: int = 4, kv_heads: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # q and k as the model makes them: views of one projection, (B, L, heads, Dh) transposed
    qk = torch.randn(B, L, heads + kv_heads, 8, generator=g).transpose(1, 2)
    v = torch.randn(B, L, kv_heads, 8, generator=g).transpose(1, 2)
    return [t.requires_grad_() for t in (qk[:, :heads].detach(), qk[:, heads:].detach(), v.detach())]


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_buckets_equal_the_dense_mask_forward_and_backward(rows, kv_heads):
    lengths, L = ROWS[rows]
    layout = DocumentLayout.from_lengths(lengths, L)
    attn = AttentionLayout.of(layout)
    assert attn.kernel == ("causal" if layout.single_document else "buckets")
    q, k, v = qkv(len(lengths), L, kv_heads=kv_heads)
    gqa = kv_heads != 4
    y = attn.attend(q, k, v, gqa)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), g)
    want = dense_reference(layout.doc_ids, q, k, v, gqa)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    valid = layout.valid[:, None, :, None]
    if layout.single_document:  # plain causal: padding attends to the document, harmlessly
        y, want = y * valid, want * valid
    torch.testing.assert_close(y, want, atol=2e-5, rtol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("rows", ["unequal", "padding", "one-token documents"])
def test_flex_block_mask_equals_the_dense_mask(rows):
    lengths, L = ROWS[rows]
    layout = DocumentLayout.from_lengths(lengths, L)
    attn = AttentionLayout.of(layout, kernel="flex")
    q, k, v = (t.detach() for t in qkv(len(lengths), L, kv_heads=2))
    with torch.no_grad():
        got = attn.attend(q, k, v, True)
        want = dense_reference(layout.doc_ids, q, k, v, True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_flex_block_mask_tiles():
    """Two 128-tiles: document 0 fills tile 0 and starts tile 1, so tile (1, 0) is partial; with one
    document spanning three tiles the tiles below the diagonal are full and only the diagonal is masked."""
    bm = document_attention.document_block_mask(DocumentLayout.from_lengths([[150, 106]], 256).doc_ids)
    assert bm.kv_num_blocks[0, 0].tolist() == [1, 2] and bm.full_kv_num_blocks[0, 0].tolist() == [0, 0]
    bm = document_attention.document_block_mask(DocumentLayout.single(1, 384).doc_ids)
    assert bm.kv_num_blocks[0, 0].tolist() == [1, 1, 1] and bm.full_kv_num_blocks[0, 0].tolist() == [0, 1, 2]


def test_bucket_plan():
    assert [bucket_length(n) for n in (1, 3, 200, 256, 257, 300, 1000)] == [1, 4, 256, 256, 288, 320, 1024]
    plan = SegmentBuckets.of(DocumentLayout.from_lengths([[3, 4, 1], [7]], 9))
    # segments 3, 4, 1, padding 1 | 7, padding 2 -> buckets of 1 (two), 2 (one), 4 (two), 8 (one)
    assert (plan.lengths, plan.counts) == ([1, 2, 4, 8], [2, 1, 2, 1])
    assert sorted(plan.scatter.tolist()) == plan.scatter.unique().tolist()  # every position read once
    with pytest.raises(ValueError, match="packed"):
        AttentionLayout.of(DocumentLayout.from_lengths([[3, 4]], 7), kernel="causal")


@pytest.mark.parametrize("name", ["conceptmoe", "looped-wide", "baseline", "imported-options"])
def test_model_equals_the_dense_reference_at_both_levels(name, monkeypatch):
    """A training forward and backward over packed rows (the concept level's documents come from the
    sampled boundaries) gives the same loss, logits and gradients with the dense mask."""
    def run(dense: bool):
        if dense:
            monkeypatch.setattr(AttentionLayout, "attend", lambda self, q, k, v, gqa: dense_reference(
                self.documents.doc_ids, q, k, v, gqa))
        torch.manual_seed(0)
        m = ConceptMoE(VARIANTS[name]).train()
        x = torch.randint(0, 64, (2, 48))
        torch.manual_seed(1)
        batch = Batch.of(x, doc_ids=packed_docs(), labels=x.roll(-1, 1))
        out = m(batch)
        loss = Objective(m.cfg)(out, batch).total
        loss.backward()
        return out, loss, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    (out, loss, grads), (ref, ref_loss, ref_grads) = run(False), run(True)
    assert out.boundaries.equal(ref.boundaries)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)

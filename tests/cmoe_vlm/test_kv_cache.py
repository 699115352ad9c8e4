"""KVCache: rows written at their own lengths; the Python-int fast path (all rows equally long)
gives the same keys, values and attention as the per-row path."""
import torch

from cmoe_base import DocumentLayout
from cmoe_vlm.model.layers.attention import Attention, AttentionConfig, AttentionLayout, KVCache
from cmoe_vlm.model.layers.rope import rope_angles


def kv(B: int, S: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, S, 8, generator=g), torch.randn(B, 2, S, 8, generator=g)


def test_common_length_follows_the_rows():
    cache = KVCache(3, 2, 8, "cpu", torch.float32, capacity=4)
    assert cache.common_length == 0
    cache.append(*kv(3, 5, 0))  # grows past the capacity
    cache.advance(5)
    assert cache.common_length == 5 and cache.lengths.tolist() == [5, 5, 5]
    rows = torch.tensor([0, 2])
    cache.append(*kv(2, 1, 1), rows=rows)
    cache.advance(1, rows)
    assert cache.common_length is None and cache.lengths.tolist() == [6, 5, 6]
    cache.append(*kv(1, 1, 2), rows=torch.tensor([1]))
    cache.advance(torch.tensor([1]), torch.tensor([1]))
    assert cache.common_length == 6  # equal again: the fast path comes back
    cache.select(torch.tensor([2, 0]))
    assert cache.common_length == 6 and cache.lengths.tolist() == [6, 6]
    cache.set_lengths(torch.tensor([3, 4]))
    assert cache.common_length is None


def test_fast_and_per_row_paths_store_and_attend_alike():
    """The same writes through the int path (common length) and the tensor path (common length
    hidden) leave equal caches, and an attention layer reading them gives equal outputs."""
    torch.manual_seed(0)
    attn = Attention(AttentionConfig(dim=16, num_heads=2, num_kv_heads=2, head_dim=8)).eval()
    x = torch.randn(2, 9, 16)
    outs, caches = [], []
    for hide in (False, True):
        cache = KVCache(2, 2, 8, "cpu", torch.float32, capacity=2)
        ys = []
        for lo, hi in ((0, 4), (4, 5), (5, 7), (7, 8), (8, 9)):  # a prefill, single tokens, a span
            if hide:
                cache.common_length = None  # force the per-row path
            rope = rope_angles(torch.arange(lo, hi).expand(2, -1), 8, 10000.0)
            with torch.no_grad():
                ys.append(attn.extend(x[:, lo:hi], rope, cache))
            cache.advance(hi - lo)
        outs.append(torch.cat(ys, 1))
        caches.append(cache)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(caches[0].k[:, :, :9], caches[1].k[:, :, :9])
    torch.testing.assert_close(caches[0].v[:, :, :9], caches[1].v[:, :, :9])
    with torch.no_grad():  # and both equal the uncached causal forward
        full = attn(x, rope_angles(torch.arange(9).expand(2, -1), 8, 10000.0),
                    AttentionLayout.of(DocumentLayout.single(2, 9)))
    torch.testing.assert_close(outs[0], full, atol=1e-5, rtol=1e-5)


def test_one_query_attention_matches_the_fused_kernel(monkeypatch):
    """The decode-step attention (grouped query heads as one matmul per KV head) against SDPA, the
    reference, with GQA and batch > 1; and a decode step through it (the key threshold lowered to 1)
    gives the logits of the full causal forward at that position."""
    import torch.nn.functional as F

    from cmoe_vlm.model.layers import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8, generator=g), torch.randn(3, 2, 37, 8, generator=g), torch.randn(3, 2, 37, 8, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(attention.one_query_attention(q, k, v), want, atol=1e-6, rtol=1e-5)

    monkeypatch.setattr(attention, "ONE_QUERY_MIN_KEYS", 1)
    torch.manual_seed(1)
    attn = Attention(AttentionConfig(dim=16, num_heads=4, num_kv_heads=2, head_dim=8)).eval()
    x = torch.randn(2, 9, 16)
    pos = torch.arange(9).expand(2, 9)
    rope = rope_angles(pos, 8, 10000.0)
    with torch.no_grad():
        full = attn(x, rope, AttentionLayout.of(DocumentLayout.single(2, 9)))
        cache = KVCache(2, 2, 8, "cpu", torch.float32)
        attn.extend(x[:, :8], tuple(r[:, :8] for r in rope), cache)
        cache.advance(8)
        step = attn.extend(x[:, 8:], tuple(r[:, 8:] for r in rope), cache)
    torch.testing.assert_close(step[:, 0], full[:, 8], atol=1e-5, rtol=1e-5)

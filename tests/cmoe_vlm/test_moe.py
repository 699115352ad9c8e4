import pytest
import torch
import torch.nn.functional as F

from cmoe_vlm.model.layers.moe import GroupedSwiGLU, MoE, MoEConfig
from cmoe_vlm.objective import balance_loss


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-selected-expert reference."""
    cfg = moe.cfg
    out = torch.zeros_like(x)
    probs = moe.router(x).float().softmax(-1)
    for n in range(x.shape[0]):
        w, e = probs[n].topk(cfg.top_k)
        if cfg.norm_topk_prob:
            w = w / w.sum()
        for wk, ek in zip(w, e):
            gate, up = (x[n] @ moe.experts.w13[ek]).chunk(2)
            out[n] += wk * ((F.silu(gate) * up) @ moe.experts.w2[ek])
        if moe.shared is not None:
            out[n] += moe.shared(x[n])
    return out


@pytest.mark.parametrize("impl,hidden", [("loop", 24), ("grouped", 24), ("auto", 6)])  # auto: 6 -> loop (unaligned)
@pytest.mark.parametrize("shared,norm", [(0, True), (32, False)])
def test_dispatch_matches_naive_reference(impl, hidden, shared, norm):
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=6, top_k=2, expert_hidden=hidden, shared_expert_hidden=shared,
                            norm_topk_prob=norm, impl=impl))
    x = torch.randn(37, 16)
    y, stats = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-4)
    assert int(stats.tokens_per_expert.sum()) == 37 * 2
    ref_counts = torch.bincount(moe.router(x).topk(2, dim=-1).indices.flatten(), minlength=6)
    assert torch.equal(stats.tokens_per_expert, ref_counts)


@pytest.mark.parametrize("n", [1, 3])
def test_few_token_path_matches_naive_reference(n):
    """Decoding (N·k <= E, no autograd) takes the gathered-weights path: same outputs, same counts."""
    torch.manual_seed(2)
    moe = MoE(16, MoEConfig(num_experts=8, top_k=2, expert_hidden=24, shared_expert_hidden=8))
    x = torch.randn(n, 16)
    with torch.no_grad():
        y, stats = moe(x)
        torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-4)
        sorted_path = moe(torch.cat([x, torch.randn(8, 16)]))[0][:n]  # N·k > E: the sorted dispatch
    torch.testing.assert_close(y, sorted_path, atol=1e-6, rtol=1e-5)
    assert int(stats.tokens_per_expert.sum()) == n * 2


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_gradients_match_reference(impl):
    torch.manual_seed(1)
    moe = MoE(8, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, impl=impl))
    x = torch.randn(11, 8, requires_grad=True)
    moe(x)[0].pow(2).sum().backward()
    g_fast = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad()
    x.grad = None
    naive_moe(moe, x).pow(2).sum().backward()
    g_ref = [p.grad for p in moe.parameters()] + [x.grad]
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_expert_with_no_tokens_and_3d_input():
    torch.manual_seed(2)
    moe = MoE(8, MoEConfig(num_experts=8, top_k=1, expert_hidden=8))
    x = torch.randn(2, 3, 8)  # 6 tokens, 8 experts: some experts get none
    y, stats = moe(x)
    assert y.shape == x.shape and (stats.tokens_per_expert == 0).any()
    torch.testing.assert_close(y.view(-1, 8), naive_moe(moe, x.view(-1, 8)), atol=1e-5, rtol=1e-4)


def test_load_balance_loss_is_one_when_uniform_and_higher_when_skewed():
    moe = MoE(4, MoEConfig(num_experts=4, top_k=1, expert_hidden=4))
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities, ties broken to expert 0
    x = torch.randn(64, 4)
    _, stats = moe(x)
    # uniform probabilities: E · Σ f_e · (1/E) = 1 however the ties are routed
    assert balance_loss(stats).item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4) * 10)
    x = torch.eye(4).repeat(16, 1)  # perfectly balanced, confident routing
    assert balance_loss(moe(x)[1]).item() == pytest.approx(1.0, abs=1e-3)
    x = torch.eye(4)[:1].repeat(64, 1)  # everything to expert 0
    assert balance_loss(moe(x)[1]).item() > 3.5


def per_expert_reference(x, w13, w2, counts):
    """The slow reference of `GroupedSwiGLU`: autograd through one SwiGLU per expert slice."""
    outs = []
    for e, x_e in enumerate(x.split(counts)):
        gate, up = (x_e @ w13[e]).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ w2[e])
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_matches_per_expert_reference(dtype):
    """The fused node (one silu backward over all rows, grouped matmuls) against autograd through
    per-expert slices: outputs and all three gradients, with an expert that has no rows."""
    torch.manual_seed(3)
    counts = [5, 0, 9, 1, 7]
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    w13 = (torch.randn(5, 16, 2 * 8) * 0.3).to(dtype).requires_grad_()
    w2 = (torch.randn(5, 8, 16) * 0.3).to(dtype).requires_grad_()
    g = torch.randn(sum(counts), 16, dtype=dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = GroupedSwiGLU.apply(x, w13, w2, offs)
    grads = torch.autograd.grad(got, (x, w13, w2), g)
    want = per_expert_reference(x, w13, w2, counts)
    ref_grads = torch.autograd.grad(want, (x, w13, w2), g)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)
    assert grads[1][1].abs().sum() == 0 and grads[2][1].abs().sum() == 0  # the empty expert: zero gradient

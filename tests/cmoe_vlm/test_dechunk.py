import pytest
import torch

from cmoe_vlm.model.dechunk import DechunkModule, ema_scan, plug_back, straight_through_one


def ema_loop(c_hat, p, reset, eps=1e-4):
    """Slow reference of docs/design.md §4: one concept at a time."""
    p = p.clamp(eps, 1 - eps)
    out = torch.zeros_like(c_hat)
    B, M, _ = c_hat.shape
    for b in range(B):
        prev = None
        for m in range(M):
            if prev is None or reset[b, m]:
                prev = c_hat[b, m]
            else:
                prev = p[b, m] * c_hat[b, m] + (1 - p[b, m]) * prev
            out[b, m] = prev
    return out


@pytest.mark.parametrize("M,block", [(1, 64), (7, 4), (64, 64), (300, 64), (300, 16)])
def test_scan_equals_loop_reference(M, block):
    torch.manual_seed(M)
    c_hat = torch.randn(3, M, 5, dtype=torch.float64)
    p = torch.rand(3, M, dtype=torch.float64)
    reset = torch.rand(3, M) < 0.05
    reset[:, 0] = True
    got = DechunkModule(block=block).ema(c_hat, p, reset)
    torch.testing.assert_close(got, ema_loop(c_hat, p, reset), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M,block", [(45, 8), (300, 4)])  # 300/4: three levels of block chaining
def test_scan_gradients_match_reference(M, block):
    torch.manual_seed(0)
    c_hat = torch.randn(2, M, 3, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, M, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(2, M, dtype=torch.bool)
    reset[:, [0, 20]] = True
    w = torch.randn(2, M, 3, dtype=torch.float64)
    (DechunkModule(block=block).ema(c_hat, p, reset) * w).sum().backward()
    g = (c_hat.grad.clone(), p.grad.clone())
    c_hat.grad = p.grad = None
    (ema_loop(c_hat, p, reset) * w).sum().backward()
    torch.testing.assert_close(g[0], c_hat.grad)
    torch.testing.assert_close(g[1], p.grad)
    assert torch.isfinite(g[1]).all()


def test_long_sequence_with_tiny_p_does_not_overflow():
    # a = 1 - 1e-4 over 8K steps: a global exp(-cumsum) would overflow in fp32 with large decays;
    # here decays are near 1 but p near 1 elsewhere gives log a = log(1e-4) per step: cumsum ~ -7e4.
    M = 8192
    p = torch.full((1, M), 0.9999)
    p[0, ::2] = 1e-6
    c_hat = torch.randn(1, M, 4)
    reset = torch.zeros(1, M, dtype=torch.bool)
    reset[0, 0] = True
    got = DechunkModule().ema(c_hat, p, reset)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, :300], ema_loop(c_hat[:, :300], p[:, :300], reset[:, :300]),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[:, -3:], ema_loop(c_hat, p, reset)[:, -3:], atol=1e-4, rtol=1e-4)


def test_init_state_continues_the_recurrence():
    torch.manual_seed(3)
    c_hat = torch.randn(2, 10, 4)
    p = torch.rand(2, 10)
    reset = torch.zeros(2, 10, dtype=torch.bool)
    reset[:, 0] = True
    full = DechunkModule().ema(c_hat, p, reset)
    tail = DechunkModule().ema(c_hat[:, 6:], p[:, 6:], reset[:, 6:], init=full[:, 5])
    torch.testing.assert_close(tail, full[:, 6:])


def test_raw_ema_scan_matches_recurrence():
    torch.manual_seed(4)
    u = torch.randn(2, 130, 3, dtype=torch.float64)
    a = torch.rand(2, 130, dtype=torch.float64)
    y, prev = [], torch.zeros(2, 3, dtype=torch.float64)
    for m in range(130):
        prev = a[:, m, None] * prev + u[:, m]
        y.append(prev)
    torch.testing.assert_close(ema_scan(u, a, block=32), torch.stack(y, 1))


def test_plug_back_and_ste():
    c_bar = torch.arange(6.0).view(1, 3, 2)
    idx = torch.tensor([[0, 0, 1, 2, 2]])
    assert plug_back(c_bar, idx)[0, :, 0].tolist() == [0, 0, 2, 4, 4]
    c = torch.tensor([0.3, 0.9], requires_grad=True)
    s = straight_through_one(c)
    assert s.tolist() == [1.0, 1.0]
    (s * torch.tensor([2.0, 3.0])).sum().backward()
    assert c.grad.tolist() == [2.0, 3.0]

"""RoPE against a per-pair rotation written out, and the property attention relies on: the score
of a rotated query and key depends only on their distance."""
import math

import torch

from cmoe_vlm.layers.rope import apply_rope, rope_angles


def rotate_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, T, H, Dh): pair i = (x[..., i], x[..., i + Dh/2]) rotated by position · theta^(−2i/Dh)."""
    out = x.clone().double()
    half = x.shape[-1] // 2
    for i in range(half):
        a = positions.double()[:, :, None] * theta ** (-2 * i / x.shape[-1])  # (B, T, 1)
        c, s = torch.cos(a), torch.sin(a)
        x1, x2 = x[..., i].double(), x[..., i + half].double()
        out[..., i], out[..., i + half] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def test_apply_rope_matches_the_pairwise_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 9, 100, 1000, 4095, 17, 3]])
    got = apply_rope(x, *rope_angles(positions, 16, 10000.0))
    # fp32 angles: at position 4095 an angle is only good to ~2e-4 rad
    torch.testing.assert_close(got.double(), rotate_reference(x, positions, 10000.0), atol=1e-3, rtol=0)
    near = positions < 200
    torch.testing.assert_close(got.double()[near], rotate_reference(x, positions, 10000.0)[near], atol=1e-5, rtol=0)


def test_scores_depend_only_on_the_distance():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def score(pq: int, pk: int) -> float:
        rq = apply_rope(q, *rope_angles(torch.tensor([[pq]]), 32, 10000.0))
        rk = apply_rope(k, *rope_angles(torch.tensor([[pk]]), 32, 10000.0))
        return float((rq * rk).sum())

    assert math.isclose(score(10, 3), score(107, 100), rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score(10, 3), score(10, 4), rel_tol=1e-3)


def test_bf16_input_comes_back_in_bf16():
    x = torch.randn(1, 4, 2, 8).bfloat16()
    out = apply_rope(x, *rope_angles(torch.arange(4)[None], 8, 10000.0))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rotate_reference(x.float(), torch.arange(4)[None], 10000.0).float(),
                               atol=2e-2, rtol=2e-2)

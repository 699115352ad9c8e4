"""RoPE against a per-pair rotation written out, and the property attention relies on: the score
of a rotated query and key depends only on their distance."""
import math

import pytest
import torch

from cmoe_vlm.model.layers.rope import apply_rope, rope_angles


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


SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn-mscale-untruncated": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                                "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
}


@pytest.mark.parametrize("name", SCALINGS)
def test_scaled_frequencies_match_transformers(name):
    """Our cos/sin for each scaled RoPE type equal transformers' (its inverse frequencies and
    attention factor), read through the importer's mapping of `rope_parameters`."""
    from transformers import MixtralConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from cmoe_vlm.checkpoints.families import rope_from_hf

    hf = MixtralConfig(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=1024,
                       rope_parameters={**SCALINGS[name], "rope_theta": 50000.0})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, torch.device("cpu"))
    positions = torch.tensor([[0, 1, 7, 100, 1023]])
    angles = positions.float()[..., None] * inv_freq  # transformers: cat(freqs, freqs), cos/sin × factor
    want_cos = torch.cat([angles, angles], -1).cos() * factor
    want_sin = torch.cat([angles, angles], -1).sin() * factor
    theta, scaling = rope_from_hf(hf)
    assert theta == 50000.0 and scaling.type == hf.rope_parameters["rope_type"]
    cos, sin = rope_angles(positions, 32, theta, scaling)
    torch.testing.assert_close(cos[:, :, 0], want_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, :, 0, 16:], want_sin[..., 16:], atol=1e-6, rtol=0)  # first half: −sin
    torch.testing.assert_close(sin[:, :, 0, :16], -want_sin[..., :16], atol=1e-6, rtol=0)

"""The math in deltalora_hf.functional against dense references."""

from __future__ import annotations

import pytest
import torch

from deltalora_hf import functional as F


def _factors(d=24, k=40, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in [(r, k), (d, r), (r, k), (d, r)]]


def test_delta_factors_give_the_paper_delta_not_the_product_of_deltas():
    a_new, b_new, a_old, b_old = _factors()
    u, v = F.delta_factors(a_new, b_new, a_old, b_old)
    assert u.shape == (24, 6) and v.shape == (6, 40)
    torch.testing.assert_close(u @ v, b_new @ a_new - b_old @ a_old)
    wrong = (b_new - b_old) @ (a_new - a_old)  # what some public implementations use
    assert not torch.allclose(u @ v, wrong)


def test_frobenius_norm_from_gram_matrices():
    a_new, b_new, a_old, b_old = _factors()
    u, v = F.delta_factors(a_new, b_new, a_old, b_old)
    torch.testing.assert_close(F.low_rank_frobenius_sq(u, v), (u @ v).pow(2).sum())


@pytest.mark.parametrize("transposed", [False, True])
def test_add_low_rank_fp32_is_the_dense_update(transposed):
    a_new, b_new, a_old, b_old = _factors()
    u, v = F.delta_factors(a_new, b_new, a_old, b_old)
    w = torch.randn(40, 24) if transposed else torch.randn(24, 40)
    dense = (b_new @ a_new - b_old @ a_old) * 0.7
    expected = w + (dense.T if transposed else dense)
    F.add_low_rank_(w, u, v, 0.7, transposed=transposed)
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_nearest_is_the_rounded_exact_sum(dtype, monkeypatch):
    monkeypatch.setattr(F, "BLOCK_ELEMENTS", 64)  # several blocks: the blocking must not change the result
    a_new, b_new, a_old, b_old = _factors()
    u, v = F.delta_factors(a_new, b_new, a_old, b_old)
    w = torch.randn(24, 40).to(dtype)
    exact = w.double() + 0.3 * (b_new.double() @ a_new.double() - b_old.double() @ a_old.double())
    F.add_low_rank_(w, u, v, 0.3, rounding="nearest")
    up = torch.nextafter(w, torch.full_like(w, float("inf"))).double() - w.double()
    down = w.double() - torch.nextafter(w, torch.full_like(w, -float("inf"))).double()
    half_ulp = torch.maximum(up, down) / 2
    assert torch.all((w.double() - exact).abs() <= half_ulp * (1 + 1e-3) + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_and_lands_on_a_neighbour(dtype):
    x = torch.full((100_000,), 1.0) + torch.linspace(0, 1e-3, 100_000)
    x = torch.cat([x, -3 * x])  # both signs, two binades
    g = torch.Generator().manual_seed(0)
    y = F.stochastic_round(x, dtype, g)
    lo, hi = x.to(dtype), torch.nextafter(x.to(dtype), torch.tensor(float("inf"), dtype=dtype))
    assert torch.all((y == lo) | (y == hi) | (y == torch.nextafter(lo, torch.tensor(-float("inf"), dtype=dtype))))
    # per sign, the mean rounding error is tiny compared to one ulp (truncation or nearest would be biased)
    for half in (x > 0, x < 0):
        ulp = (hi.float() - lo.float())[half].abs().mean()
        bias = (y.float() - x)[half].mean().abs()
        assert bias < 0.01 * ulp, (bias, ulp)


def test_stochastic_rounding_accumulates_sub_ulp_steps_that_nearest_drops():
    w_sr = torch.ones(4096, dtype=torch.bfloat16)
    w_rn = w_sr.clone()
    g = torch.Generator().manual_seed(0)
    step = 1e-4  # about 1/78 of a bfloat16 ulp at 1.0
    for _ in range(200):
        w_sr.copy_(F.stochastic_round(w_sr.float() + step, torch.bfloat16, g))
        w_rn.copy_((w_rn.float() + step).to(torch.bfloat16))
    assert torch.equal(w_rn, torch.ones_like(w_rn))  # every step lost
    assert abs(w_sr.float().mean().item() - 1.02) < 0.002

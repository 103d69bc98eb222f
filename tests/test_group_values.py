"""group_values: each transform's per-group estimate of R against independent computations.

* BestOfN unbiased == the mean over all n-subsets of their maximum (enumerated), and the lgamma
  weights for G up to 1024;
* BestOfN plug-in == E[max of n draws with replacement] (all G**n draws enumerated) and the
  empirical-CDF formula;
* SoftBestOfN == sum w r / sum w in float64, finite for any reward/tau ratio; Mean == the mean.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iama_kernels import BestOfN, Mean, SoftBestOfN, group_values
from iama_kernels.testing import (
    brute_force_plugin_value,
    logspace_unbiased_group_value,
    plugin_group_value_by_cdf,
    random_rewards,
    soft_best_of_n_oracle,
    unbiased_value,
)

EPS32 = torch.finfo(torch.float32).eps
# Measured: float32 group values stay within 1 * eps32 * max|r| of float64 (G up to 1024).
F32_FACTOR = 8.0


def _gv(rewards: torch.Tensor, transform: object, estimator: str = "plugin") -> torch.Tensor:
    return group_values(rewards, transform, estimator=estimator, impl="reference")


@pytest.mark.parametrize("G", [1, 2, 4, 6, 8])
def test_best_of_n_values_against_enumeration(G: int) -> None:
    g = torch.Generator().manual_seed(G)
    r = torch.cat([random_rewards(8, G, ties=True, dtype=torch.float64, generator=g),
                   random_rewards(2, G, ties=False, dtype=torch.float64, generator=g)])
    for n in range(1, G + 1):
        vu = _gv(r, BestOfN(n), "unbiased")
        for b in range(r.shape[0]):
            assert abs(float(vu[b]) - unbiased_value(r[b], n)) <= 1e-12
    for n in range(1, 8):
        vp = _gv(r, BestOfN(n), "plugin")
        cdf = plugin_group_value_by_cdf(r, n)
        torch.testing.assert_close(vp, cdf, rtol=0, atol=1e-12)
        if G**n <= 5000:
            for b in range(r.shape[0]):
                assert abs(float(vp[b]) - brute_force_plugin_value(r[b], n)) <= 1e-12


def test_hand_values() -> None:
    r = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64)
    # plugin n = 2: E[max of 2 draws] = (0 * 1 + 1 * 3 + 3 * 5) / 9 = 2
    assert float(_gv(r, BestOfN(2))) == pytest.approx(2.0, abs=1e-15)
    # unbiased n = 2: pairs (3,0), (3,1), (0,1) -> maxima 3, 3, 1 -> 7/3
    assert float(_gv(r, BestOfN(2), "unbiased")) == pytest.approx(7 / 3, abs=1e-15)
    assert float(_gv(r, BestOfN(3), "unbiased")) == 3.0
    assert float(_gv(r, Mean())) == pytest.approx(4 / 3, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_and_n_equal_one(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    r = random_rewards(12, 9, ties=True, dtype=dtype, generator=g)
    tol = 1e-13 if dtype == torch.float64 else 4 * EPS32 * float(r.abs().max())
    for t in (Mean(), BestOfN(1)):
        for est in ("plugin", "unbiased"):
            torch.testing.assert_close(_gv(r, t, est), r.mean(-1), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_constant_group_value_is_exact(dtype: torch.dtype) -> None:
    r = torch.tensor([[2.5] * 5, [-7.0] * 5], dtype=dtype)
    for t in (Mean(), BestOfN(2), BestOfN(5), SoftBestOfN(0.01)):
        for est in ("plugin", "unbiased"):
            assert torch.equal(_gv(r, t, est), r[:, 0].to(_gv(r, t, est).dtype))


@pytest.mark.parametrize("G", [1000, 1024])
def test_unbiased_value_large_groups_logspace(G: int) -> None:
    g = torch.Generator().manual_seed(G)
    r = random_rewards(4, G, ties=True, dtype=torch.float64, generator=g)
    top = float(r.abs().max())
    for n in [1, 2, 7, 100, 511, G - 1, G]:
        v = _gv(r, BestOfN(n), "unbiased")
        assert bool(torch.isfinite(v).all())
        # Oracle accuracy ~5e-12 relative (lgamma of ~6000 in float64).
        torch.testing.assert_close(v, logspace_unbiased_group_value(r, n), rtol=0, atol=5e-11 * top)
        vp = _gv(r, BestOfN(n), "plugin")
        torch.testing.assert_close(vp, plugin_group_value_by_cdf(r, n), rtol=0, atol=1e-12 * top)
        for est in ("plugin", "unbiased"):
            v32 = _gv(r.float(), BestOfN(n), est)
            assert float((v32.double() - _gv(r.float().double(), BestOfN(n), est)).abs().max()) <= (
                F32_FACTOR * EPS32 * top)


def test_soft_best_of_n_value_formula_and_limits() -> None:
    g = torch.Generator().manual_seed(4)
    r = random_rewards(8, 7, ties=True, dtype=torch.float64, generator=g)
    for tau in (1e-3, 0.09, 0.1, 1.0, 50.0):
        v = _gv(r, SoftBestOfN(tau))
        for b in range(r.shape[0]):
            _, oracle = soft_best_of_n_oracle(r[b], tau)
            assert abs(float(v[b]) - oracle) <= 1e-13 * max(1.0, float(r[b].abs().max()))
    # tau -> 0: the maximum; tau -> infinity: the mean.
    torch.testing.assert_close(_gv(r, SoftBestOfN(1e-12)), r.max(-1).values, rtol=0, atol=1e-15)
    torch.testing.assert_close(_gv(r, SoftBestOfN(1e12)), r.mean(-1), rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_best_of_n_value_finite_for_huge_ratios(dtype: torch.dtype) -> None:
    r = torch.tensor([[1e4, -1e4, 0.0, 1e4], [0.0, 1.0, 2.0, 3.0]], dtype=dtype)
    for tau in (1e-300, 1e-50, 1e-20, 1e20, 1e300):
        v = _gv(r, SoftBestOfN(tau))
        assert bool(torch.isfinite(v).all()), tau
        for b in range(2):
            _, oracle = soft_best_of_n_oracle(r[b], tau)
            assert abs(float(v[b]) - oracle) <= 8 * torch.finfo(dtype).eps * float(r[b].abs().max())


def test_values_ignore_order_and_leading_dims() -> None:
    g = torch.Generator().manual_seed(6)
    r = random_rewards(12, 8, ties=True, dtype=torch.float32, generator=g)
    for t, est in [(BestOfN(3), "unbiased"), (BestOfN(5), "plugin"), (SoftBestOfN(0.2), "plugin"),
                   (Mean(), "plugin")]:
        v = _gv(r, t, est)
        assert v.shape == (12,)
        assert torch.equal(_gv(r.reshape(3, 4, 8), t, est), v.reshape(3, 4))
        for _ in range(3):
            assert torch.equal(_gv(r[:, torch.randperm(8, generator=g)], t, est), v)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 2.0]),
                       st.floats(-100, 100, allow_nan=False, width=32)), min_size=1, max_size=7),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_property_values_monotone_in_n_and_bounded(values: list[float], dtype: torch.dtype) -> None:
    r = torch.tensor(values, dtype=dtype)
    G = r.shape[0]
    tol = (1e-12 if dtype == torch.float64 else F32_FACTOR * EPS32) * max(1.0, float(r.abs().max()))
    for est in ("plugin", "unbiased"):
        prev = -math.inf
        for n in range(1, G + 1):
            v = float(_gv(r, BestOfN(n), est))
            # R(BestOfN(n)) is non-decreasing in n and lies between the mean and the maximum.
            assert v >= prev - tol
            assert float(r.double().mean()) - tol <= v <= float(r.max()) + tol
            oracle = unbiased_value(r, n) if est == "unbiased" else float(plugin_group_value_by_cdf(r, n))
            assert abs(v - oracle) <= tol
            prev = v
    assert abs(float(_gv(r, BestOfN(G), "unbiased")) - float(r.max())) <= tol

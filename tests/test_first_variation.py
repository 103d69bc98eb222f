"""first_variation: the reference against independent oracles (SPEC sections 2-3).

* unbiased BestOfN == enumeration over all (n-1)-subsets (G <= 8), and the lgamma-weight dense
  formula for G up to 1024;
* plugin BestOfN == exact integration of ``-int n C(t)^(n-1) dt`` over the empirical CDF;
* n = 1 is plain GRPO; binary rewards give the closed-form pass@k advantages times k;
* ties are bit-identical and permutations commute with the op, in every dtype;
* float32 stays within a tolerance measured against float64.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iama_kernels import BestOfN, Criterion, Mean, SoftBestOfN, first_variation
from iama_kernels.testing import (
    brute_force_unbiased,
    logspace_unbiased_first_variation,
    plugin_by_integration,
    random_rewards,
    soft_best_of_n_oracle,
)

EPS32 = torch.finfo(torch.float32).eps
# Measured: the float32 reference's first variation stays within 4.6 * eps32 * n * max|r| of
# float64 (G up to 1024, every n, ties); SoftBestOfN within 0.1 * eps32 * G * max|r|.
F32_FACTOR = 32.0


def _fv(rewards: torch.Tensor, transform: object, estimator: str = "plugin") -> torch.Tensor:
    return first_variation(rewards, transform, estimator=estimator, impl="reference")


def _scale(transform: object, rewards: torch.Tensor) -> float:
    """Magnitude of the first variation: n max|r| for BestOfN, G max|r| for SoftBestOfN."""
    top = max(float(rewards.double().abs().max()), 1e-30)
    if isinstance(transform, BestOfN):
        return transform.n * top
    if isinstance(transform, SoftBestOfN):
        return rewards.shape[-1] * top
    return top


@pytest.mark.parametrize("G", [1, 2, 3, 5, 8])
def test_unbiased_matches_subset_enumeration(G: int) -> None:
    g = torch.Generator().manual_seed(G)
    rewards = torch.cat([random_rewards(8, G, ties=True, dtype=torch.float64, generator=g),
                         random_rewards(4, G, ties=False, dtype=torch.float64, generator=g)])
    for n in range(1, G + 1):
        s = _fv(rewards, BestOfN(n), "unbiased")
        for b in range(rewards.shape[0]):
            oracle = brute_force_unbiased(rewards[b], n)
            torch.testing.assert_close(s[b], oracle, rtol=0, atol=1e-12)


@pytest.mark.parametrize("G", [1, 2, 3, 6, 8])
def test_plugin_matches_integral_of_empirical_cdf(G: int) -> None:
    g = torch.Generator().manual_seed(100 + G)
    rewards = torch.cat([random_rewards(8, G, ties=True, dtype=torch.float64, generator=g),
                         random_rewards(4, G, ties=False, dtype=torch.float64, generator=g)])
    for n in [1, 2, 3, 4, 7, 12]:  # plug-in needs no G >= n
        s = _fv(rewards, BestOfN(n), "plugin")
        for b in range(rewards.shape[0]):
            torch.testing.assert_close(s[b], plugin_by_integration(rewards[b], n), rtol=0, atol=1e-12)


def test_plugin_and_unbiased_hand_example() -> None:
    # Rewards 0, 1, 3 with n = 2, worked out by hand.
    r = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64)
    # plugin: s_(1) = 0, s_(2) = 2 (1/3)(1 - 0) = 2/3, s_(3) = 2/3 + 2 (2/3)(3 - 1) = 10/3.
    plug = torch.tensor([10 / 3, 0.0, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(_fv(r, BestOfN(2)), plug - plug.mean(), rtol=0, atol=1e-15)
    # unbiased: s_j = 2 * mean over the other samples o of max(r_j, o).
    unb = torch.tensor([2 * 3.0, 2 * (1 + 3) / 2, 2 * (1 + 3) / 2], dtype=torch.float64)
    torch.testing.assert_close(_fv(r, BestOfN(2), "unbiased"), unb - unb.mean(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
def test_n_equal_one_is_plain_grpo(dtype: torch.dtype, estimator: str) -> None:
    g = torch.Generator().manual_seed(1)
    r = random_rewards(12, 9, ties=True, dtype=dtype, generator=g)
    expected = (r.double() - r.double().mean(-1, keepdim=True)).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 4 * EPS32 * float(r.abs().max())
    for t in (Mean(), BestOfN(1), Criterion("c", BestOfN(1))):
        torch.testing.assert_close(_fv(r, t, estimator), expected, rtol=0, atol=tol)
    # Mean and BestOfN(1) are the same computation: bit-identical.
    assert torch.equal(_fv(r, Mean(), estimator), _fv(r, BestOfN(1), estimator))


def _pass_at_k_advantage(G: int, c: int, k: int) -> tuple[Fraction, Fraction]:
    """Exact centred pass@k advantages (correct, incorrect) for c correct out of G.

    Group value (unbiased pass@k): R = 1 - C(G-c, k)/C(G, k). A correct sample always makes a
    k-subset succeed: advantage 1 - R. An incorrect one succeeds only through the other k-1,
    which all fail with probability C(G-1-c, k-1)/C(G-1, k-1): advantage 1 - R - that.
    These sum to zero over the group (they are already centred).
    """
    R = 1 - Fraction(math.comb(G - c, k), math.comb(G, k))
    if c == G:  # no incorrect sample exists
        return 1 - R, Fraction(0)
    fail_others = Fraction(math.comb(G - 1 - c, k - 1), math.comb(G - 1, k - 1))
    return 1 - R, 1 - R - fail_others


@pytest.mark.parametrize("G", [4, 7, 16])
def test_binary_rewards_give_pass_at_k_advantages_times_k(G: int) -> None:
    g = torch.Generator().manual_seed(G)
    for k in range(1, G + 1):
        for c in range(G + 1):
            r = torch.zeros(G, dtype=torch.float64)
            r[torch.randperm(G, generator=g)[:c]] = 1.0
            s = _fv(r, BestOfN(k), "unbiased")
            pos, neg = _pass_at_k_advantage(G, c, k)
            expected = torch.where(r == 1, r.new_tensor(float(pos)), r.new_tensor(float(neg))) * k
            torch.testing.assert_close(s, expected, rtol=0, atol=1e-12)
            assert c * pos + (G - c) * neg == 0  # the closed form is centred


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
def test_ties_bit_identical_and_permutation_exact(dtype: torch.dtype, estimator: str) -> None:
    g = torch.Generator().manual_seed(7)
    G = 9
    r = random_rewards(8, G, ties=True, dtype=dtype, generator=g)
    transforms = [Mean(), SoftBestOfN(0.5), SoftBestOfN(1e-3)] + [BestOfN(n) for n in range(1, G + 1)]
    for t in transforms:
        s = _fv(r, t, estimator)
        for _ in range(4):
            perm = torch.randperm(G, generator=g)
            s_perm = _fv(r[:, perm], t, estimator)
            assert torch.equal(s_perm, s[:, perm]), (t, estimator, dtype)
        for b in range(r.shape[0]):
            for value in r[b].unique():
                tied = s[b][r[b] == value]
                assert torch.equal(tied, tied[:1].expand_as(tied)), (t, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_constant_groups_are_exactly_zero(dtype: torch.dtype) -> None:
    r = torch.tensor([[2.5] * 6, [-1e4] * 6, [0.0] * 6], dtype=dtype)
    for est in ("plugin", "unbiased"):
        for t in (Mean(), BestOfN(1), BestOfN(3), BestOfN(6), SoftBestOfN(1e-6), SoftBestOfN(10.0)):
            s = _fv(r, t, est)
            assert bool((s == 0).all()), (t, est)


@pytest.mark.parametrize("G", [1000, 1024])
def test_large_groups_match_logspace_and_integration(G: int) -> None:
    g = torch.Generator().manual_seed(G)
    r = random_rewards(2, G, ties=True, dtype=torch.float64, generator=g)
    top = float(r.abs().max())
    for n in [1, 2, 7, 100, 511, G - 1, G]:
        s = _fv(r, BestOfN(n), "unbiased")
        assert bool(torch.isfinite(s).all())
        # The lgamma oracle itself is accurate to ~1e-12 relative at G = 1024 (measured 4e-12).
        torch.testing.assert_close(s, logspace_unbiased_first_variation(r, n), rtol=0, atol=5e-11 * n * top)
        sp = _fv(r, BestOfN(n), "plugin")
        assert bool(torch.isfinite(sp).all())
        oracle = torch.stack([plugin_by_integration(r[b], n) for b in range(r.shape[0])])
        torch.testing.assert_close(sp, oracle, rtol=0, atol=1e-13 * n * top)
        # float32: finite and within the measured tolerance of float64.
        for est in ("plugin", "unbiased"):
            s32 = _fv(r.float(), BestOfN(n), est)
            s64 = _fv(r.float().double(), BestOfN(n), est)
            assert bool(torch.isfinite(s32).all())
            assert float((s32.double() - s64).abs().max()) <= F32_FACTOR * EPS32 * n * top


@pytest.mark.parametrize("G", [2, 7, 64, 257])
def test_float32_error_against_float64(G: int) -> None:
    g = torch.Generator().manual_seed(G)
    r = 3 * random_rewards(8, G, ties=True, dtype=torch.float32, generator=g)
    for est in ("plugin", "unbiased"):
        transforms = [Mean(), SoftBestOfN(0.3), SoftBestOfN(0.01)]
        for t in transforms + [BestOfN(n) for n in sorted({1, 2, G // 2, G})]:
            s32 = _fv(r, t, est)
            s64 = _fv(r.double(), t, est)
            assert s32.dtype == torch.float32 and s64.dtype == torch.float64
            assert float((s32.double() - s64).abs().max()) <= F32_FACTOR * EPS32 * _scale(t, r), (t, est)


def test_soft_best_of_n_matches_formula() -> None:
    g = torch.Generator().manual_seed(3)
    r = random_rewards(8, 7, ties=True, dtype=torch.float64, generator=g)
    for tau in (1e-3, 0.09, 0.5, 3.0, 1e6):
        s = _fv(r, SoftBestOfN(tau))
        for b in range(r.shape[0]):
            oracle, _ = soft_best_of_n_oracle(r[b], tau)
            torch.testing.assert_close(s[b], oracle, rtol=0, atol=1e-12 * _scale(SoftBestOfN(tau), r))
        # SoftBestOfN ignores the estimator (it has only its plug-in).
        assert torch.equal(s, _fv(r, SoftBestOfN(tau), "unbiased"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_best_of_n_finite_for_huge_reward_over_tau(dtype: torch.dtype) -> None:
    r = torch.tensor([[0.0, 1.0, 1.0, 2.0], [-3e4, 5e4, 5e4, 1e4]], dtype=dtype)
    # tau = 1e-50 underflows to 0 in float32 arithmetic; the result must still be finite.
    for tau in (1e-300, 1e-50, 1e-30, 1e-6, 1e30, 1e300):
        s = _fv(r, SoftBestOfN(tau))
        assert bool(torch.isfinite(s).all()), tau
        for b in range(r.shape[0]):
            oracle, _ = soft_best_of_n_oracle(r[b], tau)
            tol = 64 * torch.finfo(dtype).eps * _scale(SoftBestOfN(tau), r[b])
            torch.testing.assert_close(s[b].double(), oracle, rtol=0, atol=tol)


def test_leading_dims_and_non_contiguous_inputs() -> None:
    g = torch.Generator().manual_seed(5)
    r = random_rewards(24, 5, ties=True, dtype=torch.float64, generator=g)
    for t, est in [(BestOfN(3), "unbiased"), (BestOfN(4), "plugin"), (SoftBestOfN(0.2), "plugin")]:
        flat = _fv(r, t, est)
        assert torch.equal(_fv(r.reshape(2, 3, 4, 5), t, est), flat.reshape(2, 3, 4, 5))
        # Non-contiguous views give the same values (up to the summation order of the reductions).
        rt = r.t().contiguous().t()
        assert not rt.is_contiguous()
        torch.testing.assert_close(_fv(rt, t, est), flat, rtol=0, atol=1e-14)
        strided = torch.zeros(24, 10, dtype=torch.float64)
        strided[:, ::2] = r
        torch.testing.assert_close(_fv(strided[:, ::2], t, est), flat, rtol=0, atol=1e-14)
    assert _fv(torch.zeros(0, 5), BestOfN(2)).shape == (0, 5)


def test_shift_and_scale_behaviour() -> None:
    g = torch.Generator().manual_seed(11)
    r = random_rewards(8, 6, ties=False, dtype=torch.float64, generator=g)
    for t, est in [(BestOfN(3), "unbiased"), (BestOfN(3), "plugin"), (Mean(), "plugin")]:
        s = _fv(r, t, est)
        torch.testing.assert_close(_fv(r + 7.25, t, est), s, rtol=0, atol=1e-12)
        torch.testing.assert_close(_fv(2.5 * r, t, est), 2.5 * s, rtol=0, atol=1e-12)
    # SoftBestOfN: scaling rewards and tau together scales s.
    torch.testing.assert_close(_fv(2.5 * r, SoftBestOfN(0.75)), 2.5 * _fv(r, SoftBestOfN(0.3)),
                               rtol=0, atol=1e-12)


# --- property tests (hypothesis) ---------------------------------------------------------------

_levels = st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0])
_reals = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def _groups(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    G = draw(st.integers(1, 7))
    B = draw(st.integers(1, 3))
    values = draw(st.lists(st.one_of(_levels, _reals), min_size=B * G, max_size=B * G))
    n = draw(st.integers(1, G))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.tensor(values, dtype=dtype).reshape(B, G), n


@settings(max_examples=60, deadline=None)
@given(_groups(), st.sampled_from(["plugin", "unbiased"]))
def test_property_against_oracles(group: tuple[torch.Tensor, int], estimator: str) -> None:
    r, n = group
    s = _fv(r, BestOfN(n), estimator)
    assert s.dtype == r.dtype and s.shape == r.shape
    assert bool(torch.isfinite(s).all())
    tol = (1e-12 if r.dtype == torch.float64 else F32_FACTOR * EPS32) * _scale(BestOfN(n), r)
    for b in range(r.shape[0]):
        oracle = brute_force_unbiased(r[b], n) if estimator == "unbiased" else plugin_by_integration(r[b], n)
        assert float((s[b].double() - oracle).abs().max()) <= tol
        assert abs(float(s[b].double().sum())) <= r.shape[1] * tol  # centred
        for value in r[b].unique():
            tied = s[b][r[b] == value]
            assert torch.equal(tied, tied[:1].expand_as(tied))


# --- the shared testing helpers themselves ----------------------------------------------------


def test_random_rewards_kinds() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        r = random_rewards(8, 16, ties=True, dtype=dtype, generator=g)
        assert r.shape == (8, 16) and r.dtype == dtype
        for b in range(8):
            distinct = r[b].unique().numel()
            kind = b % 4
            if kind in (0, 1):  # ties
                assert distinct < 16
            elif kind == 2:  # binary
                assert set(r[b].tolist()) <= {0.0, 1.0}
            else:  # constant
                assert distinct == 1
        assert random_rewards(4, 3, ties=True, m=2, generator=g).shape == (4, 3, 2)
    free = random_rewards(3, 50, ties=False, dtype=torch.float64, generator=g)
    assert all(free[b].unique().numel() == 50 for b in range(3))


def test_reference_pair_and_assert_matches_reference() -> None:
    from iama_kernels.testing import assert_matches_reference, reference_pair

    g = torch.Generator().manual_seed(1)
    r = random_rewards(8, 9, ties=True, dtype=torch.float32, generator=g)
    oracle64, ref = reference_pair(first_variation, r, BestOfN(4), estimator="unbiased")
    assert oracle64.dtype == torch.float64 and ref.dtype == torch.float32
    assert_matches_reference(ref, oracle64, ref)
    bad = ref.clone()
    bad[3, 4] += 1e-3
    with pytest.raises(AssertionError, match="exceeds"):
        assert_matches_reference(bad, oracle64, ref)
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_reference(ref[:4], oracle64, ref)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_matches_reference(torch.full_like(ref, float("nan")), oracle64, ref)


def test_oracles_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n"):
        brute_force_unbiased([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="1-D"):
        plugin_by_integration(torch.zeros(2, 2), 2)

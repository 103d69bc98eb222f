"""The exact BestOfN weight tables of ``iama_kernels._weights`` against exact rationals, lgamma
weights and their defining identities."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from iama_kernels import BestOfN, first_variation
from iama_kernels._weights import (
    first_variation_matrix,
    plugin_increments,
    unbiased_others_weights,
    unbiased_prefix_sums,
    value_weights,
)
from iama_kernels.testing import logspace_unbiased_weights, random_rewards

SMALL = [(G, n) for G in (1, 2, 3, 5, 8, 13) for n in range(1, G + 1)]


def _rel_close(got: tuple[float, ...], want: list[Fraction] | list[float], rel: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert abs(a - float(b)) <= rel * max(abs(float(b)), 1e-300), (a, b)


@pytest.mark.parametrize(("G", "n"), SMALL)
def test_tables_equal_exact_rationals(G: int, n: int) -> None:
    # Correctly rounded: equal to the float of the exact rational.
    others = [Fraction(n * math.comb(k - 1, n - 2), math.comb(G - 1, n - 1)) if n >= 2 else Fraction(0)
              for k in range(1, G)]
    assert unbiased_others_weights(G, n) == tuple(float(f) for f in others)
    prefix = [Fraction(n * math.comb(j, n - 1), math.comb(G - 1, n - 1)) if n >= 2 else Fraction(1)
              for j in range(G)]
    assert unbiased_prefix_sums(G, n) == tuple(float(f) for f in prefix)
    vu = [Fraction(math.comb(k - 1, n - 1), math.comb(G, n)) for k in range(1, G + 1)]
    assert value_weights(G, n, "unbiased") == tuple(float(f) for f in vu)
    vp = [Fraction(k, G) ** n - Fraction(k - 1, G) ** n for k in range(1, G + 1)]
    _rel_close(value_weights(G, n, "plugin"), vp, 1e-14)
    _rel_close(plugin_increments(G, n), [n * Fraction(k, G) ** (n - 1) for k in range(1, G)], 1e-14)


@pytest.mark.parametrize(("G", "n"), SMALL)
def test_identities(G: int, n: int) -> None:
    # value weights sum to 1; prefix sums are cumulative sums of the others' weights (hockey stick)
    # and reach n (each sample's coefficients sum to n, so s shifts by n c when r shifts by c).
    for est in ("plugin", "unbiased"):
        assert math.fsum(value_weights(G, n, est)) == pytest.approx(1.0, abs=1e-14)
    a = unbiased_others_weights(G, n)
    A = unbiased_prefix_sums(G, n)
    if n >= 2:
        for j in range(G):
            assert A[j] == pytest.approx(math.fsum(a[:j]), abs=1e-13)
        for p in range(G):
            assert A[p] + math.fsum(a[p:]) == pytest.approx(n, rel=1e-14)


@pytest.mark.parametrize("G", [64, 257, 1000, 1024])
def test_large_tables_match_logspace(G: int) -> None:
    for n in sorted({1, 2, 3, 10, G // 3, G // 2, G - 1, G}):
        ls = logspace_unbiased_weights(G, n)
        a = torch.tensor(unbiased_others_weights(G, n), dtype=torch.float64)
        v = torch.tensor(value_weights(G, n, "unbiased"), dtype=torch.float64)
        assert bool(torch.isfinite(a).all() and torch.isfinite(v).all())
        # lgamma-based weights carry ~G log G * 1e-16 relative error.
        torch.testing.assert_close(a, ls.others, rtol=2e-11, atol=1e-300)
        torch.testing.assert_close(v, ls.value, rtol=2e-11, atol=1e-300)
        assert bool(torch.isfinite(torch.tensor(plugin_increments(G, n))).all())
        assert math.fsum(value_weights(G, n, "plugin")) == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize(("G", "n"), [(1, 1), (4, 1), (5, 2), (7, 4), (9, 9), (6, 8)])
def test_matrix_reproduces_first_variation(G: int, n: int) -> None:
    g = torch.Generator().manual_seed(G * 10 + n)
    r = random_rewards(6, G, ties=True, dtype=torch.float64, generator=g)
    xs = torch.sort(r, dim=-1).values
    for est in ("plugin", "unbiased"):
        if est == "unbiased" and n > G:
            continue
        W = first_variation_matrix(G, n, est)
        assert W.shape == (G, G) and W.dtype == torch.float64
        s_sorted = xs @ W.T
        s_sorted = s_sorted - s_sorted.mean(-1, keepdim=True)
        want = torch.sort(r, dim=-1, stable=True)
        got = first_variation(want.values, BestOfN(n), estimator=est, impl="reference")
        torch.testing.assert_close(got, s_sorted, rtol=0, atol=1e-12)
        assert first_variation_matrix(G, n, est, dtype=torch.float32).dtype == torch.float32
    if n == 1:
        assert torch.equal(first_variation_matrix(G, 1, "plugin"), torch.eye(G, dtype=torch.float64))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="G"):
        value_weights(0, 1, "plugin")
    with pytest.raises(ValueError, match="n"):
        plugin_increments(4, 0)
    with pytest.raises(ValueError, match="estimator"):
        value_weights(4, 2, "exact")
    with pytest.raises(ValueError, match="G >= n"):
        unbiased_others_weights(3, 4)

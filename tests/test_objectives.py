"""The objective vocabulary: validation, immutability, and lambda = dg/dR against finite
differences of g."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from iama_kernels import BestOfN, Criterion, Mean, Min, Objective, SmoothMin, SoftBestOfN, WeightedSum
from iama_kernels.objectives import as_objective


def _finite_difference_gradient(g: object, R: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of ``g.value`` at each row of ``R [K, m]`` (float64)."""
    grad = torch.empty_like(R)
    for i in range(R.shape[-1]):
        e = torch.zeros_like(R)
        e[..., i] = h
        grad[..., i] = (g.value(R + e) - g.value(R - e)) / (2 * h)
    return grad


def test_transforms_validate_and_are_frozen() -> None:
    assert BestOfN(np.int64(4)).n == 4 and type(BestOfN(np.int64(4)).n) is int
    assert SoftBestOfN(1).tau == 1.0
    for bad, err in [(0, ValueError), (-3, ValueError), (2.5, TypeError), (2.0, TypeError),
                     (True, TypeError), ("4", TypeError)]:
        with pytest.raises(err, match="n"):
            BestOfN(bad)
    for bad, err in [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                     (float("nan"), ValueError), ("1", TypeError), (True, TypeError)]:
        with pytest.raises(err, match="tau"):
            SoftBestOfN(bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BestOfN(2).n = 3  # type: ignore[misc]
    # Hashable and equal by value: usable as cache keys.
    assert hash(BestOfN(3)) == hash(BestOfN(3)) and BestOfN(3) == BestOfN(3) != BestOfN(4)
    assert len({Mean(), Mean(), SoftBestOfN(0.1), SoftBestOfN(0.1)}) == 2
    assert repr(BestOfN(4)) == "BestOfN(4)" and repr(Mean()) == "Mean()"


def test_criterion_and_objective_validation() -> None:
    with pytest.raises(TypeError, match="name"):
        Criterion("", Mean())
    with pytest.raises(TypeError, match="transform"):
        Criterion("a", "best_of_4")  # type: ignore[arg-type]
    a, b = Criterion("a", BestOfN(4)), Criterion("b", SoftBestOfN(0.1))
    with pytest.raises(ValueError, match="unique"):
        Objective([a, Criterion("a", Mean())])
    with pytest.raises(ValueError, match="criteria"):
        Objective([])
    with pytest.raises(ValueError, match="weights"):
        Objective([a, b], WeightedSum([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        Objective([a, b], SmoothMin([1.0], gamma=2.0))
    with pytest.raises(TypeError, match="aggregate"):
        Objective([a, b], "min")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Criterion"):
        Objective([a, BestOfN(2)])  # type: ignore[list-item]
    obj = Objective([a, b])
    assert obj.aggregate == WeightedSum([0.5, 0.5])
    assert obj.names == ("a", "b") and obj.transforms == (BestOfN(4), SoftBestOfN(0.1))
    assert len(obj) == 2 and obj.max_n() == 4
    assert Objective([b]).max_n() == 1
    assert Objective(a) == Objective([a])
    assert hash(Objective([a, b], Min())) == hash(Objective([a, b], Min()))


def test_as_objective() -> None:
    assert as_objective(BestOfN(3)) == Objective([Criterion("reward", BestOfN(3))])
    c = Criterion("len", Mean())
    assert as_objective(c) == Objective([c])
    obj = Objective([c], Min())
    assert as_objective(obj) is obj
    with pytest.raises(TypeError, match="objective"):
        as_objective(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("Agg", [WeightedSum, SmoothMin])
def test_weight_validation(Agg: type) -> None:
    kwargs = {"gamma": 1.0} if Agg is SmoothMin else {}
    for bad, err in [([0.0, 0.0], ValueError), ([1.0, -0.5], ValueError), ([], ValueError),
                     ([float("nan"), 1.0], ValueError), ([1.0, "a"], TypeError), ("ab", TypeError),
                     (1.0, TypeError)]:
        with pytest.raises(err, match="weights"):
            Agg(bad, **kwargs)
    assert Agg((1, 0), **kwargs).weights == (1.0, 0.0)


def test_smooth_min_gamma_validation() -> None:
    for bad, err in [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError)]:
        with pytest.raises(err, match="gamma"):
            SmoothMin([1.0, 1.0], gamma=bad)


def test_lambda_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    R = torch.randn(20, 3, generator=g, dtype=torch.float64)
    for agg in [WeightedSum([0.2, 0.5, 0.3]), WeightedSum([1.0, 0.0, 2.0]),
                SmoothMin([0.2, 0.5, 0.3], gamma=3.0), SmoothMin([1.0, 0.0, 1.0], gamma=0.5), Min()]:
        lam = agg.gradient(R)
        assert lam.shape == R.shape and lam.dtype == torch.float64
        torch.testing.assert_close(lam, _finite_difference_gradient(agg, R), rtol=0, atol=1e-8)


def test_aggregator_values() -> None:
    R = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(WeightedSum([0.2, 0.5, 0.3]).value(R),
                               torch.tensor([0.2 - 1.0 + 0.15, 0.6 + 1.5 + 1.2], dtype=torch.float64))
    assert torch.equal(Min().value(R), torch.tensor([-2.0, 3.0], dtype=torch.float64))
    sm = SmoothMin([0.2, 0.5, 0.3], gamma=2.0)
    want = -torch.log((torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64) * torch.exp(-2.0 * R)).sum(-1)) / 2
    torch.testing.assert_close(sm.value(R), want, rtol=1e-14, atol=0)
    # Large gamma approaches Min (with equal weights summing to 1), and stays finite for large R.
    big = SmoothMin([1 / 3] * 3, gamma=1e4)
    torch.testing.assert_close(big.value(R), Min().value(R), rtol=0, atol=2e-4)
    huge = torch.tensor([[1e6, -1e6, 0.0]], dtype=torch.float64)
    assert bool(torch.isfinite(big.value(huge)).all() and torch.isfinite(big.gradient(huge)).all())
    torch.testing.assert_close(big.gradient(huge), torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))


def test_min_ties_split_evenly_and_zero_weights() -> None:
    R = torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0], [5.0, -1.0, 3.0]], dtype=torch.float64)
    want = torch.tensor([[0.5, 0.5, 0.0], [1 / 3] * 3, [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(Min().gradient(R), want)
    lam = SmoothMin([1.0, 0.0, 1.0], gamma=1.0).gradient(R)
    assert bool((lam[:, 1] == 0).all())
    torch.testing.assert_close(lam.sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(WeightedSum([1.0, 0.0, 2.0]).gradient(R), torch.tensor([[1.0, 0.0, 2.0]] * 3,
                                                                            dtype=torch.float64))


def test_aggregator_weights_are_built_once_off_the_cpu() -> None:
    """Off the CPU the weight tensor is cached (a tensor built from floats on a GPU is a
    host-to-device copy that waits for the stream); ``meta`` stands in for a GPU here. It is an
    ordinary tensor even when first built under inference mode, and results do not change."""
    from iama_kernels.objectives import _weights_like

    values = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    for agg in (WeightedSum([0.25, 0.75]), SmoothMin([1.0, 3.0], 1.5)):
        on_meta = torch.empty(2, 2, device="meta")
        with torch.inference_mode():
            first = _weights_like(agg.weights, on_meta)
        assert _weights_like(agg.weights, on_meta) is first and not first.is_inference()
        assert agg.gradient(on_meta).shape == (2, 2) and agg.value(on_meta).shape == (2,)
        cpu = _weights_like(agg.weights, values)
        assert cpu is not _weights_like(agg.weights, values)  # the CPU builds it each time
        assert torch.equal(cpu, torch.tensor(agg.weights))
        # The same numbers as the direct formulas.
        w = torch.tensor(agg.weights)
        if isinstance(agg, WeightedSum):
            expected = w.expand(2, 2)
        else:
            expected = torch.softmax(w.log() - 1.5 * values, dim=-1)
        assert torch.equal(agg.gradient(values), expected)

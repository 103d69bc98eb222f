"""Order-statistic weight tables for the BestOfN estimators (SPEC sections 2-3).

Every BestOfN estimator is linear in the group's sorted rewards, with coefficients that depend
only on (G, n, estimator). They are computed here once, in float64, from exact integer binomials
(Python's ``int / int`` division is correctly rounded), so G up to 1024 and any 1 <= n <= G stay
finite and accurate; backends cache them per device and dtype.

Notation: ``x_1 <= ... <= x_G`` are a group's sorted rewards (1-indexed in the docs, 0-indexed
in the arrays).

* ``plugin_increments(G, n)[k-1] = c_k = n (k/G)^(n-1)``, k = 1..G-1:
  ``s_(1) = 0, s_(k+1) = s_(k) + c_k (x_{k+1} - x_k)``.
* ``unbiased_others_weights(G, n)[k-1] = a_k = n C(k-1, n-2) / C(G-1, n-1)``, k = 1..G-1: the
  weight of the k-th smallest *other* reward in the leave-one-out U-statistic. The sample at
  sorted position p gets ``s_(p) = x_p A_(p-1) + sum_{q > p} a_(q-1) x_q`` with
  ``A_j = a_1 + ... + a_j = n C(j, n-1) / C(G-1, n-1)`` (hockey-stick identity).
* ``first_variation_matrix(G, n, est)``: the ``[G, G]`` matrix ``W`` with ``s_sorted = W x``.
* ``value_weights(G, n, est)``: ``[G]`` weights ``v`` with the group value ``R_hat = v . x``.

``n = 1`` is plain GRPO for both estimators: ``s_j = r_j`` (identity matrix), ``R_hat`` the mean.
"""

from __future__ import annotations

import functools
from math import comb

import torch

__all__ = [
    "first_variation_matrix",
    "plugin_increments",
    "unbiased_others_weights",
    "unbiased_prefix_sums",
    "value_weights",
]

ESTIMATORS = ("plugin", "unbiased")


def _check(G: int, n: int, estimator: str) -> None:
    if G < 1:
        raise ValueError(f"group size G must be >= 1, got {G}")
    if n < 1:
        raise ValueError(f"BestOfN n must be >= 1, got {n}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "unbiased" and n > G:
        raise ValueError(f"estimator='unbiased' needs G >= n, got G={G} < n={n}")


@functools.lru_cache(maxsize=256)
def plugin_increments(G: int, n: int) -> tuple[float, ...]:
    """``c_k = n (k/G)^(n-1)`` for k = 1..G-1 (length G-1)."""
    _check(G, n, "plugin")
    return tuple(n * (k / G) ** (n - 1) for k in range(1, G))


@functools.lru_cache(maxsize=256)
def unbiased_others_weights(G: int, n: int) -> tuple[float, ...]:
    """``a_k = n C(k-1, n-2) / C(G-1, n-1)`` for k = 1..G-1 (length G-1); all 0 when n = 1."""
    _check(G, n, "unbiased")
    if n == 1:
        return (0.0,) * (G - 1)
    denom = comb(G - 1, n - 1)
    return tuple((n * comb(k - 1, n - 2)) / denom for k in range(1, G))


@functools.lru_cache(maxsize=256)
def unbiased_prefix_sums(G: int, n: int) -> tuple[float, ...]:
    """``A_j = n C(j, n-1) / C(G-1, n-1)`` for j = 0..G-1 (length G); the weight of ``x_p`` itself
    for the sample at position p = j + 1. All 1 when n = 1 (the sample is its own maximum)."""
    _check(G, n, "unbiased")
    if n == 1:
        return (1.0,) * G
    denom = comb(G - 1, n - 1)
    return tuple((n * comb(j, n - 1)) / denom for j in range(G))


@functools.lru_cache(maxsize=256)
def value_weights(G: int, n: int, estimator: str) -> tuple[float, ...]:
    """Weights ``v_k`` (k = 1..G) with the group value ``R_hat = sum_k v_k x_k`` (sum to 1).

    plugin:   ``v_k = (k/G)^n - ((k-1)/G)^n``;
    unbiased: ``v_k = C(k-1, n-1) / C(G, n)`` (0 for k < n).
    """
    _check(G, n, estimator)
    if estimator == "plugin":
        return tuple((k / G) ** n - ((k - 1) / G) ** n for k in range(1, G + 1))
    denom = comb(G, n)
    return tuple(comb(k - 1, n - 1) / denom for k in range(1, G + 1))


@functools.lru_cache(maxsize=64)
def _first_variation_matrix_f64(G: int, n: int, estimator: str) -> torch.Tensor:
    _check(G, n, estimator)
    W = torch.zeros(G, G, dtype=torch.float64)
    if n == 1:
        return torch.eye(G, dtype=torch.float64)
    if estimator == "plugin":
        c = torch.tensor(plugin_increments(G, n), dtype=torch.float64)
        # s_(p) = sum_{k<p} c_k (x_{k+1} - x_k): +c_k on column k+1 and -c_k on column k.
        for p in range(G):
            W[p, 1 : p + 1] += c[:p]
            W[p, :p] -= c[:p]
        return W
    a = torch.tensor(unbiased_others_weights(G, n), dtype=torch.float64)
    A = torch.tensor(unbiased_prefix_sums(G, n), dtype=torch.float64)
    for p in range(G):
        W[p, p] = A[p]
        W[p, p + 1 :] = a[p:]
    return W


def first_variation_matrix(
    G: int,
    n: int,
    estimator: str,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[G, G]`` matrix ``W`` with ``s_sorted = W @ x_sorted`` (before centring)."""
    return _first_variation_matrix_f64(G, n, estimator).to(dtype=dtype, device=device)

"""Exact non-linear mirror descent on a finite outcome space: the theory, checked numerically.

A policy here is a probability vector ``pi`` over ``K`` outcomes; outcome ``k`` has one reward per
criterion, ``rewards[k, i]``. Every quantity is the exact population one (no sampling):

* ``R_i[pi]``, the value of criterion ``i`` after its inference-time transform;
* ``s_i(y) = dR_i/dpi(y)``, its first variation at ``pi``, and ``s = sum_i lambda_i s_i`` with
  ``lambda = dg/dR`` from the aggregator;
* the exact mirror step
  ``pi_{t+1} ∝ exp((eta s + eta beta log pi_ref + log pi_t) / (1 + eta beta))``,
  which maximises ``eta <s, pi> - eta beta KL(pi || pi_ref) - KL(pi || pi_t)`` over the simplex.

Transforms on a finite outcome space (``C`` the CDF of ``r(Y)``, ``Y ~ pi``, a step function):

* ``Mean``: ``R = sum_k pi_k r_k``, ``s = r``.
* ``BestOfN(n)``: ``R = E max(r(Y_1), ..., r(Y_n)) = r_max - int C(t)^n dt``,
  ``s(y) = -int_{r(y)}^{r_max} n C(t)^{n-1} dt``. Both integrals are finite sums over the gaps
  between consecutive sorted rewards; tied outcomes share one CDF value (the one at the end of
  their run), so they get bit-identical ``s``.
* ``SoftBestOfN(tau)``: ``R = sum pi e^{r/tau} r / Z``, ``s = (e^{r/tau} / Z)(r - R)``,
  ``Z = sum pi e^{r/tau}`` (computed with ``r - r_max`` in the exponent).

Everything is float64 and the iterates are kept as log-probabilities (the update is one
log-softmax), so that probabilities far below the float64 range never underflow to a NaN.

The default step is ``eta = 1/L`` with ``L`` from :func:`smoothness_constant`, a bound on the
smoothness of the objective relative to KL (``R(q) >= R(p) + <s_p, q - p> - L KL(q || p)``), the
hypothesis of the linear-convergence theorem (see ``docs/math.md``). ``eta="backtracking"``
finds each step's size by trial instead, testing that inequality between the two iterates only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from iama_kernels.objectives import (
    BestOfN,
    Criterion,
    Mean,
    Min,
    Objective,
    SmoothMin,
    Transform,
    WeightedSum,
    as_objective,
)

__all__ = [
    "MirrorDescentResult",
    "kl_divergence",
    "mirror_descent",
    "objective_value",
    "population_first_variation",
    "population_values",
    "smoothness_constant",
    "toy_optimum",
    "toy_optimum_density",
    "toy_problem",
]

_DTYPE = torch.float64


@dataclass(frozen=True)
class MirrorDescentResult:
    """What :func:`mirror_descent` returns.

    Attributes:
        pi: ``[K]`` float64, the final policy (``exp(log_pi)``).
        values: ``[steps + 1]`` float64, ``g(R[pi_t]) - beta KL(pi_t || pi_ref)`` for
            ``t = 0..steps`` (``values[0]`` is the starting policy's).
        log_pi: ``[K]`` float64, the final policy's log-probabilities (``-inf`` off its support).
        eta: the step size used (with ``eta="backtracking"``, the last step's).
        L: the relative-smoothness constant of :func:`smoothness_constant` (``eta = 1/L`` unless
            ``eta`` was given).
        etas: ``[steps]`` float64, each step's size with ``eta="backtracking"``; ``None``
            otherwise (every step is ``eta``).
    """

    pi: torch.Tensor
    values: torch.Tensor
    log_pi: torch.Tensor
    eta: float
    L: float
    etas: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# Argument handling


def _as_rewards(rewards: object, objective: object) -> tuple[torch.Tensor, Objective]:
    """Rewards as a float64 ``[K, m]`` tensor and the objective as an :class:`Objective`."""
    objective = as_objective(objective, "objective")  # TypeError for anything else
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must have a floating dtype, got {rewards.dtype}")
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(-1)
    if rewards.dim() != 2 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must have shape [K] or [K, m] with K >= 1, got {tuple(rewards.shape)}")
    if rewards.shape[1] != len(objective):
        raise ValueError(
            f"rewards has {rewards.shape[1]} criteria on its last axis but objective has "
            f"{len(objective)} ({', '.join(objective.names)})"
        )
    rewards = rewards.detach().to(device="cpu", dtype=_DTYPE)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite")
    return rewards, objective


def _as_distribution(name: str, p: object, K: int) -> torch.Tensor:
    """A ``[K]`` probability vector in float64, renormalised to sum exactly to 1."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {p.dtype}")
    if tuple(p.shape) != (K,):
        raise ValueError(f"{name} must have shape [K] = [{K}], got {tuple(p.shape)}")
    p = p.detach().to(device="cpu", dtype=_DTYPE)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    total = float(p.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {total}")
    return p / total


def _as_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    return float(beta)


def _log(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p.log(), torch.full_like(p, -math.inf))


# --------------------------------------------------------------------------------------------
# Exact population values and first variations


class _Criterion:
    """One criterion's rewards, sorted once, and its exact ``R`` and ``s`` at any ``pi``."""

    def __init__(self, r: torch.Tensor, transform: Transform) -> None:
        self.r = r
        self.transform = transform
        if isinstance(transform, BestOfN) and transform.n > 1:
            self.order = torch.sort(r, stable=True).indices
            self.inverse = torch.argsort(self.order)
            self.sorted = r[self.order]
            self.gaps = self.sorted.diff()  # exactly 0 inside a run of ties
            # Each member of a run of ties reads its run's last sorted position.
            self.last_of_run = torch.searchsorted(self.sorted, self.sorted, right=True) - 1

    def value_and_variation(
        self, pi: torch.Tensor, log_pi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, s)`` at ``pi [K]`` (``log_pi`` its log): the value (0-dim) and the uncentred first
        variation ``[K]``, float64."""
        t = self.transform
        if isinstance(t, Mean) or (isinstance(t, BestOfN) and t.n == 1):
            return (pi * self.r).sum(), self.r
        if isinstance(t, BestOfN):
            n = t.n
            # C[j] = P(r(Y) <= sorted[j]) for j = 0..K-2: the CDF on the gap [sorted[j], sorted[j+1]).
            cdf = torch.cumsum(pi[self.order], 0)[:-1].clamp(max=1.0)
            value = self.sorted[-1] - (cdf.pow(n) * self.gaps).sum()
            density = n * cdf.pow(n - 1) * self.gaps
            above = density.flip(0).cumsum(0).flip(0)  # above[j] = int_{sorted[j]}^{r_max} n C^{n-1}
            s_sorted = -torch.cat([above, above.new_zeros(1)])
            s_sorted = s_sorted[self.last_of_run]
            return value, s_sorted[self.inverse]
        # SoftBestOfN: the tilt pi e^{r/tau}/Z in log-space, so no exponent overflows.
        log_tilt = log_pi + (self.r - self.r.max()) / t.tau
        log_z = torch.logsumexp(log_tilt, 0)
        tilted = torch.exp(log_tilt - log_z)
        value = (tilted * self.r).sum()
        # e^{r/tau}/Z = tilted/pi, computed without dividing by a probability that may be 0.
        ratio = torch.exp((self.r - self.r.max()) / t.tau - log_z)
        return value, ratio * (self.r - value)


class _Problem:
    """Rewards, objective and per-criterion plans: evaluates ``R``, ``g(R)`` and ``s`` at ``pi``."""

    def __init__(self, rewards: torch.Tensor, objective: Objective) -> None:
        self.rewards = rewards
        self.objective = objective
        self.criteria = [_Criterion(rewards[:, i].contiguous(), c.transform)
                         for i, c in enumerate(objective.criteria)]

    def evaluate(self, pi: torch.Tensor, log_pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R [m], s [K, m])``."""
        parts = [c.value_and_variation(pi, log_pi) for c in self.criteria]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts], -1)

    def value(self, R: torch.Tensor) -> float:
        return float(self.objective.aggregate.value(R))

    def combined_variation(self, R: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        lam = self.objective.aggregate.gradient(R)
        return (s * lam).sum(-1)


def population_values(pi: torch.Tensor, rewards: torch.Tensor, objective: object) -> torch.Tensor:
    """Exact per-criterion values ``R_i[pi]``.

    Args:
        pi: ``[K]`` probabilities (any floating dtype; computed in float64).
        rewards: ``[K, m]`` (or ``[K]`` for one criterion) finite rewards.
        objective: an :class:`Objective` with ``m`` criteria, or a bare transform / criterion.

    Returns:
        ``[m]`` float64.
    """
    rewards, objective = _as_rewards(rewards, objective)
    pi = _as_distribution("pi", pi, rewards.shape[0])
    R, _ = _Problem(rewards, objective).evaluate(pi, _log(pi))
    return R


def population_first_variation(
    pi: torch.Tensor, rewards: torch.Tensor, objective: object, *, per_criterion: bool = False
) -> torch.Tensor:
    """Exact first variation at ``pi``: ``s(y) = sum_i lambda_i dR_i/dpi(y)``, ``lambda = dg/dR``.

    It is defined up to an additive constant; the one returned is not centred (``Mean``: ``s = r``;
    ``BestOfN``: 0 at the highest reward; ``SoftBestOfN``: zero ``pi``-mean). The directional
    derivative of ``g(R[pi])`` along ``pi + t (delta_y - pi)`` at ``t = 0`` is ``s(y) - E_pi s``.

    Args:
        pi: ``[K]`` probabilities. rewards: ``[K, m]`` or ``[K]``. objective: as in
            :func:`population_values`.
        per_criterion: return the ``[K, m]`` per-criterion ``dR_i/dpi`` instead of the combination.

    Returns:
        ``[K]`` (or ``[K, m]``) float64.
    """
    rewards, objective = _as_rewards(rewards, objective)
    pi = _as_distribution("pi", pi, rewards.shape[0])
    problem = _Problem(rewards, objective)
    R, s = problem.evaluate(pi, _log(pi))
    return s if per_criterion else problem.combined_variation(R, s)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """``KL(p || q) = sum_k p_k log(p_k / q_k)`` over the support of ``p`` (``inf`` if ``q`` misses it).

    Args:
        p, q: ``[K]`` probability vectors (computed in float64).
    """
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"p must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() != 1:
        raise ValueError(f"p must have shape [K], got {tuple(p.shape)}")
    p = _as_distribution("p", p, p.shape[0])
    q = _as_distribution("q", q, p.shape[0])
    return _kl_log(_log(p), _log(q))


def _kl_log(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    p = log_p.exp()
    support = p > 0
    if bool((support & torch.isneginf(log_q)).any()):
        return math.inf
    terms = torch.where(support, p * (log_p - torch.where(support, log_q, 0.0)), 0.0)
    return float(terms.sum())


def objective_value(
    pi: torch.Tensor,
    rewards: torch.Tensor,
    objective: object,
    *,
    beta: float = 0.0,
    pi_ref: torch.Tensor | None = None,
) -> float:
    """Exact regularised objective ``g(R_1[pi], ..., R_m[pi]) - beta KL(pi || pi_ref)``.

    Args:
        pi: ``[K]`` probabilities. rewards: ``[K, m]`` or ``[K]``. objective: as in
            :func:`population_values`.
        beta: KL coefficient ``>= 0``. pi_ref: ``[K]`` reference policy (uniform when ``None``).

    Returns:
        A Python float (``-inf`` when ``beta > 0`` and ``pi`` has mass where ``pi_ref`` has none).
    """
    rewards, objective = _as_rewards(rewards, objective)
    K = rewards.shape[0]
    pi = _as_distribution("pi", pi, K)
    beta = _as_beta(beta)
    problem = _Problem(rewards, objective)
    R, _ = problem.evaluate(pi, _log(pi))
    value = problem.value(R)
    if beta > 0:
        ref = torch.full((K,), 1.0 / K, dtype=_DTYPE) if pi_ref is None else _as_distribution(
            "pi_ref", pi_ref, K)
        value -= beta * _kl_log(_log(pi), _log(ref))
    return value


# --------------------------------------------------------------------------------------------
# Step size


def _criterion_constants(r: torch.Tensor, transform: Transform) -> tuple[float, float]:
    """``(L_i, D_i)``: relative smoothness of ``R_i`` and a bound on
    ``(R_i(q) - R_i(p))^2 / KL(q || p)``; ``Lip^2 / 2`` from ``|R_i(q) - R_i(p)| <= Lip TV(q, p)``
    and Pinsker's ``TV^2 <= KL / 2``."""
    spread = float(r.max() - r.min())
    if isinstance(transform, Mean) or (isinstance(transform, BestOfN) and transform.n == 1):
        return 0.0, spread**2 / 2.0  # linear: R(q) = R(p) + <r, q - p> exactly; Lip = spread
    if isinstance(transform, BestOfN):
        n = transform.n
        # R'' along q - p is -int n(n-1) C^{n-2} (C_q - C_p)^2 dt >= -n(n-1) spread TV^2, and
        # Pinsker (TV^2 <= KL/2) turns the Taylor remainder into -n(n-1) spread KL / 4.
        return n * (n - 1) * spread / 4.0, (n * spread) ** 2 / 2.0
    # SoftBestOfN: R(q) - R(p) - <s_p, q - p> = -(R_q - R_p)(Z_q - Z_p)/Z_p exactly. Two bounds,
    # each valid for every p, q (docs/math.md has both proofs), x = spread / tau:
    # * |Z_q - Z_p| <= TV, |R_q - R_p| <= spread e^x TV, Z_p >= e^{-x} and Pinsker: spread e^{2x} / 2;
    # * Bernstein's inequality through the Donsker-Varadhan formula on both factors:
    #   _SOFT_BERNSTEIN spread e^x, smaller once e^x > 2 _SOFT_BERNSTEIN (x > 2.23).
    # D: Lip = spread e^x, or the same steps' (R_q - R_p)^2 <= 2 _SOFT_BERNSTEIN spread^2 e^x KL.
    x = spread / transform.tau
    e_x, e_2x = _exp_or_inf(x), _exp_or_inf(2 * x)
    return (min(e_2x * spread / 2.0, _SOFT_BERNSTEIN * spread * e_x),
            min(e_2x * spread**2 / 2.0, 2 * _SOFT_BERNSTEIN * spread**2 * e_x))


# SoftBestOfN's second bound is psi(a(y)) <= C y with y = e^x KL, a(y) = sqrt(2y) + y/3 and psi
# from the two sign cases (docs/math.md); sup psi(a(y)) / y = 4.6424... (at a = 1/2), rounded up.
# The sharpest valid constant, found by search in the tests, is near 0.296: the default step is
# about 16x shorter than it could be (the first bound was up to e^x / 0.6 too long).
_SOFT_BERNSTEIN = 4.65


def _exp_or_inf(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def smoothness_constant(rewards: torch.Tensor, objective: object) -> float:
    """A constant ``L`` with ``F(q) >= F(p) + <s_p, q - p> - L KL(q || p)`` for all ``p, q``.

    ``F = g(R_1, ..., R_m)`` and ``s_p`` its first variation at ``p``; ``range_i`` is the spread of
    criterion ``i``'s rewards over all outcomes. Per criterion:

    * ``Mean`` (and ``BestOfN(1)``): 0, ``R`` is linear;
    * ``BestOfN(n)``: ``n (n-1) range / 4``;
    * ``SoftBestOfN(tau)``: ``range min(exp(2 x) / 2, 4.65 exp(x))`` with ``x = range / tau``;
      the search in the tests finds pairs up to ``0.296 range exp(x)``, so for large ``x`` the
      default step is about 16x shorter than the sharpest valid one (the transform is not
      concave, so only monotone ascent is guaranteed).

    Aggregation: ``WeightedSum(w)``: ``sum_i w_i L_i``. ``SmoothMin(w, gamma)``:
    ``max_i L_i + (gamma / 2) max_i D_i`` (``lambda`` sums to 1, the Hessian of ``g`` is bounded
    by ``gamma``, and ``(R_i(q) - R_i(p))^2 <= D_i KL``: ``D_i = Lip_i^2 / 2`` from
    ``|R_i(q) - R_i(p)| <= Lip_i TV`` with ``Lip_i`` = range, ``n`` range, and for
    ``SoftBestOfN`` ``range^2 min(e^{2x} / 2, 9.3 e^x)``). ``Min()``: ``max_i L_i`` (``min`` is
    not smooth: a step-size scale, not a guarantee).

    When this is 0 (a linear objective, for which any ``L >= 0`` is valid and any step size
    converges) the scale of the rewards is returned instead, ``sum_i w_i range_i`` for
    ``WeightedSum`` and ``max_i range_i`` otherwise, so that one step ``eta = 1/L`` changes the odds
    between two outcomes by at most a factor ``e``; 1.0 when every reward is constant.

    Args:
        rewards: ``[K, m]`` or ``[K]`` finite rewards. objective: as in :func:`population_values`.

    Returns:
        ``L`` as a Python float (``inf`` when ``exp`` overflows for a ``SoftBestOfN``).
    """
    rewards, objective = _as_rewards(rewards, objective)
    consts = [_criterion_constants(rewards[:, i], c.transform) for i, c in enumerate(objective.criteria)]
    spreads = [float(rewards[:, i].max() - rewards[:, i].min()) for i in range(len(objective))]
    agg = objective.aggregate
    if isinstance(agg, WeightedSum):
        L = sum(w * c[0] for w, c in zip(agg.weights, consts, strict=True))
        scale = sum(w * d for w, d in zip(agg.weights, spreads, strict=True))
    elif isinstance(agg, SmoothMin):
        L = max(c[0] for c in consts) + agg.gamma * max(c[1] for c in consts) / 2.0
        scale = max(spreads)
    elif isinstance(agg, Min):
        L = max(c[0] for c in consts)
        scale = max(spreads)
    else:  # pragma: no cover - Objective validates aggregators
        raise TypeError(f"unknown aggregator {agg!r}")
    if L > 0:
        return float(L)
    return float(scale) if scale > 0 else 1.0


# --------------------------------------------------------------------------------------------
# Mirror descent


def mirror_descent(
    rewards: torch.Tensor,
    objective: object,
    *,
    pi0: torch.Tensor | None = None,
    pi_ref: torch.Tensor | None = None,
    beta: float = 0.0,
    eta: float | str | None = None,
    steps: int = 1000,
    callback: Callable[[int, float], object] | None = None,
) -> MirrorDescentResult:
    """Exact non-linear mirror descent (ascent on ``g(R[pi]) - beta KL(pi || pi_ref)``).

    Each step computes the exact first variation ``s`` at ``pi_t`` and sets
    ``log pi_{t+1} = log_softmax((eta s + eta beta log pi_ref + log pi_t) / (1 + eta beta))``.
    Outcomes outside the support of ``pi0`` stay outside it (their log-probability is ``-inf``).

    Args:
        rewards: ``[K, m]`` (or ``[K]`` for one criterion) finite rewards of the ``K`` outcomes.
        objective: an :class:`Objective` with ``m`` criteria, or a bare transform / criterion.
        pi0: ``[K]`` starting policy; uniform when ``None``.
        pi_ref: ``[K]`` reference policy of the KL term; uniform when ``None``.
        beta: KL coefficient ``>= 0``.
        eta: step size ``> 0``; ``1 / smoothness_constant(rewards, objective)`` when ``None``;
            ``"backtracking"``: each step's size found by trial, starting from twice the last
            one (the first from ``1/L``, or 1 where ``L`` overflows) and halved until the step
            satisfies the relative-smoothness inequality it rests on,
            ``g(R[pi']) >= g(R[pi]) + <s, pi' - pi> - KL(pi' || pi) / eta`` (to rounding,
            ``1e-12 (1 + |g|)``), which makes every step an ascent on the regularised
            objective as the fixed ``1/L`` does; steps never go below ``1/L``, where the
            inequality holds by :func:`smoothness_constant`. Far from the worst case, as from a
            uniform start at a low ``SoftBestOfN`` temperature, steps are orders of magnitude
            longer than ``1/L``.
        steps: number of mirror steps ``>= 0``.
        callback: optional ``callback(t, value)`` called after each step (e.g. a progress bar).

    Returns:
        :class:`MirrorDescentResult` with the final ``pi`` and ``values[t]``, ``t = 0..steps``.
    """
    rewards, objective = _as_rewards(rewards, objective)
    K = rewards.shape[0]
    beta = _as_beta(beta)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    L = smoothness_constant(rewards, objective)
    backtracking = isinstance(eta, str)
    if backtracking:
        if eta != "backtracking":
            raise ValueError(f"eta must be a number > 0, None or 'backtracking', got {eta!r}")
        eta = 1.0 / L if math.isfinite(L) else 1.0
    elif eta is None:
        if not math.isfinite(L):
            raise ValueError("the smoothness bound overflows for these rewards and temperature: pass eta "
                             "(a number, or 'backtracking')")
        eta = 1.0 / L
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a real number, got {type(eta).__name__}")
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta must be finite and > 0, got {eta}")
    eta = float(eta)
    uniform = torch.full((K,), 1.0 / K, dtype=_DTYPE)
    log_pi = _log(uniform if pi0 is None else _as_distribution("pi0", pi0, K))
    log_ref = _log(uniform if pi_ref is None else _as_distribution("pi_ref", pi_ref, K))

    problem = _Problem(rewards, objective)
    values = torch.empty(steps + 1, dtype=_DTYPE)

    def evaluate(log_p: torch.Tensor) -> tuple[float, torch.Tensor]:
        p = log_p.exp()
        R, s = problem.evaluate(p, log_p)
        value = problem.value(R)
        if beta > 0:
            value -= beta * _kl_log(log_p, log_ref)
        return value, problem.combined_variation(R, s)

    def step(log_p: torch.Tensor, s: torch.Tensor, eta: float) -> torch.Tensor:
        if beta > 0:
            logits = (eta * s + (eta * beta) * log_ref + log_p) / (1.0 + eta * beta)
        else:  # log_ref may hold -inf, and 0 * -inf would be NaN
            logits = eta * s + log_p
        return torch.log_softmax(logits, 0)

    values[0], s = evaluate(log_pi)
    etas = torch.empty(steps, dtype=_DTYPE) if backtracking else None
    floor = 1.0 / L if math.isfinite(L) else 0.0
    for t in range(1, steps + 1):
        if not backtracking:
            log_pi = step(log_pi, s, eta)
            values[t], s = evaluate(log_pi)
        else:
            eta, log_pi, values[t], s = _backtracking_step(step, evaluate, log_pi, float(values[t - 1]), s,
                                                           2.0 * eta, floor, beta, log_ref)
            etas[t - 1] = eta
        if callback is not None:
            callback(t, float(values[t]))
    return MirrorDescentResult(pi=log_pi.exp(), values=values, log_pi=log_pi, eta=eta, L=L, etas=etas)


def _backtracking_step(step: Callable, evaluate: Callable, log_pi: torch.Tensor, value: float,
                       s: torch.Tensor, eta: float, floor: float, beta: float, log_ref: torch.Tensor
                       ) -> tuple[float, torch.Tensor, float, torch.Tensor]:
    """One mirror step from ``log_pi`` (whose regularised value is ``value`` and first variation
    ``s``) of the longest size ``eta / 2^j`` (``j >= 0``, never below ``floor``) whose new policy
    satisfies ``g(R') >= g(R) + <s, pi' - pi> - KL(pi' || pi) / eta`` to rounding.
    Returns ``(eta, log_pi', value', s')``."""
    pi = log_pi.exp()
    g_now = value + (beta * _kl_log(log_pi, log_ref) if beta > 0 else 0.0)
    eta = min(eta, 1e300)  # (doubling never reaches inf, whose halves stay inf)
    while True:
        if floor > 0 and eta <= floor:
            eta = floor  # where smoothness_constant guarantees the inequality: no test needed
        candidate = step(log_pi, s, eta)
        value_new, s_new = evaluate(candidate)
        if eta == floor:
            return eta, candidate, value_new, s_new
        g_new = value_new + (beta * _kl_log(candidate, log_ref) if beta > 0 else 0.0)
        linear = float((s * (candidate.exp() - pi)).sum())
        if g_new >= g_now + linear - _kl_log(candidate, log_pi) / eta - 1e-12 * (1.0 + abs(g_now)):
            return eta, candidate, value_new, s_new
        eta *= 0.5
        if not eta > 0:
            raise ValueError("eta='backtracking' found no step that satisfies the inequality: pass eta")


# --------------------------------------------------------------------------------------------
# The paper's Prop. 3.1 toy problem


def toy_problem(grid: int, n: int) -> tuple[torch.Tensor, torch.Tensor, Objective]:
    """Outcomes ``y`` on ``grid`` equally spaced points of ``[0, 1]``, rewards ``r_1 = 1 - y^2``
    and ``r_2 = 1 - (1 - y)^2``, both served by ``BestOfN(n)``, averaged (weights 1/2, 1/2).

    Returns:
        ``(y [grid], rewards [grid, 2], objective)``, float64.
    """
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    y = torch.linspace(0.0, 1.0, int(grid), dtype=_DTYPE)
    rewards = torch.stack([1 - y**2, 1 - (1 - y) ** 2], -1)
    objective = Objective(
        [Criterion("near 0", BestOfN(n)), Criterion("near 1", BestOfN(n))], WeightedSum([0.5, 0.5])
    )
    return y, rewards, objective


def toy_optimum(y: torch.Tensor, n: int) -> torch.Tensor:
    """The continuous optimum of :func:`toy_problem` (``n >= 2``, ``beta = 0``) on the grid ``y``.

    Its CDF is ``F(y) = y^a / (y^a + (1 - y)^a)``, ``a = 1/(n-1)``; grid point ``k`` gets the mass
    of its cell ``[y_k - h/2, y_k + h/2]`` clipped to ``[0, 1]`` (so the end points get half a
    cell). ``n = 2`` is uniform.

    Args:
        y: ``[K]`` equally spaced points from 0 to 1 (float64).

    Returns:
        ``[K]`` float64 probabilities.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 (n = 1 is optimised by a point mass at 1/2), got {n}")
    a = 1.0 / (n - 1)
    h = float(y[1] - y[0])
    edges = torch.cat([y.new_zeros(1), y[:-1] + h / 2, y.new_ones(1)]).to(_DTYPE)
    cdf = edges**a / (edges**a + (1 - edges) ** a)
    return cdf.diff()


def toy_optimum_density(y: torch.Tensor, n: int) -> torch.Tensor:
    """Density ``F'(y) = a (y (1-y))^(a-1) / (y^a + (1-y)^a)^2`` of :func:`toy_optimum` (``[K]``)."""
    a = 1.0 / (n - 1)
    y = y.to(_DTYPE)
    return a * (y * (1 - y)) ** (a - 1) / (y**a + (1 - y) ** a) ** 2

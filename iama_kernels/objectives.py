"""The objective vocabulary: inference-time transforms, criteria and aggregators.

Every object here is an immutable, hashable dataclass validated on construction, so that an
objective can be used as a cache key and cannot be changed half-way through a training run.

* Transforms (what happens at inference for one criterion): :class:`Mean`, :class:`BestOfN`,
  :class:`SoftBestOfN`.
* :class:`Criterion` names a reward and the transform it is served through.
* Aggregators ``g`` combine the per-criterion values ``R_i``: :class:`WeightedSum`, :class:`Min`,
  :class:`SmoothMin`. Each gives ``g(R)`` and its gradient ``lambda = dg/dR`` (the weights with
  which the per-criterion first variations are combined).
* :class:`Objective` is a tuple of criteria plus an aggregator.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

__all__ = [
    "Aggregator",
    "BestOfN",
    "Criterion",
    "Mean",
    "Min",
    "Objective",
    "SmoothMin",
    "SoftBestOfN",
    "Transform",
    "WeightedSum",
    "as_objective",
]


@dataclass(frozen=True)
class Mean:
    """One sample at inference (N = 1): ``R[pi] = E_pi r``; plain GRPO."""

    def __repr__(self) -> str:
        return "Mean()"


@dataclass(frozen=True)
class BestOfN:
    """Best-of-n at inference: draw ``n`` i.i.d. samples and keep the highest reward.

    Args:
        n: number of candidates, an integer >= 1 (``n = 1`` is :class:`Mean`).
    """

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral):
            raise TypeError(f"BestOfN: n must be an integer, got {type(self.n).__name__}")
        if self.n < 1:
            raise ValueError(f"BestOfN: n must be >= 1, got {self.n}")
        object.__setattr__(self, "n", int(self.n))

    def __repr__(self) -> str:
        return f"BestOfN({self.n})"


@dataclass(frozen=True)
class SoftBestOfN:
    """Soft Best-of-N in its ``n -> infinity`` limit: exponential tilting ``pi e^{r/tau} / Z``.

    Args:
        tau: temperature, a finite float > 0 (smaller is closer to taking the maximum).
    """

    tau: float

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, numbers.Real):
            raise TypeError(f"SoftBestOfN: tau must be a real number, got {type(self.tau).__name__}")
        if not math.isfinite(self.tau) or self.tau <= 0:
            raise ValueError(f"SoftBestOfN: tau must be finite and > 0, got {self.tau}")
        object.__setattr__(self, "tau", float(self.tau))

    def __repr__(self) -> str:
        return f"SoftBestOfN({self.tau})"


Transform = Union[Mean, BestOfN, SoftBestOfN]  # noqa: UP007 (runtime alias, py3.10)
_TRANSFORM_TYPES = (Mean, BestOfN, SoftBestOfN)


def _check_transform(transform: object, where: str) -> None:
    if not isinstance(transform, _TRANSFORM_TYPES):
        raise TypeError(
            f"{where} must be Mean(), BestOfN(n) or SoftBestOfN(tau), got {transform!r}"
        )


@dataclass(frozen=True)
class Criterion:
    """One reward criterion and the inference-time transform it is served through."""

    name: str
    transform: Transform = field(default_factory=Mean)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Criterion: name must be a non-empty string, got {self.name!r}")
        _check_transform(self.transform, f"Criterion({self.name!r}): transform")


def _check_weights(weights: Sequence[float], where: str) -> tuple[float, ...]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{where}: weights must be a sequence of floats, got {weights!r}")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"{where}: weights must be real numbers, got {w!r}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}: weights must be finite and >= 0, got {list(weights)}")
        out.append(float(w))
    if not out:
        raise ValueError(f"{where}: weights must not be empty")
    if all(w == 0 for w in out):
        raise ValueError(f"{where}: weights must not all be zero")
    return tuple(out)


_WEIGHT_TENSORS: dict[tuple, torch.Tensor] = {}


def _weights_like(weights: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``weights`` as a tensor of ``like``'s dtype and device; cached off the CPU.

    A tensor built from Python floats on a GPU is a host-to-device copy, which waits for the
    stream (a host sync per call) and cannot be captured in a CUDA graph: off the CPU it is built
    once per (weights, device, dtype), as an ordinary tensor even under inference mode, and
    callers only read it. Tensor subclasses (fake tensors) and torch.compile's tracing get a
    fresh one, a constant of the graph."""
    if like.device.type == "cpu" or type(like) is not torch.Tensor or torch.compiler.is_compiling():
        return like.new_tensor(weights)
    key = (weights, like.device, like.dtype)
    t = _WEIGHT_TENSORS.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = _WEIGHT_TENSORS[key] = like.new_tensor(weights)
    return t


class _AggregatorBase:
    """``value(R) = g(R)`` and ``gradient(R) = lambda = dg/dR`` for values ``R`` of shape ``[..., m]``."""

    def num_criteria(self) -> int | None:
        return None

    def value(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gradient(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class WeightedSum(_AggregatorBase):
    """``g(R) = sum_i w_i R_i``; ``lambda = w``."""

    weights: tuple[float, ...]

    def __init__(self, weights: Sequence[float]) -> None:
        object.__setattr__(self, "weights", _check_weights(weights, "WeightedSum"))

    def __repr__(self) -> str:
        return f"WeightedSum({list(self.weights)})"

    def num_criteria(self) -> int:
        return len(self.weights)

    def value(self, values: torch.Tensor) -> torch.Tensor:
        return (values * _weights_like(self.weights, values)).sum(-1)

    def gradient(self, values: torch.Tensor) -> torch.Tensor:
        return _weights_like(self.weights, values).expand(values.shape).clone()


@dataclass(frozen=True)
class Min(_AggregatorBase):
    """``g(R) = min_i R_i``; lambda is 1 on the argmin criterion, split evenly between ties."""

    def __repr__(self) -> str:
        return "Min()"

    def value(self, values: torch.Tensor) -> torch.Tensor:
        return values.min(-1).values

    def gradient(self, values: torch.Tensor) -> torch.Tensor:
        is_min = values == values.min(-1, keepdim=True).values
        return is_min.to(values.dtype) / is_min.sum(-1, keepdim=True).to(values.dtype)


@dataclass(frozen=True)
class SmoothMin(_AggregatorBase):
    """``g(R) = -(1/gamma) log sum_i w_i exp(-gamma R_i)``.

    ``lambda_i = w_i e^{-gamma R_i} / sum_k w_k e^{-gamma R_k}`` (a softmax, computed stably).
    """

    weights: tuple[float, ...]
    gamma: float

    def __init__(self, weights: Sequence[float], gamma: float) -> None:
        object.__setattr__(self, "weights", _check_weights(weights, "SmoothMin"))
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
            raise TypeError(f"SmoothMin: gamma must be a real number, got {gamma!r}")
        if not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"SmoothMin: gamma must be finite and > 0, got {gamma}")
        object.__setattr__(self, "gamma", float(gamma))

    def __repr__(self) -> str:
        return f"SmoothMin({list(self.weights)}, gamma={self.gamma})"

    def num_criteria(self) -> int:
        return len(self.weights)

    def _logits(self, values: torch.Tensor) -> torch.Tensor:
        # log w_i - gamma R_i; a zero weight gives -inf and so lambda_i = 0 exactly.
        return _weights_like(self.weights, values).log() - self.gamma * values

    def value(self, values: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(self._logits(values), dim=-1) / self.gamma

    def gradient(self, values: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._logits(values), dim=-1)


Aggregator = Union[WeightedSum, Min, SmoothMin]  # noqa: UP007 (runtime alias, py3.10)
_AGGREGATOR_TYPES = (WeightedSum, Min, SmoothMin)


@dataclass(frozen=True)
class Objective:
    """A training objective ``g(R_1[pi], ..., R_m[pi])`` over ``m`` criteria.

    Args:
        criteria: one :class:`Criterion` per reward column (order = the last axis of rewards).
        aggregate: the aggregator ``g``; defaults to ``WeightedSum`` with equal weights ``1/m``.
    """

    criteria: tuple[Criterion, ...]
    aggregate: Aggregator

    def __init__(self, criteria: Sequence[Criterion], aggregate: Aggregator | None = None) -> None:
        if isinstance(criteria, Criterion):
            criteria = (criteria,)
        if not isinstance(criteria, Sequence) or isinstance(criteria, (str, bytes)):
            raise TypeError(f"Objective: criteria must be a sequence of Criterion, got {criteria!r}")
        criteria = tuple(criteria)
        if not criteria:
            raise ValueError("Objective: criteria must not be empty")
        for c in criteria:
            if not isinstance(c, Criterion):
                raise TypeError(f"Objective: criteria must be Criterion objects, got {c!r}")
        names = [c.name for c in criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"Objective: criterion names must be unique, got {names}")
        if aggregate is None:
            aggregate = WeightedSum([1.0 / len(criteria)] * len(criteria))
        if not isinstance(aggregate, _AGGREGATOR_TYPES):
            raise TypeError(
                f"Objective: aggregate must be WeightedSum, Min or SmoothMin, got {aggregate!r}"
            )
        k = aggregate.num_criteria()
        if k is not None and k != len(criteria):
            raise ValueError(
                f"Objective: aggregate has {k} weights but there are {len(criteria)} criteria"
            )
        object.__setattr__(self, "criteria", criteria)
        object.__setattr__(self, "aggregate", aggregate)

    @property
    def transforms(self) -> tuple[Transform, ...]:
        return tuple(c.transform for c in self.criteria)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.criteria)

    def __len__(self) -> int:
        return len(self.criteria)

    def max_n(self) -> int:
        """The largest BestOfN ``n`` among the criteria (1 when there is none)."""
        # A plain loop: torch.compile(fullgraph=True) cannot trace max() over a generator.
        largest = 1
        for c in self.criteria:
            if isinstance(c.transform, BestOfN) and c.transform.n > largest:
                largest = c.transform.n
        return largest


def as_objective(objective: Objective | Transform | Criterion, name: str = "objective") -> Objective:
    """Accept a bare transform or criterion where a one-criterion objective is meant."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, Criterion):
        return Objective([objective])
    if isinstance(objective, _TRANSFORM_TYPES):
        return Objective([Criterion("reward", objective)])
    raise TypeError(
        f"{name} must be an Objective, a Criterion or a transform "
        f"(Mean(), BestOfN(n), SoftBestOfN(tau)), got {objective!r}"
    )

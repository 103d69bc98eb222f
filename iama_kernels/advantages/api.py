"""Public functions: ``first_variation``, ``group_values``, ``group_advantages``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _cpu_backend as _cb
from .. import _triton_backend as _tb
from .._checks import (
    ESTIMATORS,
    SCALES,
    check_choice,
    check_finite_rewards,
    check_float,
    check_group_sizes,
    check_positive_float,
    check_same_device,
    check_tensor,
    data_checks_enabled,
)
from .._dispatch import Backend, Call, choose, reference_check
from .._types import AdvantageOutput
from ..objectives import Criterion, Objective, Transform, as_objective
from . import cpu, reference

_FIRST_VARIATION_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, cpu.first_variation_cpu, _cb.cpu_announce),
    Backend("triton", _tb.check_triton, _tb.first_variation_triton, _tb.announce_triton),
    Backend("reference", reference_check, reference.first_variation_ref),
]
_GROUP_VALUES_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, cpu.group_values_cpu, _cb.cpu_announce),
    Backend("triton", _tb.check_triton, _tb.group_values_triton, _tb.announce_triton),
    Backend("reference", reference_check, reference.group_values_ref),
]
_GROUP_ADVANTAGES_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, cpu.group_advantages_cpu, _cb.cpu_announce),
    Backend("triton", _tb.check_triton, _tb.group_advantages_triton, _tb.announce_triton),
    Backend("reference", reference_check, reference.group_advantages_ref),
]


def _as_transform(transform: object) -> Transform:
    if isinstance(transform, Criterion):
        return transform.transform
    objective = as_objective(transform, "transform")  # raises TypeError on anything else
    if len(objective) != 1:
        raise TypeError("transform must be a single transform, got an Objective with "
                        f"{len(objective)} criteria; use group_advantages for several criteria")
    return objective.transforms[0]


def _check_group_rewards(rewards: object, transform: Transform, estimator: str) -> torch.Tensor:
    rewards = check_float("rewards", rewards)
    if rewards.dim() < 1:
        raise ValueError("rewards must have shape [..., G], got a scalar")
    G = rewards.shape[-1]
    if G == 0:
        raise ValueError(f"rewards must have non-empty groups (G >= 1), got shape {tuple(rewards.shape)}")
    check_choice("estimator", estimator, ESTIMATORS)
    check_group_sizes(as_objective(transform), estimator, G)
    if data_checks_enabled() and rewards.numel():
        check_finite_rewards("rewards", rewards.reshape(-1, G), None)
    return rewards


def first_variation(
    rewards: torch.Tensor,
    transform: Transform,
    *,
    estimator: str = "plugin",
    impl: str = "auto",
) -> torch.Tensor:
    """The non-linear reward: first variation ``dR/dpi`` of a transform, estimated per group.

    Args:
        rewards: ``[..., G]`` floating rewards (float16/bfloat16/float32/float64), one group of
            ``G`` samples of one prompt on the last axis; finite.
        transform: ``Mean()``, ``BestOfN(n)`` or ``SoftBestOfN(tau)`` (or a ``Criterion``).
        estimator: ``"plugin"`` (the empirical-distribution formula) or ``"unbiased"`` (the
            leave-one-out U-statistic, needs ``G >= n``). Only ``BestOfN`` has two estimators;
            ``Mean`` is exact and ``SoftBestOfN`` always uses its plug-in.
        impl: ``"auto"`` or an explicit backend name (see :mod:`iama_kernels`).

    Returns:
        ``[..., G]`` in float64 for float64 rewards, else float32; centred to zero mean within
        each group. Tied rewards get identical values; a constant group gets exactly 0.
    """
    transform = _as_transform(transform)
    rewards = _check_group_rewards(rewards, transform, estimator)
    call = Call("first_variation", rewards.device, impl != "auto",
                {"G": rewards.shape[-1], "dtype": rewards.dtype, "transform": transform})
    backend = choose("first_variation", impl, _FIRST_VARIATION_BACKENDS, call)
    return backend.run(rewards, transform, estimator)


def group_values(
    rewards: torch.Tensor,
    transform: Transform,
    *,
    estimator: str = "plugin",
    impl: str = "auto",
) -> torch.Tensor:
    """Per-group estimate of ``R = E[reward after the inference-time transform]``.

    Args:
        rewards: ``[..., G]`` floating rewards, finite.
        transform: ``Mean()``, ``BestOfN(n)`` or ``SoftBestOfN(tau)``.
        estimator: ``"plugin"`` or ``"unbiased"`` (``BestOfN`` only; needs ``G >= n``).
        impl: ``"auto"`` or an explicit backend name.

    Returns:
        ``[...]`` (float64 for float64 rewards, else float32). BestOfN plug-in:
        ``sum_k r_(k) [(k/G)^n - ((k-1)/G)^n]``; unbiased: ``sum_k C(k-1, n-1)/C(G, n) r_(k)``;
        SoftBestOfN: ``sum w r / sum w`` with ``w = exp(r / tau)``; Mean: the group mean.
    """
    transform = _as_transform(transform)
    rewards = _check_group_rewards(rewards, transform, estimator)
    call = Call("group_values", rewards.device, impl != "auto",
                {"G": rewards.shape[-1], "dtype": rewards.dtype, "transform": transform})
    backend = choose("group_values", impl, _GROUP_VALUES_BACKENDS, call)
    return backend.run(rewards, transform, estimator)


def prepare_group_inputs(
    rewards: object,
    objective: object,
    estimator: str,
    scale: str,
    eps: float,
    criterion_weights: object,
    valid: object,
) -> tuple[torch.Tensor, Objective, torch.Tensor | None, torch.Tensor | None, float]:
    """Validate ``group_advantages`` arguments; returns rewards as ``[B, G, m]``."""
    rewards = check_float("rewards", rewards)
    if rewards.dim() not in (2, 3):
        raise ValueError(f"rewards must have shape [B, G] or [B, G, m], got {tuple(rewards.shape)}")
    objective = as_objective(objective)
    if rewards.dim() == 2:
        rewards = rewards.unsqueeze(-1)
    B, G, m = rewards.shape
    if B == 0 or G == 0 or m == 0:
        raise ValueError(f"rewards must have B >= 1 groups of G >= 1 samples, got {tuple(rewards.shape)}")
    if m != len(objective):
        raise ValueError(
            f"rewards has {m} criteria on its last axis but objective has {len(objective)} "
            f"({', '.join(objective.names)})"
        )
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("scale", scale, SCALES)
    eps = check_positive_float("eps", eps, allow_zero=True)
    if criterion_weights is not None:
        if not isinstance(criterion_weights, torch.Tensor):
            if isinstance(criterion_weights, (str, bytes)) or not isinstance(criterion_weights, Sequence):
                raise TypeError("criterion_weights must be a tensor or a sequence of floats, "
                                f"got {type(criterion_weights).__name__}")
            criterion_weights = torch.tensor(criterion_weights, dtype=torch.float64,
                                             device=rewards.device)
        criterion_weights = check_float("criterion_weights", criterion_weights, allow_half=False)
        if tuple(criterion_weights.shape) != (m,):
            raise ValueError(f"criterion_weights must have shape [m] = [{m}], "
                             f"got {tuple(criterion_weights.shape)}")
        if data_checks_enabled() and not bool(torch.isfinite(criterion_weights).all()):
            raise ValueError(f"criterion_weights must be finite, got {criterion_weights.tolist()}")
    if valid is not None:
        valid = check_tensor("valid", valid)
        if valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
        if tuple(valid.shape) != (B, G):
            raise ValueError(f"valid must have shape [B, G] = [{B}, {G}], got {tuple(valid.shape)}")
    check_same_device(rewards=rewards, criterion_weights=criterion_weights, valid=valid)
    check_group_sizes(objective, estimator, G)
    if data_checks_enabled():
        check_finite_rewards("rewards", rewards, valid)
        if valid is not None and estimator == "unbiased" and objective.max_n() > 1:
            counts = valid.sum(-1)
            short = ((counts > 0) & (counts < objective.max_n())).nonzero()
            if short.numel():
                b = int(short[0, 0])
                raise ValueError(
                    f"estimator='unbiased' needs at least n={objective.max_n()} valid samples per "
                    f"group, but group {b} has {int(counts[b])}; use estimator='plugin'"
                )
    return rewards, objective, criterion_weights, valid, eps


def group_advantages(
    rewards: torch.Tensor,
    objective: Objective | Transform | Criterion,
    *,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    criterion_weights: torch.Tensor | Sequence[float] | None = None,
    valid: torch.Tensor | None = None,
    impl: str = "auto",
) -> AdvantageOutput:
    """Non-linear GRPO advantages of a batch of groups, for one or several criteria.

    For each criterion ``i`` the first variation ``s_i`` of its transform is estimated per group
    and centred; the criteria are combined with ``lambda = dg/dR`` (from batch-level values, i.e.
    the mean over groups of ``values``, unless ``criterion_weights`` is given, as a distributed
    trainer does after all-reducing them); the result is scaled.

    Args:
        rewards: ``[B, G]`` (one criterion) or ``[B, G, m]`` floating rewards, finite where valid.
        objective: an :class:`~iama_kernels.Objective` with ``m`` criteria; with one criterion a
            bare transform or ``Criterion`` is accepted.
        estimator: ``"plugin"`` or ``"unbiased"`` (applies to ``BestOfN`` criteria).
        scale: ``"group"`` (divide by the group's Bessel-corrected std + ``eps``, TRL's
            convention), ``"batch"`` (std over every valid sample of the batch) or ``"none"``
            (centred only; the setting of the convergence theory).
        eps: added to the std, ``>= 0`` (default ``1e-4`` as in TRL).
        criterion_weights: optional ``[m]`` lambda to use instead of computing it: a tensor on
            the rewards' device, or a sequence of floats (copied to that device on every
            call, which on a GPU waits for the stream; pass a tensor in a training loop).
        valid: optional bool ``[B, G]``; invalid samples are left out of every statistic and
            get advantage 0. A group with no valid sample gets value 0 and is left out of the
            batch-level values.
        impl: ``"auto"`` or an explicit backend name.

    Returns:
        :class:`~iama_kernels.AdvantageOutput` ``(advantages [B, G], shaped [B, G],
        values [B, m], criterion_weights [m])`` in float64 for float64 rewards, else float32.
        A group whose rewards are all equal gets advantages exactly 0.
    """
    rewards, objective, criterion_weights, valid, eps = prepare_group_inputs(
        rewards, objective, estimator, scale, eps, criterion_weights, valid
    )
    call = Call("group_advantages", rewards.device, impl != "auto",
                {"G": rewards.shape[1], "dtype": rewards.dtype, "objective": objective,
                 "valid": valid is not None, "max_n": objective.max_n()})
    backend = choose("group_advantages", impl, _GROUP_ADVANTAGES_BACKENDS, call)
    return backend.run(rewards, objective, estimator, scale, eps, criterion_weights, valid)



"""C++ CPU backend of ``first_variation``, ``group_values`` and ``group_advantages``.

Launchers around the ``iama`` ops (``csrc/cpu/advantages.cpp``): ``group_stats`` sorts each
group once per criterion and gives the centred first variations and the group values;
``group_advantages`` does the same and then combines the criteria with lambda, centres and
scales. lambda must be known before the combination: a weighted sum's lambda is its weights (its
gradient does not depend on the values); for ``Min``/``SmoothMin`` a first ``group_stats`` pass
gives the values and ``objective.aggregate.gradient`` of their batch mean gives lambda (a tiny
torch op: no kernel sees every group before combining). Arguments arrive validated by the
public functions.
"""

from __future__ import annotations

import torch

from .._cpu_backend import objective_codes, transform_codes
from .._types import AdvantageOutput
from ..objectives import Objective, Transform, WeightedSum
from .reference import batch_values, compute_dtype


def _as_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[..., G]`` -> ``[N, G, 1]`` (a view when possible)."""
    return rewards.reshape(-1, rewards.shape[-1], 1)


def first_variation_cpu(
    rewards: torch.Tensor, transform: Transform, estimator: str = "plugin"
) -> torch.Tensor:
    """``[..., G]`` rewards -> ``[..., G]`` centred first variation (float64 or float32)."""
    kinds, ns, taus = transform_codes((transform,))
    s, _ = torch.ops.iama.group_stats(_as_groups(rewards), None, kinds, ns, taus, estimator)
    return s.reshape(rewards.shape)


def group_values_cpu(rewards: torch.Tensor, transform: Transform, estimator: str = "plugin") -> torch.Tensor:
    """``[..., G]`` rewards -> ``[...]`` group values."""
    kinds, ns, taus = transform_codes((transform,))
    _, values = torch.ops.iama.group_stats(_as_groups(rewards), None, kinds, ns, taus, estimator)
    return values.reshape(rewards.shape[:-1])


def resolve_criterion_weights(
    rewards: torch.Tensor,
    objective: Objective,
    estimator: str,
    criterion_weights: torch.Tensor | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """lambda ``[m]`` in the compute dtype: the given ``criterion_weights``, a weighted sum's
    weights (its gradient does not depend on the values), or ``objective.aggregate.gradient`` of
    the batch-level values from a first ``group_stats`` pass."""
    dtype = compute_dtype(rewards.dtype)
    if criterion_weights is not None:
        return criterion_weights.to(dtype)
    if isinstance(objective.aggregate, WeightedSum):
        return torch.tensor(objective.aggregate.weights, dtype=dtype, device=rewards.device)
    kinds, ns, taus = objective_codes(objective)
    _, values = torch.ops.iama.group_stats(rewards, valid, kinds, ns, taus, estimator)
    return objective.aggregate.gradient(batch_values(values, valid))


def group_advantages_cpu(
    rewards: torch.Tensor,
    objective: Objective,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    criterion_weights: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> AdvantageOutput:
    """Rewards ``[B, G, m]`` -> :class:`AdvantageOutput` (float64 for float64 rewards, else float32)."""
    kinds, ns, taus = objective_codes(objective)
    lam = resolve_criterion_weights(rewards, objective, estimator, criterion_weights, valid)
    advantages, shaped, values = torch.ops.iama.group_advantages(
        rewards, valid, lam, kinds, ns, taus, estimator, scale, eps
    )
    return AdvantageOutput(advantages, shaped, values, lam)

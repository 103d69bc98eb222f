"""Eager PyTorch reference for first variations, group values and advantages: the oracle.

Runs with torch alone, in float64 for float64 input and float32 otherwise. It follows SPEC
sections 2-4 literally: sort each group, apply the estimator's formula on the sorted rewards
(differences for plug-in, a suffix sum for the unbiased U-statistic), give every member of a run of
tied rewards the value computed at the run's last position (so ties are bit-identical whatever the
input order), scatter back and centre.
"""

from __future__ import annotations

import torch

from .._types import AdvantageOutput
from .._weights import plugin_increments, unbiased_others_weights, unbiased_prefix_sums, value_weights
from ..objectives import BestOfN, Mean, Objective, SoftBestOfN, Transform


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vec(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def sorted_first_variation_and_value(
    xs: torch.Tensor, transform: Transform, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """First variation (uncentred) and group value of groups whose rewards are sorted.

    Args:
        xs: ``[N, g]`` each row sorted ascending, finite, float32 or float64.
    Returns:
        ``s_sorted [N, g]`` (first variation at each sorted position, equal on tied runs) and
        ``values [N]`` (the estimate of ``R``).
    """
    g = xs.shape[-1]
    shift = xs[..., :1]
    x = xs - shift  # exact zeros for the minimum and for constant groups
    if isinstance(transform, Mean) or (isinstance(transform, BestOfN) and transform.n == 1):
        s = x
        value = x.mean(-1)
    elif isinstance(transform, BestOfN):
        n = transform.n
        value = (x * _vec(value_weights(g, n, estimator), x)).sum(-1)
        if estimator == "plugin":
            increments = _vec(plugin_increments(g, n), x) * x.diff(dim=-1)
            s = torch.cat([torch.zeros_like(x[..., :1]), increments.cumsum(-1)], dim=-1)
        else:
            others = _vec(unbiased_others_weights(g, n), x) * x[..., 1:]
            suffix = others.flip(-1).cumsum(-1).flip(-1)  # suffix[p] = sum_{q > p} a_{q-1} x_q
            suffix = torch.cat([suffix, torch.zeros_like(x[..., :1])], dim=-1)
            s = x * _vec(unbiased_prefix_sums(g, n), x) + suffix
    elif isinstance(transform, SoftBestOfN):
        # The maximum (and its ties) get weight exactly 1 even when tau underflows to 0 in the
        # compute dtype (e.g. tau = 1e-50 in float32), where 0 / tau would be NaN.
        d = x - x[..., -1:]
        w = torch.where(d == 0, 1.0, torch.exp(d / transform.tau))
        r_hat = (w * x).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
        s = w / w.mean(-1, keepdim=True) * (x - r_hat)
        value = r_hat.squeeze(-1)
    else:  # pragma: no cover - objectives validate transforms
        raise TypeError(f"unknown transform {transform!r}")
    # Every member of a tied run takes the value at the run's last position.
    last_of_run = torch.searchsorted(xs.contiguous(), xs.contiguous(), right=True) - 1
    s = s.gather(-1, last_of_run)
    return s, value + shift.squeeze(-1)


def first_variation_and_value(
    rewards: torch.Tensor, transform: Transform, estimator: str, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred first variation ``[N, G]`` and group value ``[N]`` of rewards ``[N, G]``.

    Invalid samples (``valid`` False) are left out of every statistic and get 0; a group with no
    valid sample gets value 0.
    """
    dtype = compute_dtype(rewards.dtype)
    r = rewards.to(dtype)
    N = r.shape[0]
    if valid is None:
        xs, order = torch.sort(r, dim=-1, stable=True)
        s_sorted, value = sorted_first_variation_and_value(xs, transform, estimator)
        s_sorted = s_sorted - s_sorted.mean(-1, keepdim=True)
        return torch.empty_like(r).scatter_(-1, order, s_sorted), value
    # Sort valid samples first (invalid ones to +inf), then process groups of equal valid count
    # with the dense routine on their first `count` sorted columns.
    key = torch.where(valid, r, torch.full_like(r, float("inf")))
    xs_all, order = torch.sort(key, dim=-1, stable=True)
    counts = valid.sum(-1)
    s_sorted = torch.zeros_like(r)
    value = torch.zeros(N, dtype=dtype, device=r.device)
    for count in torch.unique(counts).tolist():
        if count == 0:
            continue
        rows = (counts == count).nonzero().squeeze(-1)
        s_c, v_c = sorted_first_variation_and_value(xs_all[rows, :count], transform, estimator)
        s_sorted[rows, :count] = s_c - s_c.mean(-1, keepdim=True)
        value[rows] = v_c
    return torch.zeros_like(r).scatter_(-1, order, s_sorted), value


def first_variation_ref(
    rewards: torch.Tensor, transform: Transform, estimator: str = "plugin"
) -> torch.Tensor:
    """Reference :func:`iama_kernels.first_variation` on ``[..., G]`` rewards."""
    flat = rewards.reshape(-1, rewards.shape[-1])
    s, _ = first_variation_and_value(flat, transform, estimator)
    return s.reshape(rewards.shape)


def group_values_ref(
    rewards: torch.Tensor, transform: Transform, estimator: str = "plugin"
) -> torch.Tensor:
    """Reference :func:`iama_kernels.group_values` on ``[..., G]`` rewards."""
    flat = rewards.reshape(-1, rewards.shape[-1])
    _, v = first_variation_and_value(flat, transform, estimator)
    return v.reshape(rewards.shape[:-1])


def batch_values(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Batch-level ``R_i``: the mean over groups (with at least one valid sample) of ``[B, m]``."""
    if valid is None:
        return values.mean(0)
    has_any = valid.any(-1).to(values.dtype).unsqueeze(-1)
    return (values * has_any).sum(0) / has_any.sum().clamp(min=1)


def scale_advantages(
    shaped: torch.Tensor, scale: str, eps: float, valid: torch.Tensor | None
) -> torch.Tensor:
    """Scale group-centred ``[B, G]`` values; Bessel-corrected std, 0 where there is < 2 samples."""
    if scale == "none":
        return shaped
    m = torch.ones_like(shaped) if valid is None else valid.to(shaped.dtype)
    if scale == "group":
        count = m.sum(-1, keepdim=True)
        mean = (shaped * m).sum(-1, keepdim=True) / count.clamp(min=1)
        var = (((shaped - mean) * m) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    else:  # "batch"
        count = m.sum()
        mean = (shaped * m).sum() / count.clamp(min=1)
        var = (((shaped - mean) * m) ** 2).sum() / (count - 1).clamp(min=1)
    denom = var.sqrt() + eps
    # denom == 0 only when eps == 0 and the group is constant, where shaped is exactly 0.
    return torch.where(denom > 0, shaped / torch.where(denom > 0, denom, 1), 0)


def group_advantages_ref(
    rewards: torch.Tensor,
    objective: Objective,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    criterion_weights: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> AdvantageOutput:
    """Reference :func:`iama_kernels.group_advantages` on rewards ``[B, G, m]``."""
    dtype = compute_dtype(rewards.dtype)
    s_parts, v_parts = [], []
    for i, criterion in enumerate(objective.criteria):
        s_i, v_i = first_variation_and_value(rewards[..., i], criterion.transform, estimator, valid)
        s_parts.append(s_i)
        v_parts.append(v_i)
    s = torch.stack(s_parts, -1)
    values = torch.stack(v_parts, -1)
    if criterion_weights is None:
        lam = objective.aggregate.gradient(batch_values(values, valid))
    else:
        lam = criterion_weights.to(dtype)
    shaped = (s * lam).sum(-1)
    advantages = scale_advantages(shaped, scale, eps, valid)
    if valid is not None:
        zero = torch.zeros_like(advantages)
        advantages = torch.where(valid, advantages, zero)
        shaped = torch.where(valid, shaped, zero)
    return AdvantageOutput(advantages, shaped, values, lam)

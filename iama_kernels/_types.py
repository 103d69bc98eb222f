"""Result types of the public functions (NamedTuples: unpackable and torch.compile-friendly)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AdvantageOutput(NamedTuple):
    """Result of :func:`iama_kernels.group_advantages`.

    Attributes:
        advantages: ``[B, G]`` centred (and scaled) advantages; 0 for invalid samples.
        shaped: ``[B, G]`` the combined non-linear reward ``sum_i lambda_i s_i``, centred per group,
            before scaling.
        values: ``[B, m]`` per-group value estimates ``R_hat`` of each criterion (0 for a group
            with no valid sample).
        criterion_weights: ``[m]`` the ``lambda = dg/dR`` used to combine the criteria.
    """

    advantages: torch.Tensor
    shaped: torch.Tensor
    values: torch.Tensor
    criterion_weights: torch.Tensor


class PolicyLossOutput(NamedTuple):
    """Result of :func:`iama_kernels.policy_loss`.

    Attributes:
        loss: scalar, differentiable with respect to ``logp``.
        kl: scalar, mask-weighted mean over tokens of the KL estimate (``kl_estimator``'s value; 0
            without ``ref_logp``).
        clip_fraction: scalar, mask-weighted fraction of tokens whose clipped term is active
            (``surrogate="cispo"``: whose importance weight is clipped; ``"sapo"``: 0).
        ratio_mean: scalar, mask-weighted mean of each token's ratio, ``exp(logp - old_logp)``
            (with ``ratio_level="sequence"`` its row's ``exp(l_i)``).
        log_ratio_mean: scalar, mask-weighted mean of each token's log-ratio, ``logp - old_logp``
            (with ``ratio_level="sequence"`` its row's ``l_i``; minus verl's ``ppo_kl``; 0
            without ``old_logp``).
        dual_clip_fraction: scalar, mask-weighted fraction of tokens with ``A < 0`` and
            ``ratio > dual_clip`` (verl's ``pg_clipfrac_lower``; 0 without ``dual_clip``).
        clip_high_fraction: scalar, the part of ``clip_fraction`` clipped above (``A > 0`` and
            ``ratio > 1 + eps_high``; TRL's ``clip_ratio/high_mean``); the rest is clipped below
            (for the clipped surrogate).
        sequence_log_ratio: ``[S]`` with ``ratio_level="sequence"``: GSPO's log sequence ratio
            of each row, the mean of ``logp - old_logp`` over its tokens with a non-zero mask (0
            for an empty row or without ``old_logp``; ``exp`` of it is the row's ratio), in the
            metrics' dtype; ``None`` with ``ratio_level="token"``.
        row_clip_weights: ``[S, 3]`` with ``row_stats=True``: per row, its mask total, clipped
            weight and clipped-above weight (the row sums behind ``clip_fraction`` and
            ``clip_high_fraction``, e.g. for TRL's per-sequence ``clip_ratio/low_min`` and
            ``high_max``), in the metrics' dtype; ``None`` otherwise.
    """

    loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor
    log_ratio_mean: torch.Tensor
    dual_clip_fraction: torch.Tensor
    clip_high_fraction: torch.Tensor
    sequence_log_ratio: torch.Tensor | None
    row_clip_weights: torch.Tensor | None = None


class NonlinearGRPOOutput(NamedTuple):
    """Result of :func:`iama_kernels.nonlinear_grpo_loss`: the loss, its metrics and the
    intermediate advantages, values and criterion weights (all but ``loss`` detached). The three
    metrics added last (after ``criterion_weights``, so that positional unpacking of the first
    seven keeps working) are those of :class:`PolicyLossOutput`, and so is ``sequence_log_ratio``
    (``[B * G]`` or ``None``)."""

    loss: torch.Tensor
    advantages: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor
    values: torch.Tensor
    criterion_weights: torch.Tensor
    log_ratio_mean: torch.Tensor
    dual_clip_fraction: torch.Tensor
    clip_high_fraction: torch.Tensor
    sequence_log_ratio: torch.Tensor | None


class RolloutCorrectionOutput(NamedTuple):
    """Result of :func:`iama_kernels.rollout_correction` (in float32, float64 for float64 inputs).

    Attributes:
        weights: ``[S, T]`` each token's weight in the loss: the correction's coefficient times
            the mask's value (0 where the mask is 0); :func:`iama_kernels.policy_loss`'s ``mask``.
        log_ratio_mean: scalar, mask-weighted mean of ``old_logp - rollout_logp`` (0 for an
            all-zero mask).
        filtered_fraction: scalar: token level, the mask-weighted share of the tokens dropped
            (clip mode: clipped); sequence level, the share of the rows dropped.
        mask_sums: ``[S]`` each row's mask total.
        row_statistic: ``[S]`` each row's gate statistic at sequence level (NaN for an empty
            row), else ``None``.
    """

    weights: torch.Tensor
    log_ratio_mean: torch.Tensor
    filtered_fraction: torch.Tensor
    mask_sums: torch.Tensor
    row_statistic: torch.Tensor | None

"""Public function ``nonlinear_grpo_loss``: rewards and log-probs in, loss and metrics out."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _cpu_backend as _cb
from .. import _triton_backend as _tb
from .._checks import (
    check_dual_clip,
    check_kl,
    check_ratio_level,
    check_surrogate,
    check_vespo,
)
from .._dispatch import Backend, Call, choose, reference_check
from .._types import NonlinearGRPOOutput
from ..advantages.api import prepare_group_inputs
from ..objectives import Criterion, Objective, Transform
from ..policy_loss.api import check_token_inputs, row_span
from . import cpu, reference

_NONLINEAR_GRPO_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, cpu.nonlinear_grpo_loss_cpu, _cb.cpu_announce),
    Backend("triton", _tb.check_triton, _tb.nonlinear_grpo_loss_triton, _tb.announce_triton),
    Backend("reference", reference_check, reference.nonlinear_grpo_loss_ref),
]


def nonlinear_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    objective: Objective | Transform | Criterion,
    *,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
    criterion_weights: torch.Tensor | Sequence[float] | None = None,
    max_completion_length: int | None = None,
    kl_weight: str = "none",
    kl_estimator: str = "k3",
    dual_clip: float | None = None,
    ratio_level: str = "token",
    surrogate: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    impl: str = "auto",
) -> NonlinearGRPOOutput:
    """The one-pass non-linear GRPO op: group rewards to advantages, then the token loss.

    Equivalent to :func:`group_advantages` followed by :func:`policy_loss` on
    ``advantages.reshape(-1)``; the fused backends do both in one launch.

    Args:
        logp, old_logp, ref_logp, mask: ``[B * G, T]`` as in :func:`policy_loss`; rows are
            group-major (row ``b * G + g`` is sample ``g`` of group ``b``).
        rewards: ``[B, G]`` or ``[B, G, m]`` floating rewards, finite.
        objective, estimator, scale, eps, criterion_weights: as in :func:`group_advantages`.
        eps_low, eps_high, beta, loss_type, max_completion_length, kl_weight, kl_estimator,
        dual_clip, ratio_level, surrogate, tau_pos, tau_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
        vespo_lambda_neg: as in :func:`policy_loss` (with ``surrogate="vespo"`` each row's gamma
            weight multiplies its non-linear advantage; ``sequence_log_ratio`` holds the rows'
            log weights).
        impl: ``"auto"`` or an explicit backend name.

    Returns:
        :class:`~iama_kernels.NonlinearGRPOOutput` ``(loss, advantages [B, G], kl,
        clip_fraction, ratio_mean, values [B, m], criterion_weights [m], log_ratio_mean,
        dual_clip_fraction, clip_high_fraction, sequence_log_ratio [B * G] or None)``; only
        ``loss`` carries a gradient (into ``logp``).
    """
    eps_low, eps_high, beta = check_token_inputs(
        logp, old_logp, ref_logp, mask, eps_low, eps_high, beta, loss_type, max_completion_length,
        log_space_clip=surrogate == "gmpo",
    )
    check_kl(kl_estimator, kl_weight)
    dual_clip = check_dual_clip(dual_clip)
    tau_pos, tau_neg = check_surrogate(surrogate, tau_pos, tau_neg, dual_clip)
    check_ratio_level(ratio_level, surrogate)
    vespo = check_vespo(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    rewards, objective, criterion_weights, _, eps = prepare_group_inputs(
        rewards, objective, estimator, scale, eps, criterion_weights, None
    )
    B, G, _ = rewards.shape
    if logp.shape[0] != B * G:
        raise ValueError(f"logp has {logp.shape[0]} rows but rewards has B * G = {B} * {G} = "
                         f"{B * G} samples (rows must be group-major)")
    if rewards.device != logp.device:
        raise ValueError(f"rewards is on {rewards.device} but logp is on {logp.device}")
    call = Call("nonlinear_grpo_loss", logp.device, impl != "auto",
                {"G": G, "dtype": logp.dtype, "reward_dtype": rewards.dtype,
                 "objective": objective, "max_n": objective.max_n(), "shape": tuple(logp.shape),
                 "row_span": row_span(logp, old_logp, ref_logp, mask)})
    backend = choose("nonlinear_grpo_loss", impl, _NONLINEAR_GRPO_BACKENDS, call)
    return backend.run(logp, old_logp, ref_logp, mask, rewards, objective, estimator, scale, eps,
                       eps_low, eps_high, beta, loss_type, criterion_weights, max_completion_length,
                       kl_weight, dual_clip, ratio_level, surrogate, tau_pos, tau_neg, vespo,
                       kl_estimator)

"""Reference for the one-pass op: :func:`group_advantages_ref` then :func:`policy_loss_ref`."""

from __future__ import annotations

import torch

from .._checks import VESPO_DEFAULTS
from .._types import NonlinearGRPOOutput
from ..advantages.reference import group_advantages_ref
from ..objectives import Objective
from ..policy_loss.reference import policy_loss_ref


def nonlinear_grpo_loss_ref(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    objective: Objective,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
    criterion_weights: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    kl_weight: str = "none",
    dual_clip: float | None = None,
    ratio_level: str = "token",
    surrogate: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    vespo: tuple[float, float, float, float] = VESPO_DEFAULTS,
    kl_estimator: str = "k3",
) -> NonlinearGRPOOutput:
    """Reference :func:`iama_kernels.nonlinear_grpo_loss`; rewards ``[B, G, m]``, validated."""
    adv = group_advantages_ref(rewards, objective, estimator, scale, eps, criterion_weights)
    out = policy_loss_ref(
        logp, old_logp, ref_logp, adv.advantages.reshape(-1), mask,
        eps_low, eps_high, beta, loss_type, max_completion_length, kl_weight, dual_clip,
        ratio_level, surrogate, tau_pos, tau_neg, False, vespo, kl_estimator,
    )
    return NonlinearGRPOOutput(
        out.loss, adv.advantages, out.kl, out.clip_fraction, out.ratio_mean,
        adv.values, adv.criterion_weights, out.log_ratio_mean, out.dual_clip_fraction,
        out.clip_high_fraction, out.sequence_log_ratio,
    )

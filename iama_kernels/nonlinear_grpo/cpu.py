"""C++ CPU backend of ``nonlinear_grpo_loss`` (``csrc/cpu/nonlinear_grpo.cpp``): one op call from
rewards and log-probs to the loss, its metrics, the advantages and the per-token gradient.

lambda must be known before the group values are combined. A weighted sum's lambda is its
weights; for ``Min``/``SmoothMin`` (without ``criterion_weights``) the group values are computed
first by ``iama::group_stats`` and the aggregator's gradient gives lambda.
"""

from __future__ import annotations

import torch

from .._checks import ROW_SURROGATES, VESPO_DEFAULTS, kl_form
from .._cpu_backend import objective_codes
from .._types import NonlinearGRPOOutput
from ..advantages.cpu import resolve_criterion_weights
from ..objectives import Objective


def nonlinear_grpo_loss_cpu(
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
    """Rewards ``[B, G, m]`` and ``[B * G, T]`` token inputs -> :class:`NonlinearGRPOOutput`."""
    kinds, ns, taus = objective_codes(objective)
    lam = resolve_criterion_weights(rewards, objective, estimator, criterion_weights, None)
    loss, advantages, kl, clip_fraction, ratio_mean, values, lratio, dual, high, seq, _ = (
        torch.ops.iama.nonlinear_grpo_fwd(
            logp, old_logp, ref_logp, mask, rewards, lam, kinds, ns, taus, estimator, scale, eps,
            eps_low, eps_high, beta, loss_type, max_completion_length, kl_form(kl_estimator, kl_weight),
            dual_clip, ratio_level == "sequence", surrogate, tau_pos, tau_neg, *vespo,
        )
    )
    per_row = ratio_level == "sequence" or surrogate in ROW_SURROGATES
    return NonlinearGRPOOutput(loss, advantages.detach(), kl.detach(), clip_fraction.detach(),
                               ratio_mean.detach(), values.detach(), lam, lratio.detach(), dual.detach(),
                               high.detach(), seq.detach() if per_row else None)

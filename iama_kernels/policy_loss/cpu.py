"""C++ CPU backend of ``policy_loss`` (``csrc/cpu/policy_loss.cpp``).

One pass over the tokens computes the loss, the metrics and ``d loss / d logp``; the op's
autograd formula (``iama_kernels._cpu_ops``) scales that saved gradient by ``grad_output``.
Arguments arrive validated by the public function.
"""

from __future__ import annotations

import torch

from .._checks import ROW_SURROGATES, VESPO_DEFAULTS, kl_form
from .._types import PolicyLossOutput


def policy_loss_cpu(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    kl_weight: str = "none",
    dual_clip: float | None = None,
    ratio_level: str = "token",
    surrogate: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    row_stats: bool = False,
    vespo: tuple[float, float, float, float] = VESPO_DEFAULTS,
    kl_estimator: str = "k3",
) -> PolicyLossOutput:
    """``[S, T]`` log-probs, ``[S]`` advantages, ``[S, T]`` mask -> :class:`PolicyLossOutput`."""
    outputs = torch.ops.iama.policy_loss_fwd(
        logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, loss_type, max_completion_length,
        kl_form(kl_estimator, kl_weight), dual_clip, ratio_level == "sequence", surrogate, tau_pos, tau_neg,
        row_stats, *vespo,
    )
    seq = outputs[7].detach() if ratio_level == "sequence" or surrogate in ROW_SURROGATES else None
    rows = outputs[8].detach() if row_stats else None
    return PolicyLossOutput(outputs[0], *(t.detach() for t in outputs[1:7]), seq, rows)

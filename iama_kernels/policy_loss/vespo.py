"""Public function ``vespo_phi``: VESPO's gamma weight of a sequence's importance ratio.

:func:`iama_kernels.policy_loss` with ``surrogate="vespo"`` computes these weights inside its
pass and returns the log weights ``log w`` as ``sequence_log_ratio``; this turns them (or any log
sequence ratio) into the weights themselves, e.g. for a metric (TRL's ``vespo/phi_seq_mean``).
"""

from __future__ import annotations

import torch

from .._checks import check_float, check_tensor, check_vespo
from .reference import vespo_phi as _vespo_phi


def vespo_phi(
    log_w: torch.Tensor,
    advantages: torch.Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> torch.Tensor:
    """``phi(w) = exp(lambda + k log w - lambda w)`` (``phi(1) = 1``), the gamma weight of VESPO.

    Args:
        log_w: log sequence ratios, float (e.g. ``[S]``, or ``[S, 1]`` against ``[S, T]``
            advantages); used as given (:func:`policy_loss` clamps its own to
            ``[log 1e-8, 20]``, as TRL does).
        advantages: broadcastable with ``log_w``; ``(k_pos, lambda_pos)`` apply where an
            advantage is ``>= 0``, ``(k_neg, lambda_neg)`` elsewhere.
        k_pos, lambda_pos, k_neg, lambda_neg: shapes (finite) and rates (finite, ``> 0``);
            defaults TRL's.

    Returns:
        The weights, of the broadcast shape and ``log_w``'s dtype; a weight that is not finite
        (``k log w`` past the exponent's range) is 0, as in TRL.
    """
    log_w = check_float("log_w", log_w)
    advantages = check_tensor("advantages", advantages)
    vespo = check_vespo(k_pos, lambda_pos, k_neg, lambda_neg, prefix="")
    return _vespo_phi(log_w, advantages, vespo)

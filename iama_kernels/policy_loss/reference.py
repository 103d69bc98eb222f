"""Eager PyTorch reference for the clipped-ratio + k3-KL policy loss (SPEC section 5).

Autograd through these ops gives exactly the closed-form gradient of the SPEC: the clipped branch
is detached, so the gradient is ``-rho A`` where the unclipped term is active (ties included) and 0
where the clipped one is (and where the dual clip holds the surrogate at ``c A``), plus
``beta (1 - exp(ref - logp))``. With ``ratio_level="sequence"`` the log-ratio of every token of a
row is GSPO's ``sg[l_i] + logp_t - sg[logp_t]`` (``l_i`` the row's mean log-ratio), whose value is
``l_i`` and whose derivative in ``logp_t`` is 1, so the same closed form holds with
``rho = exp(l_i)``. Tokens with mask 0 are never read
into the arithmetic (``torch.where``, not a product), so padding may hold inf or NaN.
"""

from __future__ import annotations

import torch

from .._types import PolicyLossOutput
from ..advantages.reference import compute_dtype


def token_weights(
    mask: torch.Tensor, loss_type: str, max_completion_length: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """``[S, T]`` weight of each token's loss in the aggregate (so the loss is a plain sum).

    grpo: ``m / (S * max(1, sum_t m))`` (a row with an empty mask contributes 0 but still counts
    in the mean over sequences, as in TRL); token: ``m / max(1, sum m)``; dr_grpo:
    ``m / (S * max_completion_length)`` with ``max_completion_length`` defaulting to ``T``.
    """
    m = mask.to(dtype)
    S, T = m.shape
    if loss_type == "grpo":
        return m / (S * m.sum(-1, keepdim=True).clamp(min=1))
    if loss_type == "token":
        return m / m.sum().clamp(min=1)
    length = T if max_completion_length is None else max_completion_length
    return m / (S * length)


def sequence_log_ratio(log_ratio: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[S, 1]`` GSPO's log sequence ratio: the mean of ``logp - old`` over each row's tokens
    with a non-zero mask (its support, whatever the weights), 0 for an empty row."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    total = torch.where(keep, log_ratio, zero).sum(-1, keepdim=True)
    return total / keep.sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)


def token_surrogate(
    ratio: torch.Tensor, A: torch.Tensor, lp: torch.Tensor, eps_low: float, eps_high: float,
    dual_clip: float | None, surrogate: str, tau_pos: float, tau_neg: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: the surrogate (its gradient through ``ratio`` and ``lp`` by autograd), and the
    clipped, clipped-above and dual-clipped flags of the metrics.

    clip: ``min(rho A, clip(rho) A)`` with the clipped branch detached, clipped where that branch
    is strictly the one taken (and, with ``dual_clip``, ``c A`` where ``A < 0``, ``rho > c``).
    cispo: ``sg[clip(rho)] A logp``, gradient ``clip(rho) A``; clipped where the weight was.
    sapo: ``(4 / tau) sigmoid(tau (rho - 1)) A``, ``tau = tau_pos`` where ``A > 0`` else
    ``tau_neg``, gradient ``4 s (1 - s) rho A`` (0 where the gate has saturated); never clipped."""
    lo, hi = 1 - eps_low, 1 + eps_high
    clipped = ratio.clamp(lo, hi)
    dual = torch.zeros(torch.broadcast_shapes(ratio.shape, A.shape), dtype=torch.bool,
                       device=ratio.device)
    if surrogate == "cispo":
        flag = (ratio < lo) | (ratio > hi)
        return clipped.detach() * A * lp, flag, (ratio > hi) & (A > 0), dual
    if surrogate == "sapo":
        pos = torch.tensor(tau_pos, dtype=ratio.dtype, device=ratio.device)
        tau = torch.where(A > 0, pos, torch.tensor(tau_neg, dtype=ratio.dtype, device=ratio.device))
        rho = ratio.detach()
        x = tau * (rho - 1)
        s = torch.sigmoid(x)
        # The gradient 4 s (1 - s) rho A (d rho / d logp = rho at either ratio level), put in by
        # hand: autograd's s (1 - s) * rho is 0 * inf = NaN where the gate has saturated (the
        # ratio infinite, or tau (rho - 1) past the exp range); the derivative is 0 there.
        e = torch.exp(-x)
        live = (e > 0) & torch.isfinite(e)
        slope = torch.where(live, 4 * e * s * s * rho * A, rho.new_zeros(()))
        return (4 / tau) * s * A + slope * (lp - lp.detach()), dual, dual, dual
    unclipped_active = ratio * A <= clipped * A
    surr = torch.where(unclipped_active, ratio * A, (clipped * A).detach())
    if dual_clip is not None:  # dual-clip PPO: for A < 0 the surrogate is at least c A, a constant
        dual = (A < 0) & (ratio > dual_clip)
        surr = torch.where(dual, (dual_clip * A).detach(), surr)
    return surr, ~unclipped_active, ~unclipped_active & (A > 0), dual


def policy_loss_ref(
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
) -> PolicyLossOutput:
    """Reference :func:`iama_kernels.policy_loss`; arguments already validated."""
    dtype = compute_dtype(logp.dtype)
    keep = mask != 0
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    lp = torch.where(keep, logp.to(dtype), zero)
    old = lp.detach() if old_logp is None else torch.where(keep, old_logp.to(dtype), zero)
    if advantages.dim() == 1:
        A = advantages.to(dtype).unsqueeze(-1)
    else:  # per-token advantages, read only under the mask
        A = torch.where(keep, advantages.to(dtype), zero)

    log_ratio = lp - old
    seq = None
    if ratio_level == "sequence":
        seq = sequence_log_ratio(log_ratio.detach(), keep)
        log_ratio = torch.where(keep, seq + (lp - lp.detach()), zero)
    ratio = torch.exp(log_ratio)
    surrogate_t, clip_flag, high_flag, dual = token_surrogate(
        ratio, A, lp, eps_low, eps_high, dual_clip, surrogate, tau_pos, tau_neg)
    if ref_logp is None:
        kl = torch.zeros_like(lp)
    else:
        d = torch.where(keep, ref_logp.to(dtype), zero) - lp
        kl = torch.exp(d) - d - 1
        if kl_weight == "ratio":  # rho * k3 with rho not detached: gradient beta rho (logp - ref)
            kl = ratio * kl
    per_token = beta * kl - surrogate_t

    w = token_weights(mask, loss_type, max_completion_length, dtype)
    loss = torch.where(keep, per_token * w, zero).sum()

    m = mask.to(dtype)
    tokens = m.sum().clamp(min=1)
    with torch.no_grad():
        kl_mean = (kl.detach() * m).sum() / tokens
        clip_fraction = (clip_flag.to(dtype) * m).sum() / tokens
        ratio_mean = (ratio * m).sum() / tokens
        log_ratio_mean = (log_ratio.detach() * m).sum() / tokens
        dual_fraction = (dual.to(dtype) * m).sum() / tokens
        high_fraction = (high_flag.to(dtype) * m).sum() / tokens
        rows = None
        if row_stats:  # per row: mask total, clipped weight, clipped-above weight
            rows = torch.stack([m.sum(-1), (clip_flag.to(dtype) * m).sum(-1),
                                (high_flag.to(dtype) * m).sum(-1)], -1)
    return PolicyLossOutput(loss, kl_mean.detach(), clip_fraction, ratio_mean.detach(),
                            log_ratio_mean.detach(), dual_fraction, high_fraction,
                            None if seq is None else seq.squeeze(-1).detach(), rows)

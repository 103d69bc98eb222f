"""Eager PyTorch reference for the clipped-ratio + k3-KL policy loss (SPEC section 5).

Autograd through these ops gives exactly the closed-form gradient of the SPEC: the clipped branch
is detached, so the gradient is ``-rho A`` where the unclipped term is active (ties included) and 0
where the clipped one is (and where the dual clip holds the surrogate at ``c A``), plus
``beta (1 - exp(ref - logp))``. With ``ratio_level="sequence"`` the log-ratio of every token of a
row is GSPO's ``sg[l_i] + logp_t - sg[logp_t]`` (``l_i`` the row's mean log-ratio), whose value is
``l_i`` and whose derivative in ``logp_t`` is 1, so the same closed form holds with
``rho = exp(l_i)``. VESPO's weight ``phi`` of each row's ratio is computed first and detached,
so the gradient of its REINFORCE term is ``phi A``. GMPO's row objective ``G`` is every token's
surrogate, so its gradient (by autograd through the row's mean clipped log-ratio) is the
derivative of the row's weighted sum of ``G``. Tokens with mask 0 are never read
into the arithmetic (``torch.where``, not a product), so padding may hold inf or NaN.
"""

from __future__ import annotations

import math

import torch

from .._checks import VESPO_DEFAULTS
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


# VESPO's bounds (TRL's): each token's log-ratio at +-20 before the sum, the sum in
# [log 1e-8, 20].
VESPO_TOKEN_BOUND = 20.0
VESPO_LOG_W_MIN, VESPO_LOG_W_MAX = math.log(1e-8), 20.0


def vespo_log_weight(log_ratio: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[S, 1]`` VESPO's log sequence weight: the sum of each row's token log-ratios (each clamped
    to +-20) over its tokens with a non-zero mask, clamped to ``[log 1e-8, 20]``."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    bounded = log_ratio.clamp(-VESPO_TOKEN_BOUND, VESPO_TOKEN_BOUND)
    total = torch.where(keep, bounded, zero).sum(-1, keepdim=True)
    return total.clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)


def vespo_phi(log_w: torch.Tensor, advantages: torch.Tensor, vespo: tuple[float, float, float, float]
              ) -> torch.Tensor:
    """VESPO's gamma weight ``phi(w) = exp(lambda + k log w - lambda w)`` (``phi(1) = 1``), with
    ``(k, lambda)`` the first pair of ``vespo = (k_pos, lambda_pos, k_neg, lambda_neg)`` where the
    advantage is ``>= 0``, else the second; a non-finite weight is 0. ``log_w`` broadcasts against
    ``advantages`` (``[S, 1]`` with ``[S, 1]`` or ``[S, T]``); the result has their broadcast
    shape and ``log_w``'s dtype."""
    k_pos, lam_pos, k_neg, lam_neg = (torch.tensor(v, dtype=log_w.dtype, device=log_w.device)
                                      for v in vespo)  # in log_w's dtype, not float32's
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lam_pos, lam_neg)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def dppo_valid(lp: torch.Tensor, old: torch.Tensor, A: torch.Tensor, eps_low: float, eps_high: float,
               surrogate: str) -> torch.Tensor:
    """DPPO's trust-region mask (verl's ``dppo_tv``/``dppo_kl``): where the token may still move.

    With ``p = exp(logp)`` and ``q = exp(old)``: total variation keeps ``p - q <= eps_high``
    where ``A > 0`` and ``p - q >= -eps_low`` elsewhere; binary KL ``q (log q - log p) + (1 - q)
    log((1 - q + 1e-8) / (1 - p + 1e-8))`` keeps ``kl <= eps_high or p <= q`` where ``A > 0`` and
    ``kl <= eps_low or p >= q`` elsewhere."""
    p, q = torch.exp(lp), torch.exp(old)
    if surrogate == "dppo_tv":
        return torch.where(A > 0, p - q <= eps_high, p - q >= -eps_low)
    kl = q * (old - lp) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
    return torch.where(A > 0, (kl <= eps_high) | (p <= q), (kl <= eps_low) | (p >= q))


def gmpo_objective(log_ratio: torch.Tensor, A: torch.Tensor, mask: torch.Tensor, eps_low: float,
                   eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GMPO's row objective (Zhao et al., 2025; verl's ``"geo_mean"``), with autograd through
    ``log_ratio``.

    Each token's log-ratio is clipped by the sign of its advantage, ``min(lr, eps_high)`` where
    ``A > 0``, ``max(lr, -eps_low)`` where ``A < 0``, 0 where ``A = 0``; ``M`` is the mask-weighted
    mean of these over the row (0 for an empty row) and ``G = exp(M) Abar`` with ``Abar`` the row's
    advantage (``[S, 1]``) or the mask-weighted mean of its per-token ones. ``mask`` holds the
    weights in the compute dtype, ``A`` is ``[S, 1]`` or ``[S, T]`` (0 where the mask is 0).
    Returns ``M`` and ``G`` (``[S, 1]``) and the clipped and clipped-above flags (``[S, T]``)."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    keep = mask != 0
    pos, neg = A > 0, A < 0
    bounded = torch.where(pos, log_ratio.clamp(max=eps_high),
                          torch.where(neg, log_ratio.clamp(min=-eps_low), zero))
    total = torch.where(keep, mask * bounded, zero).sum(-1, keepdim=True)
    weight = mask.sum(-1, keepdim=True)
    # (an empty row divides by 1, not 0: where() would still send 0 * inf = NaN into the gradient)
    safe = torch.where(weight != 0, weight, torch.ones_like(weight))
    mean = torch.where(weight != 0, total / safe, zero)
    adv = A if A.shape[-1] == 1 else torch.where(weight != 0, (mask * A).sum(-1, keepdim=True) / safe, zero)
    above = keep & pos & (log_ratio.detach() > eps_high)
    below = keep & neg & (log_ratio.detach() < -eps_low)
    return mean, torch.exp(mean) * adv, above | below, above


def token_surrogate(
    ratio: torch.Tensor, A: torch.Tensor, lp: torch.Tensor, eps_low: float, eps_high: float,
    dual_clip: float | None, surrogate: str, tau_pos: float, tau_neg: float,
    old: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: the surrogate (its gradient through ``ratio`` and ``lp`` by autograd), and the
    clipped, clipped-above and dual-clipped flags of the metrics.

    clip: ``min(rho A, clip(rho) A)`` with the clipped branch detached, clipped where that branch
    is strictly the one taken (and, with ``dual_clip``, ``c A`` where ``A < 0``, ``rho > c``).
    cispo: ``sg[clip(rho)] A logp``, gradient ``clip(rho) A``; clipped where the weight was.
    sapo: ``(4 / tau) sigmoid(tau (rho - 1)) A``, ``tau = tau_pos`` where ``A > 0`` else
    ``tau_neg``, gradient ``4 s (1 - s) rho A`` (0 where the gate has saturated); never clipped.
    vespo: ``A logp`` with ``A`` already weighted by the detached ``phi``; never clipped.
    dppo_tv, dppo_kl: ``sg[min(rho', c) v] A logp`` with ``rho'`` the ratio of the log-ratio
    clamped to +-20 (verl's), ``c = dual_clip`` (``inf`` if None) and ``v`` DPPO's trust-region
    mask (:func:`dppo_valid`, on ``old``): clipped where ``v`` is 0 (above: with ``A > 0``),
    "dual-clipped" (verl's ``pg_clipfrac_lower``) where ``v`` is 1 and ``rho' > c``."""
    lo, hi = 1 - eps_low, 1 + eps_high
    clipped = ratio.clamp(lo, hi)
    dual = torch.zeros(torch.broadcast_shapes(ratio.shape, A.shape), dtype=torch.bool,
                       device=ratio.device)
    if surrogate == "cispo":
        flag = (ratio < lo) | (ratio > hi)
        return clipped.detach() * A * lp, flag, (ratio > hi) & (A > 0), dual
    if surrogate == "vespo":
        return A * lp, dual, dual, dual
    if surrogate in ("dppo_tv", "dppo_kl"):
        rho = torch.exp(torch.log(ratio.detach()).clamp(-20.0, 20.0))
        cap = rho if dual_clip is None else rho.clamp(max=dual_clip)
        valid = dppo_valid(lp.detach(), old, A, eps_low, eps_high, surrogate)
        weight = torch.where(valid, cap, cap.new_zeros(()))
        capped = valid & (rho > (math.inf if dual_clip is None else dual_clip))
        return weight * A * lp, ~valid, ~valid & (A > 0), capped
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


def kl_estimate(x: torch.Tensor, kl_estimator: str) -> torch.Tensor:
    """The estimate of ``KL(pi || pi_ref)`` per token at ``x = logp - ref`` (differentiable in
    ``x``): k3 ``exp(-x) + x - 1``, k2 ``x^2 / 2``, k1 ``x``, ``|x|``; with a ``"+"``, that value
    with k2's gradient (``k2 - sg[k2] + sg[value]``, verl's straight-through form)."""
    base = kl_estimator.rstrip("+")
    if base == "k3":
        value = torch.exp(-x) + x - 1
    elif base == "k2":
        value = 0.5 * x.square()
    elif base == "k1":
        value = x
    elif base == "abs":
        value = x.abs()
    else:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}")
    if kl_estimator.endswith("+"):
        k2 = 0.5 * x.square()
        return k2 - k2.detach() + value.detach()
    return value


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
    vespo: tuple[float, float, float, float] = VESPO_DEFAULTS,
    kl_estimator: str = "k3",
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
    elif surrogate == "vespo":  # the row's weight, detached, folded into the advantages
        seq = vespo_log_weight(log_ratio.detach(), keep)
        A = A * vespo_phi(seq, A, vespo)
    ratio = torch.exp(log_ratio)
    ratio_metric = ratio
    if surrogate == "gmpo":  # every token's surrogate is its row's objective G
        seq, surrogate_t, clip_flag, high_flag = gmpo_objective(log_ratio, A, mask.to(dtype), eps_low,
                                                                eps_high)
        surrogate_t, seq = surrogate_t.expand_as(lp), seq.detach()
        ratio_metric = torch.exp(seq).expand_as(lp)
        dual = torch.zeros_like(clip_flag)
    else:
        surrogate_t, clip_flag, high_flag, dual = token_surrogate(
            ratio, A, lp, eps_low, eps_high, dual_clip, surrogate, tau_pos, tau_neg, old)
    if ref_logp is None:
        kl = torch.zeros_like(lp)
    else:
        kl = kl_estimate(lp - torch.where(keep, ref_logp.to(dtype), zero), kl_estimator)
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
        ratio_mean = (ratio_metric * m).sum() / tokens
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

"""Public function ``policy_loss`` and the argument checks shared with ``nonlinear_grpo_loss``."""

from __future__ import annotations

import numbers

import torch

from .. import _cpu_backend as _cb
from .. import _triton_backend as _tb
from .._checks import (
    LOSS_TYPES,
    check_choice,
    check_dual_clip,
    check_float,
    check_kl,
    check_positive_float,
    check_ratio_level,
    check_surrogate,
    check_tensor,
    check_vespo,
    data_checks_enabled,
)
from .._dispatch import Backend, Call, choose, reference_check
from .._types import PolicyLossOutput
from . import cpu, reference

_POLICY_LOSS_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, cpu.policy_loss_cpu, _cb.cpu_announce),
    Backend("triton", _tb.check_triton, _tb.policy_loss_triton, _tb.announce_triton),
    Backend("reference", reference_check, reference.policy_loss_ref),
]


def check_token_inputs(
    logp: object,
    old_logp: object,
    ref_logp: object,
    mask: object,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
    max_completion_length: int | None,
    *,
    log_space_clip: bool = False,
) -> tuple[float, float, float]:
    """Validate the per-token arguments; returns ``(eps_low, eps_high, beta)`` as floats.
    ``log_space_clip``: the bounds are GMPO's, on the log-ratio (``eps_low`` may then pass 1)."""
    logp = check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [S, T], got {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is None:
            continue
        t = check_float(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(t.shape)}")
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}")
    mask = check_tensor("mask", mask)
    if mask.is_complex() or not (mask.dtype == torch.bool or mask.is_floating_point()
                                 or mask.dtype in (torch.uint8, torch.int8, torch.int16,
                                                   torch.int32, torch.int64)):
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have the shape of logp {shape}, got {tuple(mask.shape)}")
    if mask.device != logp.device:
        raise ValueError(f"mask is on {mask.device} but logp is on {logp.device}")
    eps_low = check_positive_float("eps_low", eps_low, allow_zero=True)
    if eps_low > 1 and not log_space_clip:
        raise ValueError(f"eps_low must be in [0, 1], got {eps_low}")
    eps_high = check_positive_float("eps_high", eps_high, allow_zero=True)
    beta = check_positive_float("beta", beta, allow_zero=True)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta > 0 (got beta={beta})")
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, numbers.Integral)
        or max_completion_length < 1
    ):
        raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    return eps_low, eps_high, beta


def row_span(*tensors: torch.Tensor | None) -> int:
    """The largest offset within a row, ``(T - 1) * stride(1)``, over the ``[S, T]`` tensors
    given (a backend that indexes rows in 32 bits needs it below ``2**31``)."""
    span = 0
    for t in tensors:  # a plain loop: torch.compile traces it (not max() over a generator)
        if t is not None and t.shape[1] > 0:
            span = max(span, (t.shape[1] - 1) * t.stride(1))
    return span


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
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
    row_stats: bool = False,
    impl: str = "auto",
) -> PolicyLossOutput:
    """Clipped-ratio surrogate plus k3 KL penalty: one mirror-descent step as a GRPO loss.

    Per token: ``rho = exp(logp - old_logp)``,
    ``loss_t = -(min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - beta * kl_t)`` with
    ``kl_t = exp(ref - logp) - (ref - logp) - 1`` (``surrogate`` swaps the first term for
    CISPO's, SAPO's or VESPO's; ``kl_estimator`` the second for another estimator).

    Args:
        logp: ``[S, T]`` log-probs of the sampled tokens under the policy being trained
            (float16/bfloat16/float32/float64, with autograd). Half types compute in float32.
        old_logp: ``[S, T]`` log-probs under the sampling policy, or ``None`` for
            ``logp.detach()`` (one update per batch: the ratio is 1).
        ref_logp: ``[S, T]`` log-probs under the reference policy; required when ``beta > 0``.
        advantages: ``[S]`` one advantage per sequence (float), or ``[S, T]`` one per token
            (PPO's per-token advantages, e.g. GAE's; read only where the mask is not 0). With
            data checks on (:func:`iama_kernels.set_data_checks`), a non-finite advantage is a
            ``ValueError``: per-token ones are looked for when the loss comes out non-finite.
        mask: ``[S, T]`` bool, integer or floating token weights (1 = completion token). Tokens
            with weight 0 are ignored entirely: their log-probs may be anything, even NaN.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (``eps_low = 1``: no
            lower bound; GMPO's bounds are on the log-ratio, see ``surrogate``).
        beta: KL coefficient ``>= 0``.
        loss_type: ``"grpo"`` (mean over each sequence's tokens, then over sequences; a row with
            an empty mask contributes 0 and still counts as a sequence), ``"token"`` (sum over
            tokens / number of tokens; DAPO) or ``"dr_grpo"`` (sum / (S * max_completion_length)).
        max_completion_length: the ``dr_grpo`` normaliser; defaults to ``T``.
        kl_weight: ``"none"`` (the k3 estimator above) or ``"ratio"``: each token's k3 weighted
            by its ratio, ``rho * kl_t`` with ``rho`` not detached (TRL's
            ``use_bias_correction_kl``), whose gradient is ``beta rho (logp - ref)``; the ``kl``
            metric is then the mean of ``rho * kl_t``.
        kl_estimator: the estimator ``kl_t`` of ``KL(pi || pi_ref)``, with ``x = logp - ref``
            (value; its gradient in ``logp``): ``"k3"`` (default; ``exp(-x) + x - 1``;
            ``1 - exp(-x)``; TRL's, verl's ``"low_var_kl"``), ``"k2"`` (``x^2 / 2``; ``x``;
            verl's ``"mse"``), ``"k1"`` (``x``; ``1``; verl's ``"kl"``), ``"abs"`` (``|x|``;
            ``sign(x)``). ``"k3+"``, ``"k1+"``, ``"abs+"``: that value (the ``kl`` metric too) with
            k2's gradient ``x``, verl's straight-through estimators (k2's gradient is the
            unbiased one of the KL's). Unlike verl's k3, no clamp. ``kl_weight="ratio"`` takes
            ``"k3"`` only.
        dual_clip: ``None`` or ``c > 1``: dual-clip PPO (Ye et al., 2020; verl's
            ``clip_ratio_c``): a token with ``A < 0`` and ``rho > c`` has the surrogate ``c A``, a
            constant (no surrogate gradient), so a negative advantage cannot push a token whose
            ratio has already grown past ``c`` without bound.
        ratio_level: ``"token"`` (PPO's ratio per token) or ``"sequence"`` (GSPO, Zheng et al.,
            2025): every token of row ``i`` has the ratio ``s_i = exp(l_i)``, ``l_i`` the mean of
            ``logp - old_logp`` over the row's tokens with a non-zero mask (0 for an empty row),
            as GSPO-token's ``sg[s_i] pi_t / sg[pi_t]``: its value is ``s_i`` and its derivative
            in ``logp_t`` is ``s_i``, so clipping, the dual clip, the KL weight and the gradient
            below hold with ``rho = s_i``. With one advantage per row and a mask uniform over
            each row (0/1 masks, every ``loss_type``), this loss and gradient are exactly those of
            GSPO's sequence-level objective (TRL's ``importance_sampling_level="sequence"``,
            except with ``kl_weight="ratio"``, whose KL weight TRL differentiates through the
            whole sequence); with per-token advantages it is verl's ``"gspo"`` loss. The row
            needs its mean first: a pre-pass over its logp, old_logp and mask. The metrics stay
            mask-weighted means over tokens (``ratio_mean`` of ``s_i``; ``log_ratio_mean`` is
            then the token mean of ``logp - old_logp`` for a 0/1 mask) and
            ``sequence_log_ratio`` returns the ``l_i``.
        surrogate: the policy term of the token loss, each with its own gradient:

            * ``"clip"`` (default): PPO's ``min(rho A, clip(rho) A)`` above, gradient ``rho A``
              where the unclipped term is active, else 0.
            * ``"cispo"`` (MiniMax-M1's CISPO; TRL's and verl's ``"cispo"``): ``sg[clip(rho)] A
              logp``, a REINFORCE term whose importance weight is clipped and detached, so every
              token keeps a gradient ``clip(rho) A``. ``clip_fraction`` counts the tokens whose
              weight was clipped (``rho`` outside the range, whatever ``A``),
              ``clip_high_fraction`` those above it with ``A > 0``. TRL's ``epsilon_high`` is
              the absolute bound ``eps_max``: ``eps_low=1, eps_high=eps_max - 1``.
            * ``"sapo"`` (SAPO, Gao et al., 2025; TRL's and verl's ``"sapo"``): the soft gate
              ``(4 / tau) sigmoid(tau (rho - 1)) A`` with ``tau = tau_pos`` where ``A > 0``,
              else ``tau_neg``: gradient ``4 s (1 - s) rho A`` (``s`` the sigmoid), equal to
              ``rho A`` on-policy and fading smoothly off it; no clip range, so the clip
              metrics are 0.
            * ``"vespo"`` (VESPO; TRL's ``"vespo"``): ``sg[phi_i] A logp``, a REINFORCE term
              weighted by the gamma weight ``phi_i = exp(lambda + k log w_i - lambda w_i)`` of
              row ``i``'s sequence ratio ``w_i`` (``phi(1) = 1``; a non-finite weight is 0):
              ``log w_i`` is the sum of the row's token log-ratios ``logp - old_logp``, each
              clamped to +-20, over its tokens with a non-zero mask, clamped to
              ``[log 1e-8, 20]`` (TRL's bounds), and ``(k, lambda)`` are ``(vespo_k_pos,
              vespo_lambda_pos)`` where the token's advantage is ``>= 0``, else the ``_neg``
              pair. Gradient ``phi A``; nothing is clipped (the clip metrics are 0); the KL
              term, its ``kl_weight`` and the metrics see each token's own ratio.
              ``sequence_log_ratio`` returns the ``log w_i``. A pre-pass over each row's logp,
              old_logp and mask computes ``w_i``; token-level ratios only (``ratio_level=
              "sequence"`` is a ``ValueError``: the weight is already one per sequence).

            * ``"dppo_tv"`` and ``"dppo_kl"`` (DPPO-Binary-TV and -KL; verl's ``"dppo_tv"`` and
              ``"dppo_kl"``): ``sg[min(rho', c) v] A logp``, a REINFORCE term with a truncated,
              detached importance weight (``rho'`` the ratio of the log-ratio clamped to +-20,
              verl's; ``c = dual_clip``, no cap when None) and a trust-region mask ``v`` on the
              token probabilities ``p = exp(logp)``, ``q = exp(old_logp)``, with ``eps_low`` and
              ``eps_high`` as the divergence bounds: total variation keeps ``p - q <= eps_high``
              for ``A > 0`` and ``p - q >= -eps_low`` otherwise; binary KL ``q log(q / p) +
              (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8))`` keeps ``kl <= eps_high or p <= q``
              for ``A > 0`` and ``kl <= eps_low or p >= q`` otherwise. Gradient ``min(rho', c) v
              A``. ``clip_fraction`` counts the masked-out tokens (``v = 0``; verl's
              ``pg_clipfrac``), ``clip_high_fraction`` those with ``A > 0``, and
              ``dual_clip_fraction`` the kept ones whose weight was truncated (``rho' > c``;
              verl's ``pg_clipfrac_lower``). Token-level ratios only.
            * ``"gmpo"`` (GMPO, Zhao et al., 2025; verl's ``"geo_mean"``): every token of row
              ``i`` carries the row's objective ``G_i = exp(M_i) Abar_i``, ``M_i`` the
              mask-weighted mean over the row of its log-ratios clipped by the sign of their
              advantage (``min(lr, eps_high)`` where ``A > 0``, ``max(lr, -eps_low)`` where
              ``A < 0``, 0 where ``A = 0``) and ``Abar_i`` the row's advantage (the mask-weighted
              mean of per-token ones): the geometric mean of the clipped token ratios in place
              of their arithmetic mean. With ``loss_type="grpo"`` the loss is GMPO's
              ``-mean_i G_i``; the other loss types weight row ``i`` by its share of the token
              weights. Gradient ``G_i`` (times the token's weight) where the token's log-ratio is
              not clipped and ``A != 0``, else 0. ``eps_low`` and ``eps_high`` bound the
              *log*-ratio (``eps_low`` may exceed 1; GMPO's paper uses 0.4 and 0.4).
              ``ratio_mean`` is the mean of the rows' ``exp(M_i)``, ``clip_fraction`` counts the
              tokens whose clip acts (``clip_high_fraction``: above, ``A > 0``) and
              ``sequence_log_ratio`` returns the ``M_i``. A pre-pass over each row's logp,
              old_logp, mask (and per-token advantages) computes ``M_i`` and ``Abar_i``.
              Token-level ratios only; no dual clip.

            ``dual_clip`` is the clipped surrogate's, and DPPO's weight cap; a ``ValueError``
            with the others.
        tau_pos, tau_neg: SAPO's temperatures (``> 0``; defaults TRL's and verl's), ignored by
            the other surrogates.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's shapes ``k``
            (finite) and rates ``lambda`` (finite, ``> 0``; TRL clamps its own at ``1e-4``) for
            ``A >= 0`` and ``A < 0`` (defaults TRL's), ignored by the other surrogates.
        row_stats: also return ``row_clip_weights``, ``[S, 3]``: each row's mask total, clipped
            weight and clipped-above weight (the per-row sums of ``clip_fraction`` and
            ``clip_high_fraction``; TRL's per-sequence clip metrics come from them). Off, no
            per-row result is written.
        impl: ``"auto"`` or an explicit backend name.

    Returns:
        :class:`~iama_kernels.PolicyLossOutput` of scalars (float64 for float64 ``logp``, else
        float32): ``loss`` and the detached metrics ``kl``, ``clip_fraction``, ``ratio_mean``,
        ``log_ratio_mean``, ``dual_clip_fraction``, ``clip_high_fraction`` (mask-weighted means
        over tokens), ``sequence_log_ratio``: ``[S]`` each row's ``l_i`` with
        ``ratio_level="sequence"``, its ``log w_i`` with ``surrogate="vespo"`` or its ``M_i``
        with ``"gmpo"`` (``None`` otherwise), and ``row_clip_weights`` (``None`` unless ``row_stats``).
        ``d loss / d logp_t = w_t (-(rho A if the unclipped term is active and the dual clip
        is not else 0) + beta (1 - exp(ref - logp)))`` (``beta rho (logp - ref)`` in place of
        the last term with ``kl_weight="ratio"``, ``beta`` times the estimator's gradient with
        another ``kl_estimator``; the surrogate's own gradient, see ``surrogate``, for the others).
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
    if not isinstance(row_stats, bool):
        raise TypeError(f"row_stats must be a bool, got {type(row_stats).__name__}")
    advantages = check_float("advantages", advantages)
    per_token = advantages.dim() == 2
    if tuple(advantages.shape) not in ((logp.shape[0],), tuple(logp.shape)):
        raise ValueError(f"advantages must have shape [S] = [{logp.shape[0]}] or the shape of logp "
                         f"{tuple(logp.shape)}, got {tuple(advantages.shape)}")
    if advantages.device != logp.device:
        raise ValueError(f"advantages is on {advantages.device} but logp is on {logp.device}")
    if data_checks_enabled() and not per_token and not bool(torch.isfinite(advantages).all()):
        bad = int((~torch.isfinite(advantages)).nonzero()[0, 0])
        raise ValueError(f"advantages must be finite, got {advantages[bad].item()} at sequence {bad}")
    call = Call("policy_loss", logp.device, impl != "auto",
                {"dtype": logp.dtype, "shape": tuple(logp.shape),
                 "row_span": row_span(logp, old_logp, ref_logp, mask,
                                      advantages if per_token else None)})
    backend = choose("policy_loss", impl, _POLICY_LOSS_BACKENDS, call)
    out = backend.run(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta,
                      loss_type, max_completion_length, kl_weight, dual_clip, ratio_level,
                      surrogate, tau_pos, tau_neg, row_stats, vespo, kl_estimator)
    if per_token and data_checks_enabled():
        _check_token_advantages(out.loss, advantages, mask)
    return out


def _check_token_advantages(loss: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> None:
    """Per-token advantages are checked through the loss, which any non-finite one under the mask
    makes non-finite: a check of every token up front would cost as much as the loss itself."""
    if bool(torch.isfinite(loss.detach())):
        return
    bad_at = ~torch.isfinite(advantages) & (mask != 0)
    if bool(bad_at.any()):
        where = tuple(int(i) for i in bad_at.nonzero()[0])
        raise ValueError(f"advantages must be finite, got {advantages[where].item()} at "
                         f"(sequence, token) {where}")

"""verl's PPO actor loss on the fused kernel: the ``"iama"``, ``"iama_gspo"``, ``"iama_cispo"``,
``"iama_sapo"``, ``"iama_gpg"``, ``"iama_dppo_tv"``, ``"iama_dppo_kl"``, ``"iama_geo_mean"``,
``"iama_kl_cov"``, ``"iama_clip_cov"``, ``"iama_dro"`` and ``"iama_bypass_mode"`` policy losses.

verl computes the actor's clipped-ratio loss through a registered *policy loss*
(``actor_rollout_ref.actor.policy_loss.loss_mode``, ``"vanilla"`` by default). This module gives
verl one that computes what ``"vanilla"`` computes (the PPO clip with ``clip_ratio_low`` and
``clip_ratio_high``, the dual clip ``clip_ratio_c``, every ``loss_agg_mode``, verl's global
batch normalisers, ``rollout_is_weights``) in one pass of :func:`iama_kernels.policy_loss`, which
writes the gradient of the loss with respect to the log-probs during the forward pass instead of
materialising a dozen ``[bs, T]`` intermediates. With iama installed, ``import verl`` registers it
(the plugin that also registers the ``"iama"`` advantage estimator)::

    python -m verl.trainer.main_ppo actor_rollout_ref.actor.policy_loss.loss_mode=iama ...

The advantages are verl's ``[bs, T]`` token-level ones, read by the kernel as they are: those of
the outcome estimators (GRPO, RLOO, ``"iama"``: one value per response) and GAE's alike.

``"iama_gspo"`` is verl's ``"gspo"`` (GSPO-token: every token's ratio is its response's
``exp(mean log-ratio)``, with the gradient of a token ratio; the clip with ``clip_ratio_low`` and
``clip_ratio_high``, no dual clip, every ``loss_agg_mode``) on the kernel's
``ratio_level="sequence"``: ``loss_mode=iama_gspo``. Besides the differences below, verl clamps
the sequence log-ratio at 10 (the kernel does not), and with ``rollout_is_weights`` the mean
log-ratio is taken over the tokens whose weight is not 0 (verl's: over the response mask; the
same for positive weights).

``"iama_cispo"`` and ``"iama_sapo"`` are verl's ``"cispo"`` (the importance weight clipped to
``[1 - clip_ratio_low, 1 + clip_ratio_high]`` and detached, times ``A log_prob``; every
``loss_agg_mode``) and ``"sapo"`` (the soft gate with the actor config's ``tau_pos`` and
``tau_neg``; like verl, always aggregated ``"seq-mean-token-mean"``, whatever ``loss_agg_mode``
says) on the kernel's ``surrogate="cispo"`` and ``"sapo"``, token-level ratios, no dual clip.
Their ``actor/pg_clipfrac_lower`` is 0, as verl's, and SAPO's ``actor/pg_clipfrac`` too. A
``clip_ratio_low`` above 1 (MiniMax-M1's way of dropping CISPO's lower bound) is taken as 1: the
bound ``1 - clip_ratio_low`` is then below every ratio either way. Neither reads ``clip_ratio_c``.

``"iama_gpg"`` is verl's ``"gpg"`` (GPG's plain policy gradient ``-A log_prob``, no ratio, every
``loss_agg_mode``, no metrics): the kernel's CISPO term without ``old_log_prob``, whose weight
is then exactly 1.

``"iama_dppo_tv"`` and ``"iama_dppo_kl"`` are verl's ``"dppo_tv"`` and ``"dppo_kl"`` (DPPO-Binary:
``-A sg[min(rho, c) v] log_prob`` with the ratio of the log-ratio clamped to +-20, ``c`` the
actor config's ``clip_ratio_c``, verl's default 20 there, and ``v`` the trust region on the token
probabilities, bounded by ``clip_ratio_high`` for ``A > 0`` and ``clip_ratio_low`` otherwise;
every ``loss_agg_mode``) on the kernel's ``surrogate="dppo_tv"``/``"dppo_kl"`` with the cap as
its ``dual_clip``: ``actor/pg_clipfrac`` is the share of tokens outside the region and
``actor/pg_clipfrac_lower`` of those inside whose weight was capped, as verl's. A
``clip_ratio_low`` above 1 is taken as 1 for TV (the same region) and refused for KL.

``"iama_kl_cov"`` is verl's ``"kl_cov"`` (KL-Cov, Cui et al., 2025: the unclipped ``-A ratio``
on every token plus ``ppo_kl_coef |log_prob - old_log_prob|`` on the ``kl_cov_ratio`` share of
response tokens whose centred advantage times centred log-prob is largest; every
``loss_agg_mode``, rollout weights): the ratio term on the kernel (the clipped surrogate with the
range opened to ``[0, 1 + 1e30]``, which only a log-ratio above 69 leaves), the selection by
:func:`iama_kernels.covariance_top_k` on CPU tensors (two reads of the inputs in C++; verl
gathers the response tokens and sorts out a top-k) and in verl's arithmetic in PyTorch on other
devices (verl copies every response token's advantage and log-prob to the host for it), its few
penalised tokens in PyTorch. Its one metric, ``actor/ppo_kl``, is the mean absolute log-ratio, as
verl's. Where two tokens' products are within rounding of each other at the selection's edge
(the C++ means are in float64, verl's in float32), the other one may be picked.

``"iama_clip_cov"`` is verl's ``"clip_cov"`` (Clip-Cov, Cui et al., 2025: PPO's clip, no dual
clip, with the ``clip_cov_ratio`` share of response tokens, drawn at random among the unclipped
ones whose centred advantage times centred log-prob lies between ``clip_cov_lb`` and
``clip_cov_ub``, taken out of the loss; every ``loss_agg_mode``, rollout weights): the draw as
verl's (the same ``torch.randperm`` call over the same candidates, found by
:func:`iama_kernels.covariance_band` on CPU tensors: the same seed picks the same tokens), the loss on the
kernel with those tokens' advantages set to 0 (they still count in the normalisers, as in
verl's). ``actor/pg_clipfrac`` is, as verl's, the share of tokens taken out.

``"iama_dro"`` is verl's ``"dro"`` (Direct Reward Optimization's ``-(A log_prob - dro_beta
(log_prob - old_log_prob)^2 / 2)``, every ``loss_agg_mode``, rollout weights): the kernel's CISPO
term with its range closed to ``[1, 1]`` (a weight of exactly 1: ``-A log_prob``) and its KL term
with ``kl_estimator="k2"`` and ``old_log_prob`` as the reference, ``beta = policy_loss.dro_beta``
(required, > 0, as verl's). Its one metric, ``actor/ppo_kl``, is the mean of ``old_log_prob -
log_prob``, as verl's.

``"iama_bypass_mode"`` is verl's ``"bypass_mode"`` (training on the rollout policy's log-probs
as ``old_log_prob``, with verl's rollout correction from ``policy_loss.rollout_correction``):
verl's own ``compute_rollout_correction_and_rejection_mask`` (truncated importance weights at
token or sequence level, rejection by token or sequence divergences, and its ``rollout_corr/``
metrics), then, as verl's, ``loss_type="ppo_clip"``: ``"iama"`` under the rejection mask without
the weights (the ratio is already the correction), or ``"reinforce"``: ``-w A log_prob`` (the
kernel's ``gpg`` with the weights) under it, with ``actor/ppo_kl`` the mean of ``old_log_prob -
log_prob`` over it.

``"iama_geo_mean"`` is verl's ``"geo_mean"`` (GMPO, Zhao et al., 2025: each response's loss is
``-Abar exp(M)``, ``M`` the mean over its tokens of the log-ratios clipped by the sign of their
advantage to ``clip_ratio_high`` above where ``A > 0`` and ``-clip_ratio_low`` below where
``A < 0``, ``Abar`` the mean advantage; the mean over the micro-batch's responses, whatever
``loss_agg_mode`` and ``global_batch_info`` say, as verl's; no dual clip) on the kernel's
``surrogate="gmpo"`` with ``loss_type="grpo"``. Its bounds are on the log-ratio, so a
``clip_ratio_low`` above 1 is taken as given. ``rollout_is_weights`` multiply each response's loss
by their geometric mean over it, as verl's (folded into its advantages: a positive factor).
verl divides the means by the mask count plus 1e-8 (the kernel by the count: a relative
difference of at most 1e-8), and does not clamp the log-ratio (neither does the kernel). Its
``actor/pg_clipfrac`` and ``actor/pg_clipfrac_lower`` are the shares of tokens clipped above with
``A > 0`` and below with ``A < 0``, those whose clip acts; verl's count every token outside the
range by the sign of its advantage alone (also those with ``A > 0`` below it, which GMPO does not
clip), so theirs are at least ours.

What differs from ``"vanilla"`` (and from verl's other losses alike):

* verl clamps ``log_prob - old_log_prob`` to ``[-20, 20]`` before ``exp``; the kernel does not.
  For the clipped surrogate the loss and its gradient differ only on tokens whose ratio is below
  ``e**-20`` (by at most ``e**-20 |A|`` each); above ``e**20`` both clips make the token's loss
  a constant anyway. CISPO's and SAPO's weights and gates saturate there too (their gradients are
  those of the clamped ratio to rounding), but their loss values see the unclamped ratio.
  ``actor/ppo_kl`` is then the mean of the unclamped log-ratios.
* With ``rollout_is_weights`` the metrics are means weighted by each token's weight in the loss
  (the importance weight, divided by the response's length for ``seq-mean-token-mean``); verl's
  are unweighted means over the response tokens.
* An empty batch (no response token) gives a loss of 0, not verl's 0/0.

Metrics (as ``"vanilla"``): ``actor/pg_clipfrac``, ``actor/ppo_kl``,
``actor/pg_clipfrac_lower``, read from the device in one transfer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from iama_kernels import covariance_band, covariance_top_k, policy_loss
from iama_kernels._checks import RATIO_LEVELS, check_choice
from iama_kernels._dispatch import IMPLS, Call
from iama_kernels._triton_backend import check_triton

POLICY_LOSS_NAME = "iama"
# verl's loss -> (the name iama's registers, ratio_level, surrogate of VerlPolicyLoss)
VERL_LOSSES = {"vanilla": (POLICY_LOSS_NAME, "token", "clip"), "gspo": ("iama_gspo", "sequence", "clip"),
               "cispo": ("iama_cispo", "token", "cispo"), "sapo": ("iama_sapo", "token", "sapo"),
               "gpg": ("iama_gpg", "token", "gpg"), "dppo_tv": ("iama_dppo_tv", "token", "dppo_tv"),
               "dppo_kl": ("iama_dppo_kl", "token", "dppo_kl"),
               "geo_mean": ("iama_geo_mean", "token", "gmpo"), "kl_cov": ("iama_kl_cov", "token", "kl_cov"),
               "clip_cov": ("iama_clip_cov", "token", "clip_cov"), "dro": ("iama_dro", "token", "dro"),
               "bypass_mode": ("iama_bypass_mode", "token", "bypass")}
# verl's surrogates on the kernel's (gpg: the kernel's "cispo" without old_log_prob; kl_cov: its
# "clip" with the range opened, plus the KL term of the selected tokens; clip_cov: its "clip"
# without the dual clip, the selected tokens' advantages set to 0; dro: its "cispo" with the weight
# held at 1 and the k2 KL term to old_log_prob; bypass: verl's rollout correction, then "clip" or
# "gpg" with its weights and rejection mask)
VERL_SURROGATES = ("clip", "cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "gmpo", "kl_cov", "clip_cov", "dro",
                   "bypass")
BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")
# kl_cov's clip range on the kernel: [0, 1 + 1e30], which no finite ratio below e**69 leaves
_OPEN_RANGE = (1.0, 1e30)
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                  "seq-mean-token-mean")


def _option(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` of verl's actor config (a dataclass with ``get``), or a mapping's entry."""
    if config is None:
        return default
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


def _clip_range(config: Any, surrogate: str = "clip") -> tuple[float, float, float | None]:
    """``(eps_low, eps_high, c)`` from ``clip_ratio``, ``clip_ratio_low/high``, ``clip_ratio_c``
    (``c`` None for CISPO and SAPO, which have no dual clip; their ``eps_low`` at most 1). For
    DPPO the bounds are the trust region's divergence bounds and ``c`` the weight's cap (verl's
    default there 20)."""
    if config is None:
        raise ValueError("config (verl's actor config, with clip_ratio and clip_ratio_c) is required")
    clip_ratio = _option(config, "clip_ratio", 0.2)
    low = float(_option(config, "clip_ratio_low", clip_ratio))
    high = float(_option(config, "clip_ratio_high", clip_ratio))
    if surrogate in ("gpg", "dro"):  # the range [1, 1] holds the weight at exactly 1
        return 0.0, 0.0, None
    if surrogate == "gmpo":  # bounds on the log-ratio, any >= 0; no dual clip
        return low, high, None
    if surrogate == "kl_cov":  # no clip: -A ratio on every token
        return _OPEN_RANGE[0], _OPEN_RANGE[1], None
    if surrogate == "clip_cov":  # PPO's clip, no dual clip
        return low, high, None
    if surrogate == "dppo_kl" and low > 1.0:
        raise ValueError(f"iama's dppo_kl takes clip_ratio_low <= 1 (its KL bound for A <= 0), got {low}")
    if surrogate not in ("clip", "dppo_tv", "dppo_kl"):
        return min(low, 1.0), high, None  # (SAPO reads neither bound)
    dppo = surrogate.startswith("dppo")
    c = float(_option(config, "clip_ratio_c", 20.0 if dppo else 3.0))
    if dppo:  # DPPO-TV's p - q >= -low holds for every low >= 1, as for 1
        low = min(low, 1.0)
    if not c > 1.0:
        raise ValueError(f"clip_ratio_c (the dual clip) must be > 1, got {c}")
    return low, high, c


def _require_global(name: str, dp_size: float) -> None:
    """verl's rule: a local count stands in for the global one only without data parallelism."""
    if dp_size > 1:
        raise ValueError(f"(global) {name} is required in config.global_batch_info when "
                         f"dp_size > 1 (got dp_size={dp_size:g})")


def _count(value: Any, local: Callable[[], torch.Tensor], name: str, dp_size: float) -> torch.Tensor | float:
    """A global count from verl's ``global_batch_info`` (int or tensor), else the local one (a
    pass over the mask, made only then), at least 1."""
    if value is None:
        _require_global(name, dp_size)
        return local().clamp(min=1)
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64).clamp(min=1)
    return float(max(value, 1))


class VerlPolicyLoss:
    """A verl policy loss: ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
    config, rollout_is_weights) -> (loss, metrics)``, verl's ``"vanilla"`` (or ``"gspo"``,
    ``"cispo"``, ``"sapo"``) on the fused kernel.

    Args:
        impl: backend of :func:`iama_kernels.policy_loss` (``"auto"``: Triton on CUDA, the C++
            extension on CPU).
        ratio_level: ``"token"`` (verl's ``"vanilla"``) or ``"sequence"`` (verl's ``"gspo"``:
            GSPO-token's sequence ratio, no dual clip).
        surrogate: ``"clip"`` (verl's ``"vanilla"``/``"gspo"``), ``"cispo"``, ``"sapo"``,
            ``"gpg"``, ``"dppo_tv"``, ``"dppo_kl"``, ``"kl_cov"``, ``"clip_cov"``, ``"dro"`` (verl's losses of
            those names), ``"gmpo"`` (verl's ``"geo_mean"``) or ``"bypass"`` (verl's
            ``"bypass_mode"``); token-level ratios only, as verl's.
    """

    def __init__(self, impl: str = "auto", ratio_level: str = "token", surrogate: str = "clip") -> None:
        check_choice("impl", impl, IMPLS)
        check_choice("ratio_level", ratio_level, RATIO_LEVELS)
        check_choice("surrogate", surrogate, VERL_SURROGATES)
        if surrogate != "clip" and ratio_level != "token":
            raise ValueError(f"verl's {surrogate!r} loss has token-level ratios, got "
                             f"ratio_level={ratio_level!r}")
        self.impl = impl
        self.ratio_level = ratio_level
        self.surrogate = surrogate

    def _key(self) -> tuple[str, str, str]:
        return self.impl, self.ratio_level, self.surrogate

    def __repr__(self) -> str:
        return (f"VerlPolicyLoss(impl={self.impl!r}, ratio_level={self.ratio_level!r}, "
                f"surrogate={self.surrogate!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerlPolicyLoss) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(
        self,
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The aggregated PPO loss (differentiable in ``log_prob``) and verl's metrics.

        Args:
            old_log_prob, log_prob: ``[bs, T]`` log-probs under the rollout (old) and current
                policy; ``log_prob`` carries the gradient.
            advantages: ``[bs, T]`` token-level advantages (read only under the mask).
            response_mask: ``[bs, T]`` bool (or 0/1) mask of the response tokens.
            loss_agg_mode: one of :data:`LOSS_AGG_MODES`, as verl's ``agg_loss``.
            config: verl's actor config: ``clip_ratio(_low/_high)``, ``clip_ratio_c``, SAPO's
                ``tau_pos``/``tau_neg`` and the
                ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
                ``loss_scale_factor``) that verl fills in before each call.
            rollout_is_weights: ``[bs, T]`` importance weights of rollout correction, or None.
        """
        check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
        if self.surrogate == "bypass":
            return self._bypass(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config)
        eps_low, eps_high, dual_clip = _clip_range(config, self.surrogate)
        if self.ratio_level == "sequence":
            dual_clip = None  # verl's "gspo" has no dual clip (nor "cispo" and "sapo")
        if self.surrogate == "sapo":
            loss_agg_mode = "seq-mean-token-mean"  # verl's "sapo" aggregates so, whatever it is given
        tau_pos = float(_option(config, "tau_pos", 1.0))
        tau_neg = float(_option(config, "tau_neg", 1.05))
        for name, t in (("old_log_prob", old_log_prob), ("log_prob", log_prob),
                        ("advantages", advantages), ("response_mask", response_mask)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != log_prob.shape or t.ndim != 2:
                raise ValueError(f"{name} must be [bs, T] like log_prob {tuple(log_prob.shape)}, "
                                 f"got {tuple(t.shape)}")
        keep = response_mask if response_mask.dtype == torch.bool else response_mask != 0
        info = _option(config, "global_batch_info", {}) or {}
        dp_size = float(info.get("dp_size", 1) or 1)
        S, T = log_prob.shape

        # The kernel's loss types are per-token weights over the mask; verl's normalisers are
        # global counts. "token" is verl's local token-mean; "grpo" divides each response by its
        # own token count (seq-mean-token-mean); "dr_grpo" with length 1 is sum(loss * mask) / S,
        # which every other mode rescales by a positive scalar (the loss is linear in it; on the
        # GPU the backward multiplies the saved gradient by the incoming one anyway).
        mask: torch.Tensor = keep
        loss_type, length = "dr_grpo", 1
        count_rows = False
        gmpo = self.surrogate == "gmpo"
        if gmpo:  # verl's geo_mean: the local mean of the responses' losses, whatever the mode
            loss_type, length, scale = "grpo", None, 1.0
        elif loss_agg_mode == "token-mean":
            tokens = info.get("batch_num_tokens")
            if tokens is None and rollout_is_weights is None:
                _require_global("batch_num_tokens", dp_size)
                loss_type, length, scale = "token", None, 1.0  # the kernel counts the tokens
            else:
                scale = S / _count(tokens, lambda: torch.count_nonzero(keep).double(), "batch_num_tokens",
                                   dp_size)
        elif loss_agg_mode == "token-sum":
            scale = float(S)
        else:
            sequences = info.get("global_batch_size")
            # Without verl's count, that of the responses with a token comes from the kernel's
            # row totals when it reads the mask itself (no second pass over it).
            count_rows = sequences is None and rollout_is_weights is None
            if count_rows:
                _require_global("global_batch_size", dp_size)
                scale = float(S)
            else:
                scale = S / _count(sequences, lambda: keep.any(dim=1).sum().double(), "global_batch_size",
                                   dp_size)
            if loss_agg_mode == "seq-mean-token-sum-norm":
                factor = info.get("loss_scale_factor") or T
                scale = scale / float(factor)
            elif loss_agg_mode == "seq-mean-token-mean":
                if rollout_is_weights is None:  # grpo: each response over its count, then / S
                    loss_type, length = "grpo", None
                else:
                    # verl adds 1e-8 to the integer count in float32, where it vanishes. (The
                    # bool mask through its bytes: a bool sum or product converts it inside.)
                    ones = keep.view(torch.uint8)
                    counts = ones.sum(dim=1, keepdim=True, dtype=torch.int32).clamp(min=1)
                    mask = ones.to(log_prob.dtype) / counts
        if rollout_is_weights is not None and rollout_is_weights.shape != log_prob.shape:
            raise ValueError(f"rollout_is_weights must be [bs, T] like log_prob, got "
                             f"{tuple(rollout_is_weights.shape)}")
        adv = advantages.detach()
        if rollout_is_weights is not None and gmpo:  # each response's geometric-mean weight, into A
            m = keep.to(log_prob.dtype)
            log_w = (torch.log(rollout_is_weights.detach() + 1e-10) * m).sum(dim=1)
            adv = adv * torch.exp(log_w / (m.sum(dim=1) + 1e-8)).unsqueeze(1)
        elif rollout_is_weights is not None:
            mask = rollout_is_weights.detach() * mask
        if not gmpo:
            scale = scale * dp_size
        gpg, kl_cov, clip_cov, dro = (self.surrogate == name for name in ("gpg", "kl_cov", "clip_cov", "dro"))
        surrogate = "cispo" if gpg or dro else ("clip" if kl_cov or clip_cov else self.surrogate)
        beta, ref = 0.0, None
        if dro:  # the quadratic penalty to old_log_prob: the kernel's k2 KL term
            beta = _option(_option(config, "policy_loss"), "dro_beta")
            if beta is None or not float(beta) > 0:
                raise ValueError(f"policy_loss.dro_beta must be a positive value when using DRO, got {beta}")
            beta, ref = float(beta), old_log_prob.detach()
        taken_out = 0.0
        if clip_cov:  # the selected tokens' terms are 0 (and still count in the normalisers)
            picked, taken_out = _clip_cov_tokens(log_prob, old_log_prob, advantages, keep, eps_low, eps_high,
                                                 config, self.impl)
            adv = adv.masked_fill(picked, 0.0)
        out = policy_loss(log_prob, None if gpg else old_log_prob.detach(), ref, adv, mask,
                          eps_low=eps_low, eps_high=eps_high, beta=beta, loss_type=loss_type,
                          kl_estimator="k2" if dro else "k3",
                          max_completion_length=length, dual_clip=dual_clip, ratio_level=self.ratio_level,
                          surrogate=surrogate, tau_pos=tau_pos, tau_neg=tau_neg, row_stats=count_rows,
                          impl=self.impl)
        if count_rows:
            scale = scale / (out.row_clip_weights[:, 0] > 0).sum().clamp(min=1).double()
        metrics: dict[str, float] = {}
        loss = out.loss
        if kl_cov:  # the KL term of the selected tokens; verl's one metric, the mean |log-ratio|
            penalty, abs_kl = _kl_cov_terms(log_prob, old_log_prob, advantages, keep, mask, loss_type, length,
                                            config, self.impl)
            loss = loss + penalty.to(loss.dtype)
            metrics = {"actor/ppo_kl": float(abs_kl)}
        elif clip_cov:  # verl's pg_clipfrac here: the share of tokens whose term was set to 0
            metrics = {"actor/pg_clipfrac": taken_out, "actor/ppo_kl": -float(out.log_ratio_mean)}
        elif dro:  # verl's one metric (its clip flags would mean nothing: the range is [1, 1])
            metrics = {"actor/ppo_kl": -float(out.log_ratio_mean)}
        elif not gpg:  # verl's "gpg" returns no metrics (and so reads nothing back from the device)
            # (GMPO's: clipped above with A > 0, clipped below with A < 0)
            clipfrac, log_ratio, other = torch.stack(
                [out.clip_fraction, out.log_ratio_mean,
                 out.clip_high_fraction if gmpo else out.dual_clip_fraction]).tolist()
            lower = clipfrac - other if gmpo else other
            clipfrac = other if gmpo else clipfrac
            metrics = {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": -log_ratio,
                       "actor/pg_clipfrac_lower": lower}
        if isinstance(scale, torch.Tensor):
            return loss * scale.to(loss.dtype), metrics
        return (loss if scale == 1.0 else loss * scale), metrics

    def _bypass(self, old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, loss_agg_mode: str, config: Any
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """verl's ``"bypass_mode"``: ``old_log_prob`` is the rollout policy's; verl's own rollout
        correction (its truncated IS weights and rejection mask, with its metrics) from
        ``policy_loss.rollout_correction``, then PPO's clip (``loss_type="ppo_clip"``, no weights:
        the ratio already is the rollout correction) or REINFORCE (``"reinforce"``: ``-w A
        log_prob``, the kernel's ``gpg`` with the weights) under the rejection mask."""
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

        correction = _option(_option(config, "policy_loss"), "rollout_correction")
        if correction is None:
            raise ValueError("policy_loss.rollout_correction is required for bypass_mode (verl's rollout "
                             "correction config)")

        def get(name: str, default: Any) -> Any:  # as verl reads it: an explicit None stays None
            return correction.get(name, default) if hasattr(correction, "get") else getattr(correction, name,
                                                                                             default)

        loss_type = get("loss_type", "ppo_clip")
        check_choice("policy_loss.rollout_correction.loss_type", loss_type, BYPASS_LOSS_TYPES)
        with torch.no_grad():
            weights, effective_mask, rollout_metrics = compute_rollout_correction_and_rejection_mask(
                old_log_prob=log_prob, rollout_log_prob=old_log_prob, response_mask=response_mask,
                rollout_is=get("rollout_is", None), rollout_is_threshold=get("rollout_is_threshold", 2.0),
                rollout_is_batch_normalize=get("rollout_is_batch_normalize", False),
                rollout_rs=get("rollout_rs", None), rollout_rs_threshold=get("rollout_rs_threshold", None))
        if loss_type == "ppo_clip":
            loss, metrics = VerlPolicyLoss(self.impl, "token", "clip")(
                old_log_prob, log_prob, advantages, effective_mask, loss_agg_mode, config, None)
        else:
            w = weights.batch["rollout_is_weights"] if weights else None
            loss, metrics = VerlPolicyLoss(self.impl, "token", "gpg")(
                old_log_prob, log_prob, advantages, effective_mask, loss_agg_mode, config, w)
            # verl's masked mean of old - new over the effective mask
            keep = effective_mask != 0
            diff = torch.where(keep, old_log_prob.detach() - log_prob.detach(), 0.0)
            metrics = {"actor/ppo_kl": float(diff.sum() / (torch.count_nonzero(keep) + 1e-8))}
        return loss, {**metrics, **rollout_metrics}


def _selection_impl(impl: str, log_prob: torch.Tensor) -> str | None:
    """The ``impl=`` of :func:`covariance_top_k` / :func:`covariance_band` for these tensors, or
    ``None`` for verl's own arithmetic on the device (in the inputs' dtype, to verl's bits): an
    explicit ``impl`` is the ops' too; ``auto`` runs the C++ backend on CPU and the Triton one on
    CUDA (not in float64, which it refuses), else verl's arithmetic."""
    if impl != "auto" or log_prob.device.type == "cpu":
        return impl
    on_device = Call("covariance_top_k", log_prob.device, False, {"dtype": log_prob.dtype})
    return "triton" if log_prob.device.type == "cuda" and check_triton(on_device) is None else None


def _clip_cov_tokens(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     keep: torch.Tensor, eps_low: float, eps_high: float, config: Any, impl: str
                     ) -> tuple[torch.Tensor, float]:
    """``[bs, T]`` bool: the tokens verl's ``"clip_cov"`` (Clip-Cov, Cui et al., 2025) takes out
    of the loss, chosen as verl chooses them: among the response tokens PPO's clip does not act on
    whose centred advantage times centred log-prob lies strictly between ``clip_cov_lb`` and
    ``clip_cov_ub`` (:func:`iama_kernels.covariance_band`), ``max(1, int(clip_cov_ratio n))`` at
    random (``torch.randperm`` on the default generator, as verl: the same seed picks the same
    tokens); and their share of the ``n``."""
    policy = _option(config, "policy_loss")
    ratio = float(_option(policy, "clip_cov_ratio", 0.0002))
    lb = float(_option(policy, "clip_cov_lb", 1.0))
    ub = float(_option(policy, "clip_cov_ub", 5.0))
    if not ratio > 0:
        raise ValueError(f"policy_loss.clip_cov_ratio must be > 0, got {ratio}")
    with torch.no_grad():
        n = int(torch.count_nonzero(keep))
        selection = _selection_impl(impl, log_prob)
        if selection is not None:
            candidates = covariance_band(advantages, log_prob, keep, lb, ub, old_logp=old_log_prob,
                                         eps_low=eps_low, eps_high=eps_high, impl=selection)
        else:
            candidates = _band_on_device(log_prob, old_log_prob, advantages, keep, eps_low, eps_high, lb, ub)
        picked = torch.zeros_like(keep)
        if len(candidates) == 0:
            return picked, 0.0
        number = min(max(int(ratio * n), 1), len(candidates))
        picked.view(-1)[candidates[torch.randperm(len(candidates))[:number]]] = True
    return picked, number / max(1, n)


def _band_on_device(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    keep: torch.Tensor, eps_low: float, eps_high: float, lb: float, ub: float
                    ) -> torch.Tensor:
    """Clip-Cov's candidates (flat indices) in verl's arithmetic, on the inputs' device."""
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    # verl's masked means, to the same bits (the count in float32)
    denominator = torch.count_nonzero(keep) + 1e-8

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (torch.where(keep, x, zero) * keep).sum() / denominator

    adv = advantages.detach()
    ratio_t = torch.exp(log_prob.detach() - old_log_prob.detach())
    clipped = (-adv * ratio_t.clamp(1 - eps_low, 1 + eps_high) > -adv * ratio_t) & keep
    cov = (adv - masked_mean(adv)) * (log_prob.detach() - masked_mean(log_prob.detach()))
    return ((cov < ub) & (cov > lb) & keep & ~clipped).reshape(-1).nonzero().squeeze(1)


def _top_k_on_device(advantages: torch.Tensor, log_prob: torch.Tensor, keep: torch.Tensor, k: int
                     ) -> torch.Tensor:
    """KL-Cov's ``min(k, n)`` tokens (flat indices) in verl's arithmetic, on the inputs' device.
    The response tokens are gathered first, as verl does: a top-k over the whole ``[S, T]`` with
    the padding at -inf took 7x as long as over the gathered ones (its many equal values)."""
    flat = keep.reshape(-1).nonzero().squeeze(1)
    adv = advantages.detach().reshape(-1)[flat]
    lp = log_prob.detach().reshape(-1)[flat]
    cov = (adv - adv.mean()) * (lp - lp.mean())
    return flat[torch.topk(cov, min(flat.numel(), k)).indices]


def _kl_cov_terms(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  keep: torch.Tensor, weights: torch.Tensor, loss_type: str, length: int | None,
                  config: Any, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"kl_cov"`` (KL-Cov, Cui et al., 2025) beyond the ratio term: its penalty
    ``ppo_kl_coef |log_prob - old_log_prob|`` on the ``max(1, int(kl_cov_ratio n))`` response
    tokens (of ``n``) whose centred advantage times centred log-prob is largest
    (:func:`iama_kernels.covariance_top_k`), each with its token weight in the kernel's aggregate
    (``weights`` the kernel's mask, ``loss_type`` and ``length`` its normaliser; the caller
    applies the scale), differentiable in ``log_prob``; and the mean ``|log-ratio|`` over the
    response (verl's ``actor/ppo_kl`` here). The selection runs on the device (verl copies every
    response token's advantage and log-prob to the host)."""
    policy = _option(config, "policy_loss")
    ratio = float(_option(policy, "kl_cov_ratio", 0.0002))
    coef = float(_option(policy, "ppo_kl_coef", 1.0))
    if not ratio > 0:
        raise ValueError(f"policy_loss.kl_cov_ratio must be > 0, got {ratio}")
    S, T = log_prob.shape
    old = old_log_prob.detach()
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    abs_lr = torch.where(keep, (log_prob.detach() - old).abs(), zero)
    n = torch.count_nonzero(keep)
    abs_kl = abs_lr.sum() / n.clamp(min=1).to(log_prob.dtype)
    count = int(n)
    if count == 0:
        return zero, abs_kl
    k = max(1, int(count * ratio))
    selection = _selection_impl(impl, log_prob)
    if selection is not None:
        picked = covariance_top_k(advantages, log_prob, keep, k, impl=selection)
    else:
        picked = _top_k_on_device(advantages, log_prob, keep, k)
    rows, cols = picked // T, picked % T
    # policy_loss.reference.token_weights' rule, for the picked tokens only (not a full [S, T] pass)
    w = weights[rows, cols].to(log_prob.dtype)
    if loss_type == "grpo":
        w = w / (S * weights[rows].sum(-1).clamp(min=1).to(log_prob.dtype))
    elif loss_type == "token":
        w = w / weights.sum().clamp(min=1).to(log_prob.dtype)
    else:
        w = w / (S * float(length if length is not None else T))
    return coef * (w * (log_prob[rows, cols] - old[rows, cols]).abs()).sum(), abs_kl


def register_policy_loss(name: str = POLICY_LOSS_NAME, impl: str = "auto",
                         ratio_level: str = "token", surrogate: str = "clip") -> VerlPolicyLoss:
    """Register :class:`VerlPolicyLoss` in verl's policy-loss registry under ``name``.

    ``import verl`` runs it, through the plugin, for every entry of :data:`VERL_LOSSES`
    (``"iama"``; ``"iama_gspo"`` with ``ratio_level="sequence"``; ``"iama_cispo"``, ...,
    ``"iama_clip_cov"`` with their ``surrogate=``); select one with
    ``actor_rollout_ref.actor.policy_loss.loss_mode=iama`` (or ``iama_gspo``, ...). Registering a
    name again with the same options is a no-op; with others, or over one of verl's own losses,
    a ``ValueError``.
    """
    from verl.trainer.ppo import core_algos

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    fn = VerlPolicyLoss(impl, ratio_level, surrogate)
    known = core_algos.POLICY_LOSS_REGISTRY.get(name)
    if known is not None:
        if known != fn:
            raise ValueError(f"verl already has a policy loss named {name!r} ({known!r}); "
                             "choose another name")
        return known
    core_algos.register_policy_loss(name)(fn)
    return fn


"""OpenRLHF's actor loss on the fused kernel: :class:`PolicyLoss`, a drop-in for
``openrlhf.models.PolicyLoss`` (OpenRLHF 0.11).

OpenRLHF's PPO actor computes its policy loss with ``PolicyLoss(...)(log_probs, old_log_probs,
advantages, action_mask, rollout_log_probs, dp_size, batch_num_tokens, global_batch_size)`` and
reads back ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``. This class takes the same
constructor arguments and call, returns the same tuple, and computes the loss and its gradient in
one pass of :func:`iama_kernels.policy_loss` (the gradient with respect to ``log_probs`` is written
during the forward pass) instead of a dozen ``[bs, T]`` intermediates. Swap it in on the actor::

    from iama.integrations.openrlhf import PolicyLoss
    actor.actor_loss_fn = PolicyLoss.from_openrlhf(actor.actor_loss_fn)

Covered: ``policy_loss_type="ppo"`` (the clip with ``clip_eps_low`` / ``clip_eps_high``, the dual
clip, per-token advantages) and ``"gspo"`` (the sequence ratio ``exp(mean log-ratio)``, always
aggregated per sequence); ``token_level_loss`` (the token mean) or the mean of the sequences'
token means, with OpenRLHF's global normalisers (``batch_num_tokens``, ``global_batch_size``,
``dp_size``); the train/rollout correction of ``ppo`` (``is_correction_level`` ``"token"`` or
``"seq"``, ``is_correction_mode`` ``"mask"`` or ``"clip"``, ``is_correction_gating`` ``"ratio"``,
``"binary_kl"`` or ``"tv"``, ``is_correction_threshold``), computed by
:func:`iama_kernels.rollout_correction` in one read of the log-probs (OpenRLHF: about ten
elementwise passes) and given to the kernel as token weights. OpenRLHF's KL loss
(``compute_approx_kl``) and entropy bonus stay OpenRLHF's. The advantages come from OpenRLHF (or,
for IAMA's non-linear ones, from :func:`iama.integrations.flat.flat_group_advantages` on the
``[n_prompts * n_samples_per_prompt, m]`` rewards).

What differs from OpenRLHF's:

* OpenRLHF clamps ``ppo``'s log-ratio to ``[-20, 20]`` before ``exp`` (no gradient beyond); the
  kernel does not. Below ``e**-20`` the loss and its gradient differ by at most ``e**-20 |A|`` a
  token. Above ``e**20`` the token's loss is a constant in both where ``A > 0`` (the clip) or with
  the dual clip; where ``A < 0`` without it, OpenRLHF's stops at ``-A e**20`` with no gradient and
  the kernel's is ``-A rho`` with its gradient (a ratio no trust region lets grow so far).
* ``gspo``: the kernel is given each response's mean advantage (over its mask), whose loss and
  gradient are OpenRLHF's exactly when a response's advantages share one sign (always for outcome
  advantages: ``group_norm``, ``rloo``, ``reinforce_baseline``, ``dr_grpo``); with mixed signs
  (GAE's, or a KL penalty in the reward) OpenRLHF clips each token by its own sign (and its
  ``clip_ratio`` never counts a token whose own advantage is 0). The sequence's mean log-ratio
  is over the mask's support (OpenRLHF weights it by the mask: the same for a bool or 0/1 mask,
  which OpenRLHF's is).
* With ``ppo``'s rollout correction on, ``clip_ratio`` and ``ppo_kl`` are means weighted by each
  token's weight in the loss (the correction's coefficient times the mask); OpenRLHF's are plain
  means over the mask. ``vllm_kl`` and ``is_filter_ratio`` are OpenRLHF's (their sums in
  float64).
* ``binary_kl`` gate: the statistic is held at ``>= 0`` and ``1 - p`` is ``-expm1(log p)``.
  OpenRLHF's float32 ``p log(p/q) + (1-p) log((1-p)/(1-q))`` falls below 0 for about one token
  in ten at a log-prob mismatch of 1e-3 (four in ten at 1e-4), and its default lower bound of 0
  drops those tokens: the ones on which trainer and rollout engine agree best. ``1 - p`` of a
  clamped float32 ``p`` is 1.0133e-6, not 1e-6 (``1 - 1e-6`` is not a float32), which puts the
  KL of a token whose other probability is not clamped about 1e-5 off. In float64 both agree with
  OpenRLHF's to rounding.
* An empty batch (no token under the mask) gives a loss of 0, not OpenRLHF's 0/0 (and a
  ``vllm_kl`` and token-level ``is_filter_ratio`` of 0); a sequence is divided by its token
  count (OpenRLHF's count plus 1e-8, which vanishes in float32).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch

from iama_kernels import policy_loss, rollout_correction
from iama_kernels._checks import check_choice
from iama_kernels._dispatch import IMPLS

POLICY_LOSS_TYPES = ("ppo", "gspo")
IS_CORRECTION_LEVELS = ("off", "token", "seq")
IS_CORRECTION_MODES = ("mask", "clip")
IS_CORRECTION_GATINGS = ("ratio", "binary_kl", "tv")


# Masked sums take the mask as floats (``mf``), converted once per call: a product with a bool
# mask converts it again inside every operation (2-3x a same-dtype product on the CPU), and a
# bool tensor's sum goes through a conversion too (``count_nonzero`` does not).


def _float_mask(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask's values in ``dtype`` (a bool mask through its bytes: 3x faster than from bool)."""
    return (m.view(torch.uint8) if m.dtype == torch.bool else m).to(dtype)


def _mean(x: torch.Tensor, mf: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean over every token: one pass (a dot product)."""
    return torch.dot(x.to(mf.dtype).reshape(-1), mf.reshape(-1)) / mf.sum()


def _ratio_or_zero(S: float, count: torch.Tensor | float) -> torch.Tensor | float:
    """``S / count`` in float64, 0 for a local count of 0 (an empty batch, whose kernel loss is 0)."""
    if isinstance(count, torch.Tensor):
        count = count.to(torch.float64)
        return torch.where(count > 0, S / count.clamp(min=1e-300), 0.0)
    return S / float(count)


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's ``PolicyLoss`` (same arguments, call and results) on the fused kernel.

    Args:
        clip_eps_low, clip_eps_high: the clip range ``[1 - clip_eps_low, 1 + clip_eps_high]``.
        dual_clip: ``None`` or ``c > 1``: a token with ``A < 0`` and ratio above ``c`` has the
            constant loss ``-c A`` (dual-clip PPO).
        token_level_loss: the token mean over the batch (else the mean of the sequences' token
            means); ``False`` whatever is given for ``"gspo"``, as OpenRLHF's.
        policy_loss_type: ``"ppo"`` or ``"gspo"``.
        is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold:
            OpenRLHF's train/rollout correction (``"ppo"`` only): a statistic per token
            (``"token"``) or per sequence (``"seq"``) of the rollout policy against the old one
            (the ratio ``exp(old - rollout)``, its sequence mean's geometric form, or the sampled
            token's binary KL or total variation), then ``"mask"`` (tokens or sequences outside
            ``[low, high]`` get weight 0, the others their token's ratio) or ``"clip"`` (the
            token ratio clamped to ``[low, high]``; token level and ratio gating only). A
            divergence gate takes an upper bound only (``low <= 0``).
        impl: the kernel's backend (``"auto"`` or an explicit one, see
            :func:`iama_kernels.policy_loss`).
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: tuple[float, float] | list[float] = (0.5, 5.0),
        *,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("policy_loss_type", policy_loss_type, POLICY_LOSS_TYPES)
        check_choice("is_correction_level", is_correction_level, IS_CORRECTION_LEVELS)
        check_choice("is_correction_mode", is_correction_mode, IS_CORRECTION_MODES)
        check_choice("is_correction_gating", is_correction_gating, IS_CORRECTION_GATINGS)
        check_choice("impl", impl, IMPLS)
        if dual_clip is not None and not float(dual_clip) > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip!r}")
        try:
            low, high = (float(v) for v in is_correction_threshold)
        except (TypeError, ValueError):
            raise ValueError("is_correction_threshold must be two numbers (low, high), got "
                             f"{is_correction_threshold!r}") from None
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode='clip' requires is_correction_level='token' and "
                             "is_correction_gating='ratio'")
        if is_correction_gating != "ratio" and is_correction_level != "off" and low > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating!r} takes an upper bound only: "
                             f"is_correction_threshold's low must be <= 0, got {low}")
        self.clip_eps_low = float(clip_eps_low)
        self.clip_eps_high = float(clip_eps_high)
        self.dual_clip = None if dual_clip is None else float(dual_clip)
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = bool(token_level_loss) and policy_loss_type != "gspo"
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = (low, high)
        self.impl = impl

    @classmethod
    def from_openrlhf(cls, loss: Any, *, impl: str = "auto") -> PolicyLoss:
        """This class with the settings of an ``openrlhf.models.PolicyLoss`` instance."""
        return cls(loss.clip_eps_low, loss.clip_eps_high, loss.dual_clip, loss.token_level_loss,
                   loss.policy_loss_type, loss.is_correction_level, loss.is_correction_mode,
                   loss.is_correction_gating, tuple(loss.is_correction_threshold), impl=impl)

    def extra_repr(self) -> str:
        return (f"policy_loss_type={self.policy_loss_type!r}, "
                f"clip=({self.clip_eps_low}, {self.clip_eps_high}), dual_clip={self.dual_clip}, "
                f"token_level_loss={self.token_level_loss}, "
                f"is_correction_level={self.is_correction_level!r}, impl={self.impl!r}")

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``, as OpenRLHF's.

        Args:
            log_probs: ``[bs, T]`` log-probs of the sampled tokens under the policy being
                trained (carries the gradient). old_log_probs: ``[bs, T]`` under the policy
                that the ratio is taken against.
            advantages: ``[bs, T]`` per-token advantages (or ``[bs]``), read under the mask.
            action_mask: ``[bs, T]`` bool or numeric mask (its values weight the tokens, as
                OpenRLHF's); ``None``: every token.
            rollout_log_probs: ``[bs, T]`` under the rollout engine; required with the rollout
                correction (and then GSPO's ratio is taken against them, as OpenRLHF's).
            dp_size, batch_num_tokens, global_batch_size: OpenRLHF's global normalisers: the
                loss is ``sum / batch_num_tokens * dp_size`` (token level) or ``sum of sequence
                means / global_batch_size * dp_size``; ``None``: the local count. OpenRLHF's
                actor passes the two counts as 0-dim tensors on the device, always: they are
                used there, never read back.

        Returns:
            ``loss`` (0-dim, differentiable in ``log_probs``), ``clip_ratio`` (the share of
            tokens whose clipped term is the smaller), ``ppo_kl`` (the mean of ``old - new``),
            ``vllm_kl`` (the mean of ``rollout - old``) and ``is_filter_ratio`` (the share of
            tokens, or sequences, that the correction filtered), the last two ``None`` without
            the correction.
        """
        for name, t in (("log_probs", log_probs), ("old_log_probs", old_log_probs)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 2 or t.shape != log_probs.shape:
                raise ValueError(f"{name} must be [bs, T] like log_probs {tuple(log_probs.shape)}, "
                                 f"got {tuple(t.shape)}")
        if not isinstance(advantages, torch.Tensor):
            raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
        if action_mask is None:
            action_mask = torch.ones(log_probs.shape, dtype=torch.bool, device=log_probs.device)
        elif not isinstance(action_mask, torch.Tensor) or action_mask.shape != log_probs.shape:
            raise ValueError(f"action_mask must be a [bs, T] tensor like log_probs {tuple(log_probs.shape)}")
        correcting = self.is_correction_level != "off"
        if correcting and (not isinstance(rollout_log_probs, torch.Tensor)
                           or rollout_log_probs.shape != log_probs.shape):
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs, "
                             f"a [bs, T] tensor like log_probs {tuple(log_probs.shape)}")
        dp = float(dp_size)
        if not dp > 0:
            raise ValueError(f"dp_size must be > 0, got {dp_size!r}")
        for name, total in (("batch_num_tokens", batch_num_tokens), ("global_batch_size", global_batch_size)):
            # (A tensor, as OpenRLHF passes them, is taken as given: reading it would wait for
            # the device.)
            if total is not None and not isinstance(total, torch.Tensor) and not float(total) > 0:
                raise ValueError(f"{name} must be > 0 (a global count) or None, got {total!r}")
        S = log_probs.shape[0]
        m = action_mask  # the kernel reads it as it is (a bool mask as bytes)
        # The mask as floats, for the sums outside the kernel (made only where one is needed).
        gspo = self.policy_loss_type == "gspo"
        mf = _float_mask(m, torch.promote_types(log_probs.dtype, torch.float32)) if gspo else None

        adv = advantages.detach()
        old = old_log_probs.detach()
        vllm_kl = is_filter_ratio = None
        weights = row_totals = None  # the correction's token weights and each row's mask total
        if gspo:
            if correcting:
                old = rollout_log_probs.detach()
            if adv.ndim == 2:  # each response's mean advantage (see the module's note)
                if adv.shape != log_probs.shape:
                    raise ValueError(f"advantages must be [bs, T] or [bs], got {tuple(adv.shape)}")
                totals = mf.sum(-1)
                mean = (adv * mf).sum(-1) / totals.clamp(min=torch.finfo(mf.dtype).tiny)
                adv = torch.where(totals > 0, mean, 0.0)  # an empty row: 0 (no token reads it)
        elif correcting:
            rollout = rollout_log_probs.detach()
            weights, vllm_kl, is_filter_ratio, row_totals = self._correction(old, rollout, m)

        # The kernel's "token" (sum over the mask's total) and "grpo" (each row over its own
        # total, then / S) are OpenRLHF's local means; "dr_grpo" with length 1 (sum / S), which
        # a positive scalar rescales, takes the global normalisers and the correction weights.
        loss_type, length, scale = "dr_grpo", 1, None
        mask = m if weights is None else weights
        count_rows = False  # the responses with a token counted from the kernel's row totals
        count_tokens = False  # the local tokens likewise
        if self.token_level_loss:
            if batch_num_tokens is None and weights is None:
                loss_type, length = "token", None
            elif weights is None:
                # The kernel's token mean times local / global tokens: exactly 1 where they agree
                # (one micro-batch a step on one process), which spares the backward a multiply.
                loss_type, length, count_tokens = "token", None, True
            elif batch_num_tokens is not None:
                scale = _ratio_or_zero(S * dp, batch_num_tokens)  # sum / batch_num_tokens * dp
            else:
                scale = _ratio_or_zero(S, row_totals.sum())
        else:
            # sum of sequence means / global_batch_size * dp (with the local count: times 1)
            sequences, numerator = global_batch_size, (float(S) if global_batch_size is None else S * dp)
            if weights is None:
                loss_type, length = "grpo", None
                count_rows = sequences is None
            else:  # each sequence over its own mask total (weight 0 in an empty row anyway)
                totals = row_totals.unsqueeze(-1)
                mask = weights / totals.clamp(min=torch.finfo(totals.dtype).tiny)
                if sequences is None:
                    sequences = (totals > 0).sum()
            if sequences is not None:
                scale = _ratio_or_zero(numerator, sequences)
        level = "sequence" if gspo else "token"
        out = policy_loss(log_probs, old, None, adv, mask, eps_low=self.clip_eps_low,
                          eps_high=self.clip_eps_high, loss_type=loss_type, max_completion_length=length,
                          dual_clip=self.dual_clip, ratio_level=level, row_stats=count_rows or count_tokens,
                          impl=self.impl)
        loss = out.loss
        if count_rows:
            scale = _ratio_or_zero(S, (out.row_clip_weights[:, 0] > 0).sum())
        elif count_tokens:
            local = out.row_clip_weights[:, 0].sum(dtype=torch.float64)
            scale = local * dp / torch.as_tensor(batch_num_tokens, dtype=torch.float64, device=local.device)
        if scale is not None:
            loss = loss * torch.as_tensor(scale, dtype=torch.float64, device=loss.device).to(loss.dtype)
        if gspo and correcting:  # the ratio was against the rollout's
            ppo_kl = _mean(old_log_probs.detach() - log_probs.detach(), mf).to(out.loss.dtype)
        else:
            ppo_kl = -out.log_ratio_mean
        return loss, out.clip_fraction, ppo_kl, vllm_kl, is_filter_ratio

    def _correction(self, old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The correction's token weights (coefficient times mask), ``vllm_kl``,
        ``is_filter_ratio`` and each row's mask total, by :func:`iama_kernels.rollout_correction`
        (one read of the inputs instead of about ten elementwise passes)."""
        level = "sequence" if self.is_correction_level == "seq" else "token"
        out = rollout_correction(old, rollout, mask, level=level, gate=self.is_correction_gating,
                                 mode=self.is_correction_mode, threshold=self.is_correction_threshold,
                                 impl=self.impl)
        return out.weights, -out.log_ratio_mean, out.filtered_fraction, out.mask_sums


def openrlhf_loss_module() -> types.ModuleType:
    """OpenRLHF's own ``openrlhf.models.loss`` (its ``PolicyLoss`` and ``aggregate_loss``), loaded
    without ``openrlhf.models``' package ``__init__``, which imports the actor (DeepSpeed,
    flash-attn, transformers' models): what the tests and ``benchmarks/openrlhf_loss.py`` compare
    against, on a machine with OpenRLHF installed without its dependencies. Its ``utils`` module
    imports DeepSpeed for ZeRO-3 helpers the loss never calls: where DeepSpeed is missing, an
    empty stand-in module is in ``sys.modules`` while the two modules load. ``sys.modules`` is
    left as it was. Raises ``ImportError`` without OpenRLHF."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("openrlhf is not installed (pip install --no-deps openrlhf)")
    names = ("openrlhf.models", "openrlhf.models.utils", "openrlhf.models.loss", "deepspeed")
    saved = {name: sys.modules.get(name) for name in names}
    try:
        package = types.ModuleType("openrlhf.models")
        package.__path__ = [str(Path(next(iter(spec.submodule_search_locations))) / "models")]
        sys.modules["openrlhf.models"] = package
        if saved["deepspeed"] is None and importlib.util.find_spec("deepspeed") is None:
            sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        return importlib.import_module("openrlhf.models.loss")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module

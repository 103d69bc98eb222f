"""Python side of the ``iama`` operator library: fake functions.

The schemas live in ``csrc/registration.cpp``. This module is imported by
:func:`iama_kernels._extension.load` right after the shared library is loaded (and by torch itself
when it needs a fake function, through ``set_python_module``); importing it never builds anything.

Autograd: the two loss ops compute ``d loss / d logp`` in their forward pass (it costs one more
write per token, and no second pass over the inputs) and return it as their last output; their
backward, registered in C++ (``csrc/autograd.cpp``, which says why), multiplies it by the
incoming gradient of ``loss`` (or, for a gradient of exactly 1, returns it as is). Every other
output is a non-differentiable statistic.
"""

from __future__ import annotations

import torch

from ._checks import ROW_SURROGATES


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Fake (meta) functions: shapes and dtypes only, for torch.compile and FakeTensor tracing.
# --------------------------------------------------------------------------------------------


@torch.library.register_fake("iama::group_stats")
def _group_stats_fake(rewards, valid, kinds, ns, taus, estimator):  # type: ignore[no-untyped-def]
    torch._check(rewards.dim() == 3, lambda: "rewards must have shape [B, G, m]")
    B, G, m = rewards.shape
    dtype = _compute_dtype(rewards.dtype)
    return rewards.new_empty((B, G, m), dtype=dtype), rewards.new_empty((B, m), dtype=dtype)


@torch.library.register_fake("iama::group_advantages")
def _group_advantages_fake(rewards, valid, lam, kinds, ns, taus, estimator, scale, eps):  # type: ignore[no-untyped-def]
    torch._check(rewards.dim() == 3, lambda: "rewards must have shape [B, G, m]")
    B, G, m = rewards.shape
    dtype = _compute_dtype(rewards.dtype)
    return (rewards.new_empty((B, G), dtype=dtype), rewards.new_empty((B, G), dtype=dtype),
            rewards.new_empty((B, m), dtype=dtype))


def _token_outputs_fake(logp: torch.Tensor, seq_ratio: bool) -> tuple[torch.Tensor, ...]:
    dtype = _compute_dtype(logp.dtype)
    scalars = tuple(logp.new_empty((), dtype=dtype) for _ in range(7))
    seq = logp.new_empty((logp.shape[0] if seq_ratio else 0,), dtype=dtype)
    return (*scalars, seq, torch.empty_like(logp, memory_format=torch.contiguous_format))


@torch.library.register_fake("iama::policy_loss_fwd")
def _policy_loss_fwd_fake(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta,  # type: ignore[no-untyped-def]
                          loss_type, max_completion_length, kl_form=0, dual_clip=None,
                          seq_ratio=False, surrogate="clip", tau_pos=1.0, tau_neg=1.05, row_stats=False,
                          vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    torch._check(logp.dim() == 2, lambda: "logp must have shape [S, T]")
    *metrics, grad = _token_outputs_fake(logp, seq_ratio or surrogate in ROW_SURROGATES)
    row_clip = logp.new_empty((logp.shape[0] if row_stats else 0, 3), dtype=_compute_dtype(logp.dtype))
    return (*metrics, row_clip, grad)


@torch.library.register_fake("iama::nonlinear_grpo_fwd")
def _nonlinear_grpo_fwd_fake(logp, old_logp, ref_logp, mask, rewards, criterion_weights, kinds, ns,  # type: ignore[no-untyped-def]
                             taus, estimator, scale, eps, eps_low, eps_high, beta, loss_type,
                             max_completion_length, kl_form=0, dual_clip=None, seq_ratio=False,
                             surrogate="clip", tau_pos=1.0, tau_neg=1.05, vespo_k_pos=2.0,
                             vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    torch._check(rewards.dim() == 3, lambda: "rewards must have shape [B, G, m]")
    B, G, m = rewards.shape
    rdtype = _compute_dtype(rewards.dtype)
    per_row = seq_ratio or surrogate in ROW_SURROGATES  # GSPO's mean log-ratios, VESPO's, GMPO's
    loss, kl, clip, ratio, lratio, dual, high, seq, grad = _token_outputs_fake(logp, per_row)
    return (loss, rewards.new_empty((B, G), dtype=rdtype), kl, clip, ratio,
            rewards.new_empty((B, m), dtype=rdtype), lratio, dual, high, seq, grad)


@torch.library.register_fake("iama::sequence_log_ratio")
def _sequence_log_ratio_fake(logp, old_logp, mask, clamp_low, clamp_high):  # type: ignore[no-untyped-def]
    torch._check(logp.dim() == 2, lambda: "logp must have shape [S, T]")
    S = logp.shape[0]
    return logp.new_empty((S,), dtype=torch.float64), logp.new_empty((S,), dtype=torch.float64)


@torch.library.register_fake("iama::rollout_correction")
def _rollout_correction_fake(old_logp, rollout_logp, mask, sequence, gate, clip, low, high):  # type: ignore[no-untyped-def]
    torch._check(old_logp.dim() == 2, lambda: "old_logp must have shape [S, T]")
    wide = torch.float64 in (old_logp.dtype, rollout_logp.dtype)
    weights = old_logp.new_empty(old_logp.shape, dtype=torch.float64 if wide else torch.float32)
    return weights, old_logp.new_empty((old_logp.shape[0], 4), dtype=torch.float64)


@torch.library.register_fake("iama::covariance_top_k")
def _covariance_top_k_fake(advantages, logp, mask, k):  # type: ignore[no-untyped-def]
    torch._check(logp.dim() == 2, lambda: "logp must have shape [S, T]")
    # min(k, number of masked-in tokens): known only from the data
    return logp.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


@torch.library.register_fake("iama::covariance_band")
def _covariance_band_fake(advantages, logp, mask, low, high, old_logp, eps_low, eps_high):  # type: ignore[no-untyped-def]
    torch._check(logp.dim() == 2, lambda: "logp must have shape [S, T]")
    return logp.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)

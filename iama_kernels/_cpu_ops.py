"""Python side of the ``iama`` operator library: fake functions and autograd formulas.

The schemas live in ``csrc/registration.cpp``. This module is imported by
:func:`iama_kernels._extension.load` right after the shared library is loaded (and by torch itself
when it needs a fake function, through ``set_python_module``); importing it never builds anything.

Autograd: the two loss ops compute ``d loss / d logp`` in their forward pass (it costs one more
write per token, and no second pass over the inputs) and return it as their last output; the
backward multiplies it by the incoming gradient of ``loss``. Every other output is a detached
statistic.
"""

from __future__ import annotations

from typing import Any

import torch


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


def _token_outputs_fake(logp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = _compute_dtype(logp.dtype)
    scalars = tuple(logp.new_empty((), dtype=dtype) for _ in range(4))
    return (*scalars, torch.empty_like(logp, memory_format=torch.contiguous_format))


@torch.library.register_fake("iama::policy_loss_fwd")
def _policy_loss_fwd_fake(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta,  # type: ignore[no-untyped-def]
                          loss_type, max_completion_length):
    torch._check(logp.dim() == 2, lambda: "logp must have shape [S, T]")
    return _token_outputs_fake(logp)


@torch.library.register_fake("iama::nonlinear_grpo_fwd")
def _nonlinear_grpo_fwd_fake(logp, old_logp, ref_logp, mask, rewards, criterion_weights, kinds, ns,  # type: ignore[no-untyped-def]
                             taus, estimator, scale, eps, eps_low, eps_high, beta, loss_type,
                             max_completion_length):
    torch._check(rewards.dim() == 3, lambda: "rewards must have shape [B, G, m]")
    B, G, m = rewards.shape
    rdtype = _compute_dtype(rewards.dtype)
    loss, kl, clip, ratio, grad = _token_outputs_fake(logp)
    return (loss, rewards.new_empty((B, G), dtype=rdtype), kl, clip, ratio,
            rewards.new_empty((B, m), dtype=rdtype), grad)


# --------------------------------------------------------------------------------------------
# Autograd: d loss / d logp = saved per-token gradient * grad_output.
# --------------------------------------------------------------------------------------------


def _save_token_grad(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    ctx.save_for_backward(output[-1])


def _scaled(ctx: Any, grad_loss: torch.Tensor) -> torch.Tensor:
    (token_grad,) = ctx.saved_tensors
    # A 0-dim grad_output does not promote: the result keeps logp's dtype.
    return token_grad * grad_loss


def _policy_loss_backward(ctx: Any, grad_loss: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
    return (_scaled(ctx, grad_loss),) + (None,) * 9


def _nonlinear_grpo_backward(ctx: Any, grad_loss: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
    return (_scaled(ctx, grad_loss),) + (None,) * 16


torch.library.register_autograd("iama::policy_loss_fwd", _policy_loss_backward,
                                setup_context=_save_token_grad)
torch.library.register_autograd("iama::nonlinear_grpo_fwd", _nonlinear_grpo_backward,
                                setup_context=_save_token_grad)

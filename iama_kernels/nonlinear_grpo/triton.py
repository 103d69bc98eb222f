"""The fused non-linear GRPO kernel: group rewards to advantages to token loss, in one launch.

Program ``(b, split)`` recomputes group ``b``'s advantages in registers (``_group_block``: ranks
by pairwise comparison, exact weight tables, lambda, centring and scaling; ``O(G^2)`` register
work, no memory traffic beyond ``G * m`` rewards) and streams the tokens of rows
``[split * rows_per_prog, ...)`` of that group once (``_token_row``), writing the gradient and
its partial sums. With few groups per SM a group's rows are split over several programs (each
recomputes the cheap advantages) so that enough programs stream memory at once; with many
groups a program owns the whole group. Program ``(b, 0)`` writes the group's advantages and
values. A one-program kernel reduces the partials.

It is one launch (plus the partials reduction) when ``lambda`` needs no batch statistics (one
criterion, ``WeightedSum``, or given ``criterion_weights``) and ``scale != "batch"``. Otherwise
there is no grid-wide sync to wait on, so: ``Min``/``SmoothMin`` over ``m > 1`` criteria first
run a values-only launch and a few torch ops for ``lambda`` (reading only the rewards);
``scale="batch"`` computes
the advantages with :mod:`iama_kernels.advantages.triton`, scales them by the batch std in torch,
then runs the token kernel of :mod:`iama_kernels.policy_loss.triton` on them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import ROW_SURROGATES, VESPO_DEFAULTS, kl_form
from .._device import launch_device
from .._types import NonlinearGRPOOutput
from ..advantages.reference import scale_advantages
from ..advantages.triton import (
    SCALE_CODES,
    _group_advantages_op,
    _group_block,
    _lambda,
    group_warps,
    objective_tables,
    transform_codes,
)
from ..objectives import Objective
from ..policy_loss.triton import (
    LOSS_TYPE_CODES,
    N_PARTIALS,
    N_STATS,
    SURROGATE_CODES,
    _policy_loss_op,
    _store_partials,
    _token_row,
    backward_logp,
    dual_clip_args,
    finalize,
    grad_dtype,
    needs_grad,
    row_norm,
    sequence_buffer,
    sm_count,
    token_args,
    token_block,
)


@triton.jit
def _nonlinear_grpo_fwd_kernel(
    rewards_ptr, stride_rb, stride_rg, stride_rm,
    table_ptr, crit_ptr, lam_ptr, adv_ptr, values_ptr, G, eps,
    logp_ptr, old_ptr, ref_ptr, mask_ptr, grad_ptr, partial_ptr, seq_ptr,
    s_lr, s_lt, s_or, s_ot, s_rr, s_rt, s_mr, s_mt, s_gr, s_gt,
    T, rows_per_prog, eps_low, eps_high, beta, dual_c, tau_pos, tau_neg, norm,
    vk_pos, vl_pos, vk_neg, vl_neg,
    BG: tl.constexpr, M: tl.constexpr, SCALE: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, LOSS_TYPE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, NP: tl.constexpr, KL_FORM: tl.constexpr = 0,
    DUAL_CLIP: tl.constexpr = False, SEQ_RATIO: tl.constexpr = False, SURROGATE: tl.constexpr = 0,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    first = split == 0
    adv, _ = _group_block(
        b, rewards_ptr, stride_rb, stride_rg, stride_rm, rewards_ptr, 0, 0,
        table_ptr, crit_ptr, lam_ptr, values_ptr, G, eps, first,
        BG, M, 1, False, SCALE, True,
    )
    offs = tl.arange(0, BG)
    tl.store(adv_ptr + b * G + offs, adv, mask=(offs < G) & first)
    loss = tl.zeros([BLOCK_T], dtype=tl.float32)
    kl = tl.zeros([BLOCK_T], dtype=tl.float32)
    clip = tl.zeros([BLOCK_T], dtype=tl.float32)
    ratio = tl.zeros([BLOCK_T], dtype=tl.float32)
    lratio = tl.zeros([BLOCK_T], dtype=tl.float32)
    dual = tl.zeros([BLOCK_T], dtype=tl.float32)
    high = tl.zeros([BLOCK_T], dtype=tl.float32)
    msum = 0.0
    start = split * rows_per_prog
    end = tl.minimum(start + rows_per_prog, G)
    for j in range(start, end):
        a = tl.sum(tl.where(offs == j, adv, 0.0), axis=0)  # sample j's advantage (one lane)
        loss, kl, clip, ratio, lratio, dual, high, r_m = _token_row(
            a, b * G + j, logp_ptr, old_ptr, ref_ptr, mask_ptr, grad_ptr, adv_ptr, seq_ptr,
            s_lr, s_lt, s_or, s_ot, s_rr, s_rt, s_mr, s_mt, s_gr, s_gt, 0, 0,
            T, eps_low, eps_high, beta, dual_c, tau_pos, tau_neg, norm, loss, kl, clip, ratio,
            lratio, dual, high, HAS_OLD, HAS_REF, LOSS_TYPE, WRITE_GRAD, BLOCK_T, KL_FORM,
            DUAL_CLIP, False, SEQ_RATIO, SURROGATE, None, False, vk_pos, vl_pos, vk_neg, vl_neg,
        )
        msum += r_m
    _store_partials(partial_ptr, b * tl.num_programs(1) + split, loss, msum, kl, clip, ratio,
                    lratio, dual, high, NP)


def rows_per_program(B: int, G: int, device: torch.device) -> int:
    """Rows of a group per program: enough programs to keep every SM streaming (about 4 per
    SM), but at least G/16 rows so that the O(G^2) advantage recomputation stays negligible."""
    want = (B * G) // (4 * sm_count(device))
    return max(1, G // 16, min(G, want))


def _nonlinear_grpo_fwd(
    logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
    mask: torch.Tensor, rewards: torch.Tensor, lam: torch.Tensor, codes: list[int],
    taus: list[float], estimator: str, eps: float, scale_code: int, eps_low: float,
    eps_high: float, beta: float, loss_type: str, max_completion_length: int, need_grad: bool,
    kl_form: int = 0, dual_clip: float | None = None, seq_ratio: bool = False,
    surrogate: str = "clip", tau_pos: float = 1.0, tau_neg: float = 1.05,
    vespo: tuple[float, ...] = VESPO_DEFAULTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch (plus the partials reduction). Returns float32 ``stats [N_STATS]``,
    ``advantages [B, G]``, ``values [B, m]``, GSPO's per-row log-ratios (``[S]`` with
    ``seq_ratio``; VESPO's log weights with ``surrogate="vespo"``; else empty) and the gradient
    (``[S, T]`` or empty)."""
    B, G, m = rewards.shape
    S, T = logp.shape
    dev = logp.device
    tables, crit = objective_tables(G, codes, taus, estimator, False, dev)
    max_len = None if max_completion_length <= 0 else max_completion_length
    args, grad = token_args(logp, old_logp, ref_logp, mask, need_grad)
    adv = torch.empty(B, G, dtype=torch.float32, device=dev)
    values = torch.empty(B, m, dtype=torch.float32, device=dev)
    rpp = rows_per_program(B, G, dev)
    splits = triton.cdiv(G, rpp)
    partials = torch.empty(B * splits, N_PARTIALS, dtype=torch.float32, device=dev)
    block_t, warps = token_block(T, logp.element_size())
    dual_c, has_dual = dual_clip_args(dual_clip)
    seq = sequence_buffer(S, seq_ratio or surrogate in ROW_SURROGATES, dev)
    _nonlinear_grpo_fwd_kernel[(B, splits)](
        rewards, *rewards.stride(), tables, crit, lam, adv, values, G, eps,
        *args[:5], partials, seq, *args[5:],
        T, rpp, eps_low, eps_high, beta, dual_c, tau_pos, tau_neg,
        row_norm(S, T, loss_type, max_len), *vespo,
        BG=tables.shape[-1], M=m, SCALE=scale_code,
        HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None,
        LOSS_TYPE=LOSS_TYPE_CODES[loss_type], WRITE_GRAD=need_grad, BLOCK_T=block_t,
        NP=N_PARTIALS, KL_FORM=kl_form, DUAL_CLIP=has_dual,
        SEQ_RATIO=seq_ratio and old_logp is not None, SURROGATE=SURROGATE_CODES[surrogate],
        num_warps=max(warps, group_warps(G)),
    )
    return finalize(partials, loss_type), adv, values, seq, grad


@torch.library.custom_op("iama_triton::nonlinear_grpo_loss", mutates_args=())
def _nonlinear_grpo_op(
    logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
    mask: torch.Tensor, rewards: torch.Tensor, lam: torch.Tensor, codes: list[int],
    taus: list[float], estimator: str, eps: float, scale_code: int, eps_low: float,
    eps_high: float, beta: float, loss_type: str, max_completion_length: int, need_grad: bool,
    kl_form: int = 0, dual_clip: float | None = None, seq_ratio: bool = False,
    surrogate: str = "clip", tau_pos: float = 1.0, tau_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with launch_device(logp.device):
        return _nonlinear_grpo_fwd(logp, old_logp, ref_logp, mask, rewards, lam, codes, taus,
                                   estimator, eps, scale_code, eps_low, eps_high, beta, loss_type,
                                   max_completion_length, need_grad, kl_form, dual_clip,
                                   seq_ratio, surrogate, tau_pos, tau_neg,
                                   (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))


@_nonlinear_grpo_op.register_fake
def _(logp, old_logp, ref_logp, mask, rewards, lam, codes, taus, estimator, eps, scale_code,
      eps_low, eps_high, beta, loss_type, max_completion_length, need_grad, kl_form=0,
      dual_clip=None, seq_ratio=False, surrogate="clip", tau_pos=1.0, tau_neg=1.05, vespo_k_pos=2.0,
      vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    B, G, m = rewards.shape
    f32 = torch.float32
    shape = tuple(logp.shape) if need_grad else (0, 0)
    per_row = seq_ratio or surrogate in ROW_SURROGATES
    return (logp.new_empty(N_STATS, dtype=f32), logp.new_empty((B, G), dtype=f32),
            logp.new_empty((B, m), dtype=f32), logp.new_empty(logp.shape[0] if per_row else 0, dtype=f32),
            logp.new_empty(shape, dtype=grad_dtype(logp)))


def _setup_context(ctx, inputs, output):
    stats, _, _, _, grad = output
    ctx.set_materialize_grads(False)  # only the loss carries a gradient (see policy_loss/triton.py)
    ctx.save_for_backward(grad, stats)
    ctx.logp_dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_stats, grad_adv, grad_values, grad_seq, grad_grad):
    grad, stats = ctx.saved_tensors
    d_logp = None if grad_stats is None else backward_logp(grad, stats, grad_stats, ctx.logp_dtype)
    return (d_logp,) + (None,) * (ctx.n_inputs - 1)


_nonlinear_grpo_op.register_autograd(_backward, setup_context=_setup_context)


def nonlinear_grpo_loss_triton(
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
    """Triton :func:`iama_kernels.nonlinear_grpo_loss`; rewards ``[B, G, m]``, validated."""
    form = kl_form(kl_estimator, kl_weight)
    seq_ratio = ratio_level == "sequence"
    lam, _ = _lambda(rewards, objective, estimator, criterion_weights, None)
    codes, taus = transform_codes(objective.transforms)
    max_len = 0 if max_completion_length is None else int(max_completion_length)
    need = needs_grad(logp)
    if scale == "batch":
        _, shaped, values = _group_advantages_op(rewards, None, lam, codes, taus, estimator, eps,
                                                 0, False)
        adv = scale_advantages(shaped, "batch", eps, None)
        stats, seq, _, _ = _policy_loss_op(logp, old_logp, ref_logp, adv.reshape(-1), mask, eps_low,
                                           eps_high, beta, loss_type, max_len, need, form,
                                           dual_clip, seq_ratio, surrogate, tau_pos, tau_neg, False,
                                           *vespo)
    else:
        stats, adv, values, seq, _ = _nonlinear_grpo_op(
            logp, old_logp, ref_logp, mask, rewards, lam, codes, taus, estimator, eps,
            SCALE_CODES[scale],
            eps_low, eps_high, beta, loss_type, max_len, need, form, dual_clip, seq_ratio,
            surrogate, tau_pos, tau_neg, *vespo,
        )
    metrics = stats.detach()
    return NonlinearGRPOOutput(stats[0], adv.detach(), metrics[1], metrics[2], metrics[3],
                               values.detach(), lam, metrics[5], metrics[6], metrics[7],
                               seq.detach() if seq_ratio or surrogate in ROW_SURROGATES else None)

"""Triton kernel of ``rollout_correction``: the train/rollout correction's token weights and each
row's sums in one read of ``old_logp``, ``rollout_logp`` and the mask (sequence-level units: a
second read of the row, for its weights once its statistic is known).

One program per row streams it in blocks of ``BLOCK_T`` tokens, float32 arithmetic (half types
converted on load), per-lane float32 sums reduced at the end of the row. Loads are bounded by
the row's length only (whole vectors); a token whose mask is 0 is selected out right after its
load, so its values (NaN included) never reach a sum or a weight. The clamps are selects: a NaN
stays NaN, as in the reference. Arguments arrive validated by the public function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import launch_device
from .triton import mask_arg, token_block

_GATE_CODES = {"ratio": 0, "tv": 1, "binary_kl": 2}


@triton.jit
def _clamp_prob(p):
    return tl.where(p < 1e-6, 1e-6, tl.where(p > 0.999999, 0.999999, p))  # (NaN stays NaN)


@triton.jit
def _one_minus_exp(x, ex):
    """1 - e^x given ex = e^x: -expm1(x), by its Taylor series (to x^10) for |x| < 1/2, where
    1 - ex loses the digits of a probability near 1 (and 1 - clamp(p) misses the bound 1e-6:
    1 - 1e-6 is not a float32)."""
    s = 1.0 / 3628800.0
    s = s * x + 1.0 / 362880.0
    s = s * x + 1.0 / 40320.0
    s = s * x + 1.0 / 5040.0
    s = s * x + 1.0 / 720.0
    s = s * x + 1.0 / 120.0
    s = s * x + 1.0 / 24.0
    s = s * x + 1.0 / 6.0
    s = s * x + 0.5
    s = s * x + 1.0
    return tl.where(tl.abs(x) < 0.5, -(s * x), 1.0 - ex)


@triton.jit
def _gate_statistic(old, rollout, ratio, GATE: tl.constexpr):
    """The token's statistic: its ratio (GATE 0), the TV |p - q| (1) or the binary KL (2) of the
    clamped probabilities p = e^rollout, q = e^old (1 - p, 1 - q as -expm1, clamped alike)."""
    if GATE == 0:
        return ratio
    ep = tl.exp(rollout)
    eq = tl.exp(old)
    p = _clamp_prob(ep)
    q = _clamp_prob(eq)
    if GATE == 1:
        return tl.abs(p - q)
    np_ = _clamp_prob(_one_minus_exp(rollout, ep))
    nq = _clamp_prob(_one_minus_exp(old, eq))
    kl = p * tl.log(p / q) + np_ * tl.log(np_ / nq)
    return tl.where(kl < 0.0, 0.0, kl)  # a binary KL is >= 0 (rounding can leave it below)


@triton.jit
def _rollout_correction_kernel(
    old_ptr, rollout_ptr, mask_ptr, w_ptr, rows_ptr,
    s_or, s_ot, s_rr, s_rt, s_mr, s_mt, T, low, high,
    SEQUENCE: tl.constexpr, GATE: tl.constexpr, CLIP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Row ``program_id`` (64-bit row offsets; 32-bit offsets within a row): its weights (a
    contiguous ``[S, T]`` float32 output) and its four sums (``rows [S, 4]`` float32)."""
    row = tl.program_id(0).to(tl.int64)
    old_row = old_ptr + row * s_or
    rollout_row = rollout_ptr + row * s_rr
    mask_row = mask_ptr + row * s_mr
    w_row = w_ptr + row * T
    offs = tl.arange(0, BLOCK_T)
    acc_d = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_T], dtype=tl.float32)  # dropped mass, or (sequence level) the statistic's
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        live = t < T
        m = tl.load(mask_row + t * s_mt, mask=live, other=0).to(tl.float32)
        keep = live & (m != 0)
        m = tl.where(keep, m, 0.0)
        old = tl.where(keep, tl.load(old_row + t * s_ot, mask=live, other=0.0).to(tl.float32), 0.0)
        rollout = tl.where(keep, tl.load(rollout_row + t * s_rt, mask=live, other=0.0).to(tl.float32), 0.0)
        d = old - rollout
        acc_d += d * m
        acc_m += m
        if SEQUENCE:
            if GATE != 0:
                acc_x += tl.where(keep, _gate_statistic(old, rollout, d, GATE) * m, 0.0)
        else:
            ratio = tl.exp(d)
            stat = _gate_statistic(old, rollout, ratio, GATE)
            if CLIP:  # a NaN ratio is neither below nor above, and stays NaN
                dropped = (stat < low) | (stat > high)
                coef = tl.where(ratio < low, low, tl.where(ratio > high, high, ratio))
            else:  # kept where low <= stat <= high: a NaN statistic drops its token
                dropped = ~((stat >= low) & (stat <= high))
                coef = tl.where(dropped, 0.0, ratio)
            tl.store(w_row + t, tl.where(keep, coef * m, 0.0), mask=live)
            acc_x += tl.where(keep & dropped, m, 0.0)
    sum_d = tl.sum(acc_d, axis=0)
    sum_m = tl.sum(acc_m, axis=0)
    sum_x = tl.sum(acc_x, axis=0)
    tl.store(rows_ptr + row * 4, sum_d)
    tl.store(rows_ptr + row * 4 + 1, sum_m)
    if SEQUENCE:
        if GATE == 0:  # noqa: SIM108  (a compile-time branch, kept as a statement for Triton)
            stat_row = tl.exp(sum_d / sum_m)
        else:
            stat_row = sum_x / sum_m
        kept = (stat_row >= low) & (stat_row <= high)  # an empty row's 0 / 0 drops it
        tl.store(rows_ptr + row * 4 + 2, tl.where(kept, 0.0, 1.0))
        tl.store(rows_ptr + row * 4 + 3, stat_row)
        kept_lanes = (tl.zeros([BLOCK_T], dtype=tl.float32) + tl.where(kept, 1.0, 0.0)) != 0.0  # (a vector)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            live = t < T
            m = tl.load(mask_row + t * s_mt, mask=live, other=0).to(tl.float32)
            keep = live & (m != 0) & kept_lanes
            old = tl.load(old_row + t * s_ot, mask=live, other=0.0).to(tl.float32)
            rollout = tl.load(rollout_row + t * s_rt, mask=live, other=0.0).to(tl.float32)
            w = tl.exp(tl.where(keep, old - rollout, 0.0)) * m
            tl.store(w_row + t, tl.where(keep, w, 0.0), mask=live)
    else:
        tl.store(rows_ptr + row * 4 + 2, sum_x)
        tl.store(rows_ptr + row * 4 + 3, 0.0)


@torch.library.custom_op("iama_triton::rollout_correction", mutates_args=())
def _rollout_correction_op(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                           sequence: bool, gate: str, clip: bool, low: float, high: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    S, T = old_logp.shape
    weights = torch.empty(S, T, dtype=torch.float32, device=old_logp.device)
    rows = torch.zeros(S, 4, dtype=torch.float32, device=old_logp.device)
    if S and T:
        m = mask_arg(mask)
        block_t, warps = token_block(T, max(old_logp.element_size(), rollout_logp.element_size()))
        with launch_device(old_logp.device):
            _rollout_correction_kernel[(S,)](
                old_logp, rollout_logp, m, weights, rows, *old_logp.stride(), *rollout_logp.stride(),
                *m.stride(), T, low, high, SEQUENCE=sequence, GATE=_GATE_CODES[gate], CLIP=clip,
                BLOCK_T=block_t, num_warps=warps,
            )
    elif S and sequence:  # empty rows: 0 / 0, dropped
        rows[:, 2] = 1.0
        rows[:, 3] = float("nan")
    return weights, rows


@_rollout_correction_op.register_fake
def _(old_logp, rollout_logp, mask, sequence, gate, clip, low, high):
    S, T = old_logp.shape
    return old_logp.new_empty(S, T, dtype=torch.float32), old_logp.new_empty(S, 4, dtype=torch.float32)


def rollout_correction_triton(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                              sequence: bool, gate: str, clip: bool, low: float, high: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [S, T] float32, rows [S, 4] float32)`` of :func:`iama_kernels.rollout_correction`
    (which passes the log-probs detached)."""
    return _rollout_correction_op(old_logp, rollout_logp, mask, sequence, gate, clip, low, high)

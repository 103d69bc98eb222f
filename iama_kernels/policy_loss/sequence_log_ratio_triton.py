"""Triton kernel of ``sequence_log_ratio``: each row's sum of (clamped) ``logp - old_logp`` over
its tokens with a non-zero mask, and that token count, in one read of the three tensors.

One program per row streams it in blocks of ``BLOCK_T`` tokens into per-lane float32 sums,
reduced once at the end (PyTorch's eager version runs a subtraction, a clamp, a select and a sum:
four passes and three ``[S, T]`` temporaries). The loads are bounded by the row's length only,
so that they are whole 16-byte vectors (a load predicated on each token's mask value is split
into scalar ones); a token whose mask is 0 is then selected out before the sum, so its values
(NaN included) never reach it. Half types are converted to float32 on load. Arguments arrive
validated by the public function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import launch_device
from .triton import mask_arg, token_block


@triton.jit
def _sequence_log_ratio_kernel(
    logp_ptr, old_ptr, mask_ptr, sums_ptr, support_ptr,
    s_lr, s_lt, s_or, s_ot, s_mr, s_mt, T, lo, hi,
    CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Row ``program_id`` (64-bit row offsets; 32-bit offsets within a row): its float32 sum
    and its support. The clamps are selects, so a NaN difference stays NaN."""
    row = tl.program_id(0).to(tl.int64)
    lp_row = logp_ptr + row * s_lr
    old_row = old_ptr + row * s_or
    mask_row = mask_ptr + row * s_mr
    offs = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    count = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        live = t < T
        m = tl.load(mask_row + t * s_mt, mask=live, other=0)
        keep = live & (m != 0)
        lp = tl.load(lp_row + t * s_lt, mask=live, other=0.0).to(tl.float32)
        old = tl.load(old_row + t * s_ot, mask=live, other=0.0).to(tl.float32)
        d = lp - old
        if CLAMP_LO:
            d = tl.where(d < lo, lo, d)
        if CLAMP_HI:
            d = tl.where(d > hi, hi, d)
        acc += tl.where(keep, d, 0.0)
        count += keep.to(tl.int32)
    tl.store(sums_ptr + row, tl.sum(acc, axis=0))
    tl.store(support_ptr + row, tl.sum(count, axis=0))


@torch.library.custom_op("iama_triton::sequence_log_ratio", mutates_args=())
def _sequence_log_ratio_op(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                           low: float | None, high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    S, T = logp.shape
    sums = torch.zeros(S, dtype=torch.float32, device=logp.device)
    support = torch.zeros(S, dtype=torch.int32, device=logp.device)
    if S and T:
        m = mask_arg(mask)
        block_t, warps = token_block(T, logp.element_size())
        with launch_device(logp.device):
            _sequence_log_ratio_kernel[(S,)](
                logp, old_logp, m, sums, support, *logp.stride(), *old_logp.stride(), *m.stride(), T,
                0.0 if low is None else low, 0.0 if high is None else high,
                CLAMP_LO=low is not None, CLAMP_HI=high is not None, BLOCK_T=block_t, num_warps=warps,
            )
    return sums, support


@_sequence_log_ratio_op.register_fake
def _(logp, old_logp, mask, low, high):
    S = logp.shape[0]
    return logp.new_empty(S, dtype=torch.float32), logp.new_empty(S, dtype=torch.int32)


def sequence_log_ratio_triton(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                              low: float | None, high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums [S] float32, support [S] float32)`` of :func:`iama_kernels.sequence_log_ratio`."""
    sums, support = _sequence_log_ratio_op(logp.detach(), old_logp.detach(), mask, low, high)
    return sums, support.to(torch.float32)

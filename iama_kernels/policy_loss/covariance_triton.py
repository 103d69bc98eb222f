"""Triton kernels of ``covariance_top_k`` and ``covariance_band`` (KL-Cov's and Clip-Cov's token
selections): the C++ backend's results, on CUDA.

Two launches and one PyTorch selection, in the C++ backend's arithmetic:

1. ``_row_sums_kernel``: one program per row sums ``A`` and ``logp`` over the row's tokens with a
   non-zero mask in float64 and counts them; the ``[S]`` partials are added in float64 and the
   means rounded to float32 on the device (no host sync), as the C++ backend rounds its
   double-precision means before the products.
2. One program per row computes each token's float32 product ``(A - mean A)(logp - mean logp)``
   and writes, for the top k, a 64-bit key per token whose integer order is the C++ backend's
   total order: the product's bits made monotonic in the high half (NaN above everything, -0
   folded onto +0), ``2**32 - 1 - index`` in the low half (equal products by the lower index), and
   the minimum int64 for a token outside the mask. ``torch.topk`` of the keys then returns the
   exact, deterministic top k in order, and the indices come back out of the low halves. For the
   band it writes one byte per token (inside the band and, with ``old_logp``, not clipped by
   PPO's test) and ``torch.nonzero`` lists them in row-major order.

verl's own selection gathers the response tokens (a ``nonzero`` and two gathers), then runs two
means, two subtractions and a product, each an ``[n]`` temporary, before its top k or mask; here
the inputs are read twice and one ``[S, T]`` key (8 bytes) or flag (1 byte) per token is written.
Half inputs are converted to float32 on load. Arguments arrive validated by the public function;
the flat indices must fit in 32 bits (``S * T < 2**32 - 1``), which the dispatch checks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import launch_device
from .triton import mask_arg, token_block

_LOW = 2**32 - 1  # a key's low half: 2**32 - 1 - the flat index
_LOW_C: tl.constexpr = tl.constexpr(_LOW)
_MASKED_C: tl.constexpr = tl.constexpr(-(2**63))  # a token outside the mask: below every other key


@triton.jit
def _row_sums_kernel(a_ptr, l_ptr, m_ptr, sums_ptr, count_ptr, s_ar, s_at, s_lr, s_lt, s_mr, s_mt, T,
                     BLOCK_T: tl.constexpr):
    """Row ``program_id``: its float64 sums of A and logp over the masked-in tokens (a masked-out
    value, NaN padding included, never reaches them) and their count."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    acc_a = tl.zeros([BLOCK_T], dtype=tl.float64)
    acc_l = tl.zeros([BLOCK_T], dtype=tl.float64)
    count = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        live = t < T
        keep = live & (tl.load(m_ptr + row * s_mr + t * s_mt, mask=live, other=0) != 0)
        a = tl.load(a_ptr + row * s_ar + t * s_at, mask=live, other=0.0).to(tl.float32)
        lp = tl.load(l_ptr + row * s_lr + t * s_lt, mask=live, other=0.0).to(tl.float32)
        acc_a += tl.where(keep, a.to(tl.float64), 0.0)
        acc_l += tl.where(keep, lp.to(tl.float64), 0.0)
        count += keep.to(tl.int32)
    tl.store(sums_ptr + 2 * row, tl.sum(acc_a, axis=0))
    tl.store(sums_ptr + 2 * row + 1, tl.sum(acc_l, axis=0))
    tl.store(count_ptr + row, tl.sum(count, axis=0))


@triton.jit
def _products(a_ptr, l_ptr, m_ptr, row, t, live, ma, ml, s_ar, s_at, s_lr, s_lt, s_mr, s_mt):
    """The tokens' mask test, their float32 inputs and products, as the C++ backend rounds them."""
    keep = live & (tl.load(m_ptr + row * s_mr + t * s_mt, mask=live, other=0) != 0)
    a = tl.load(a_ptr + row * s_ar + t * s_at, mask=live, other=0.0).to(tl.float32)
    lp = tl.load(l_ptr + row * s_lr + t * s_lt, mask=live, other=0.0).to(tl.float32)
    return keep, a, lp, (a - ma) * (lp - ml)


@triton.jit
def _top_k_keys_kernel(a_ptr, l_ptr, m_ptr, means_ptr, keys_ptr, s_ar, s_at, s_lr, s_lt, s_mr, s_mt, T,
                       BLOCK_T: tl.constexpr):
    """Row ``program_id``: each token's key (see the module doc), at its flat index."""
    row = tl.program_id(0).to(tl.int64)
    ma = tl.load(means_ptr)
    ml = tl.load(means_ptr + 1)
    offs = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        live = t < T
        keep, _, _, cov = _products(a_ptr, l_ptr, m_ptr, row, t, live, ma, ml, s_ar, s_at, s_lr, s_lt,
                                    s_mr, s_mt)
        cov = tl.where(cov == 0.0, 0.0, cov)  # -0 ranks as +0 (they compare equal)
        bits = cov.to(tl.int32, bitcast=True)
        # A negative float's magnitude bits grow as it falls: flipping them makes the signed order
        # the float order. Every NaN is put at the top (torch.topk ranks NaN first).
        high = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        high = tl.where(cov != cov, 0x7FFFFFFF, high)
        index = row * T + t
        key = high.to(tl.int64) * 4294967296 + (tl.full([BLOCK_T], _LOW_C, tl.int64) - index)
        key = tl.where(keep, key, tl.full([BLOCK_T], _MASKED_C, tl.int64))
        tl.store(keys_ptr + index, key, mask=live)


@triton.jit
def _band_kernel(a_ptr, l_ptr, o_ptr, m_ptr, means_ptr, flags_ptr, s_ar, s_at, s_lr, s_lt, s_or, s_ot,
                 s_mr, s_mt, T, low, high, ratio_low, ratio_high,
                 CLIP_TEST: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row ``program_id``: 1 where a masked-in token's product lies strictly inside ``(low, high)``
    and (``CLIP_TEST``) PPO's clip does not act on it: not ``-A clamp(rho) > -A rho``."""
    row = tl.program_id(0).to(tl.int64)
    ma = tl.load(means_ptr)
    ml = tl.load(means_ptr + 1)
    offs = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        live = t < T
        keep, a, lp, cov = _products(a_ptr, l_ptr, m_ptr, row, t, live, ma, ml, s_ar, s_at, s_lr, s_lt,
                                     s_mr, s_mt)
        chosen = keep & (cov > low) & (cov < high)
        if CLIP_TEST:
            old = tl.load(o_ptr + row * s_or + t * s_ot, mask=live, other=0.0).to(tl.float32)
            rho = tl.exp(lp - old)
            clamped = tl.where(rho < ratio_low, ratio_low, tl.where(rho > ratio_high, ratio_high, rho))
            chosen = chosen & ~(-a * clamped > -a * rho)
        tl.store(flags_ptr + row * T + t, chosen.to(tl.uint8), mask=live)


def _as_float32(x: float) -> float:
    """``x`` rounded to float32 (as the C++ backend casts its scalars): overflow gives inf."""
    return float(torch.tensor(x, dtype=torch.float32))


def _means(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, offset: float,
           block_t: int, warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means [2] float32: mean A, mean logp; count [] int64)``: the float64 sums over the count
    plus ``offset``, both in float32 first (as the C++ backend divides), left on the device."""
    S, T = logp.shape
    sums = torch.empty(S, 2, dtype=torch.float64, device=logp.device)
    counts = torch.empty(S, dtype=torch.int32, device=logp.device)
    _row_sums_kernel[(S,)](advantages, logp, mask, sums, counts, *advantages.stride(), *logp.stride(),
                           *mask.stride(), T, BLOCK_T=block_t, num_warps=warps)
    n = counts.sum(dtype=torch.int64)
    denominator = (n.to(torch.float32) + torch.tensor(offset, dtype=torch.float32)).double()
    return (sums.sum(0) / denominator).to(torch.float32), n


@torch.library.custom_op("iama_triton::covariance_top_k", mutates_args=())
def _top_k_op(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    S, T = logp.shape
    if S * T == 0:
        return torch.empty(0, dtype=torch.long, device=logp.device)
    m = mask_arg(mask)
    block_t, warps = token_block(T, 4)
    with launch_device(logp.device):
        means, n = _means(advantages, logp, m, 0.0, block_t, warps)
        want = min(k, int(n))  # the one host sync: the result's length
        if want == 0:
            return torch.empty(0, dtype=torch.long, device=logp.device)
        keys = torch.empty(S * T, dtype=torch.int64, device=logp.device)
        _top_k_keys_kernel[(S,)](advantages, logp, m, means, keys, *advantages.stride(), *logp.stride(),
                                 *m.stride(), T, BLOCK_T=block_t, num_warps=warps)
    top = torch.topk(keys, want, sorted=True).values
    return _LOW - torch.bitwise_and(top, _LOW)


@_top_k_op.register_fake
def _(advantages, logp, mask, k):
    return logp.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


@torch.library.custom_op("iama_triton::covariance_band", mutates_args=())
def _band_op(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, low: float, high: float,
             old_logp: torch.Tensor | None, eps_low: float, eps_high: float) -> torch.Tensor:
    S, T = logp.shape
    if S * T == 0:
        return torch.empty(0, dtype=torch.long, device=logp.device)
    m = mask_arg(mask)
    block_t, warps = token_block(T, 4)
    clip_test = old_logp is not None
    old = old_logp if clip_test else logp  # not read without the clip test
    # verl's masked means divide by the count + 1e-8 (in float32: it vanishes for a count >= 1)
    ratio_low = _as_float32(1.0 - _as_float32(eps_low))
    ratio_high = _as_float32(1.0 + _as_float32(eps_high))
    flags = torch.empty(S * T, dtype=torch.uint8, device=logp.device)
    with launch_device(logp.device):
        means, _ = _means(advantages, logp, m, 1e-8, block_t, warps)
        _band_kernel[(S,)](advantages, logp, old, m, means, flags, *advantages.stride(), *logp.stride(),
                           *old.stride(), *m.stride(), T, _as_float32(low), _as_float32(high), ratio_low,
                           ratio_high, CLIP_TEST=clip_test, BLOCK_T=block_t, num_warps=warps)
    return flags.nonzero().squeeze(1)


@_band_op.register_fake
def _(advantages, logp, mask, low, high, old_logp, eps_low, eps_high):
    return logp.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


def covariance_top_k_triton(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor,
                            k: int) -> torch.Tensor:
    """``[min(k, n)]`` int64 flat indices of :func:`iama_kernels.covariance_top_k`."""
    return _top_k_op(advantages.detach(), logp.detach(), mask, k)


def covariance_band_triton(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, low: float,
                           high: float, old_logp: torch.Tensor | None, eps_low: float,
                           eps_high: float) -> torch.Tensor:
    """``[c]`` int64 increasing flat indices of :func:`iama_kernels.covariance_band`."""
    old = None if old_logp is None else old_logp.detach()
    return _band_op(advantages.detach(), logp.detach(), mask, low, high, old, eps_low, eps_high)

"""Triton kernels for the clipped-ratio + KL token loss (every surrogate and KL estimator),
forward and backward.

The forward kernel streams each row's tokens once (logp, old_logp, ref_logp, mask), writes the
per-token gradient ``d loss / d logp`` and per-program partial sums of the loss and the metrics
(kept per lane over a program's rows and reduced across lanes once, at the program's end);
a one-program kernel reduces the partials in a fixed order (deterministic, no atomics) into
``stats = [loss, kl, clip_fraction, ratio_mean, post_scale, log_ratio_mean,
dual_clip_fraction, clip_high_fraction]``. No other ``[S, T]`` tensor is created.

Token weights (``policy_loss/reference.py::token_weights``):

* ``grpo``: ``w_t = m_t / (S max(1, sum_t m_t))`` needs the row's mask total before the first
  gradient is written: a program owns whole rows, so it reads the row's mask first (the pre-pass
  below) and then streams the row. The second read of the mask (1 byte per token for a bool
  mask) comes from cache, not from memory.
* ``dr_grpo``: a constant ``1 / (S L)``, applied in the kernel.
* ``token``: ``w_t = m_t / max(1, sum m)`` needs a batch-wide total, which no program has: the
  kernel writes ``m_t g_t`` and the constant ``1 / max(1, sum m)`` (``post_scale``) is applied by
  the backward, which multiplies by ``grad_output`` anyway, so it costs nothing extra.

Backward: ``grad_logp = grad * (grad_loss * post_scale)`` in ``logp``'s dtype. On CUDA the
gradient is stored in ``logp``'s dtype; on the CPU interpreter it is stored in float32 (the
interpreter rounds float32 to bfloat16 by truncation) and converted once in the backward.

Loads. The pre-pass over a row's mask also finds the row's extent (one past its last valid
token). Log-probs past the extent (the padding of shorter completions) are never loaded, so they
cost no memory traffic; inside it, logp, old and ref are loaded whole, with a mask that depends
only on the extent rounded up to 16 tokens, which keeps the loads 16-byte vectors (a mask that
depends on each token's value splits every vector into predicated scalar loads; see
tests/_triton_aot.py). Values under mask 0 inside the extent (holes) are loaded but only ever
selected away (``where``, never multiplied by 0): NaN or inf there cannot leak.

Warps: a token block of ``BLOCK_T`` tokens gets as many threads as give each thread 16 bytes of
every log-prob tensor (4 float32 or 8 bfloat16 tokens: one vector load each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import ROW_SURROGATES, VESPO_DEFAULTS, kl_form
from .._device import launch_device
from .._types import PolicyLossOutput

LOSS_TYPE_CODES = {"grpo": 0, "token": 1, "dr_grpo": 2}
SURROGATE_CODES = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3, "dppo_tv": 4, "dppo_kl": 5, "gmpo": 6}
N_PARTIALS = 8  # loss, mask total, kl, clipped, ratio, log-ratio, dual-clipped, clipped-above sums
N_STATS = 8  # loss, kl, clip_fraction, ratio_mean, post_scale, log_ratio_mean, dual_clip_fraction,
# clip_high_fraction
_SM_COUNT: dict[torch.device, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 4 for the CPU interpreter."""
    if device.type != "cuda":
        return 4
    n = _SM_COUNT.get(device)
    if n is None:
        n = _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def token_block(T: int, itemsize: int) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)`` for rows of ``T`` tokens of ``itemsize``-byte log-probs: up to
    1024 tokens a block, 16 bytes of each log-prob tensor per thread (see module doc)."""
    block = min(1024, max(16, triton.next_power_of_2(T)))
    return block, max(1, min(8, block * itemsize // (16 * 32)))


def grad_dtype(logp: torch.Tensor) -> torch.dtype:
    """Stored gradient dtype: logp's on CUDA; float32 on the interpreter (see module doc)."""
    return logp.dtype if logp.device.type == "cuda" else torch.float32


def mask_arg(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask is passed as uint8 (same storage, no copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@triton.jit
def _sum_and_max(a_sum, a_max, b_sum, b_max):
    return a_sum + b_sum, tl.maximum(a_max, b_max)


@triton.jit
def _kl_term(x, ratio, KL_FORM: tl.constexpr):
    """The KL estimator's value and its derivative in logp at ``x = logp - ref`` (``KL_FORM``: an
    ``iama::KlForm`` code; csrc/include/iama/loss.h): k3 0, TRL's ``ratio * k3`` 1 (the ratio
    not detached: derivative ``ratio * x``), k2 2, k1 3, ``|x|`` 4; plus 8: k2's derivative ``x``."""
    if KL_FORM % 8 == 1:
        kl = ratio * (tl.exp(-x) + x - 1.0)
        dkl = ratio * x
    elif KL_FORM % 8 == 2:
        kl = 0.5 * x * x
        dkl = x
    elif KL_FORM % 8 == 3:
        kl = x
        dkl = x * 0.0 + 1.0
    elif KL_FORM % 8 == 4:
        kl = tl.abs(x)
        dkl = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x * 0.0))  # NaN stays NaN
    else:
        ed = tl.exp(-x)
        kl = ed + x - 1.0
        dkl = 1.0 - ed
    if KL_FORM >= 8:
        dkl = x
    return kl, dkl


@triton.jit
def _token_row(
    a, row, logp_ptr, old_ptr, ref_ptr, mask_ptr, grad_ptr, adv_ptr, seq_ptr,
    s_lr, s_lt, s_or, s_ot, s_rr, s_rt, s_mr, s_mt, s_gr, s_gt, s_ar, s_at,
    T, eps_low, eps_high, beta, dual_c, tau_pos, tau_neg, norm, loss_acc, kl_acc, clip_acc, ratio_acc,
    lratio_acc, dual_acc, high_acc, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, LOSS_TYPE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, KL_FORM: tl.constexpr,
    DUAL_CLIP: tl.constexpr, TOKEN_ADV: tl.constexpr, SEQ_RATIO: tl.constexpr,
    SURROGATE: tl.constexpr = 0, rows_ptr=None, ROW_STATS: tl.constexpr = False,
    vk_pos=2.0, vl_pos=3.0, vk_neg=3.0, vl_neg=2.0,
):
    """Stream one row with advantage ``a`` into the program's per-lane ``[BLOCK_T]`` sums of the
    weighted loss, kl, clipped, ratio, log-ratio, dual-clipped and clipped-above terms; returns
    them and the row's mask total.

    The sums are reduced across lanes once per program (``_store_partials``), not per row: each
    block-wide reduction is a shared-memory round trip behind a barrier, and a 1024-token row
    streams in the time of a few of them (benchmarks/gpu/NOTES.md, change 3). The one reduction
    left per row is the pre-pass's (mask total and extent together). ``norm``: ``1/S`` (grpo),
    ``1/(S L)`` (dr_grpo), unused (token). ``KL_FORM``: the KL estimator's ``iama::KlForm`` code
    (``_kl_term``).
    ``DUAL_CLIP``: the dual clip ``c = dual_c`` is on: for ``a < 0`` a token with ``ratio > c``
    has the constant surrogate ``c a`` and no surrogate gradient. ``TOKEN_ADV``: each token's
    advantage is read from ``adv_ptr`` (row stride ``s_ar``, token stride ``s_at``; 0 where the
    mask is 0), not the row's ``a``. ``SEQ_RATIO`` (with ``HAS_OLD``): GSPO's sequence ratio, a
    second pre-pass over the row's extent sums ``logp - old`` over its support, and every token's
    log-ratio is that mean (``sg[l] + logp - sg[logp]``: derivative 1, so the formulas hold),
    stored at ``seq_ptr[row]``; the main pass then does not load ``old``. ``SURROGATE``: 0 PPO's
    clipped ratio, 1 CISPO (``sg[clip(ratio)] a logp``), 2 SAPO (the soft gate with temperatures
    ``tau_pos``/``tau_neg``), 3 VESPO (``sg[phi] a logp``: a pre-pass over the row's extent sums
    its clamped log-ratios into VESPO's log weight, stored at ``seq_ptr[row]``, whose gamma
    weights with ``(vk_pos, vl_pos)`` and ``(vk_neg, vl_neg)`` multiply the advantages ``>= 0``
    and ``< 0``), 4 and 5 DPPO (total variation, binary KL: ``sg[min(rho', c) v] a logp`` with
    ``c = dual_c`` under ``DUAL_CLIP`` and the trust region ``v`` bounded by ``eps_high`` and
    ``eps_low``), 6 GMPO (every token's surrogate is the row's ``G = exp(M) abar``: a pre-pass
    over the row's extent sums the sign-aware clipped log-ratios into ``M``, stored at
    ``seq_ptr[row]``, and with ``TOKEN_ADV`` the advantages into their mean ``abar``; the
    gradient is ``G`` where the token's log-ratio is not clipped and its advantage is not 0); see
    ``csrc/include/iama/loss.h`` for the formulas, which these follow.
    ``ROW_STATS``: the row's mask total, clipped and clipped-above weights go to
    ``rows_ptr[3 row + 0..2]``."""
    offs = tl.arange(0, BLOCK_T)
    # Row bases in 64 bits: a tensor of 2**31 elements or more (65536 rows of 32768 tokens) has
    # row offsets past int32; offsets within a row stay 32-bit vectors.
    r64 = tl.cast(row, tl.int64)
    logp_row = logp_ptr + r64 * s_lr
    old_row = old_ptr + r64 * s_or
    ref_row = ref_ptr + r64 * s_rr
    mask_row = mask_ptr + r64 * s_mr
    grad_row = grad_ptr + r64 * s_gr
    adv_row = adv_ptr + r64 * s_ar
    # Pre-pass over the row's mask: its total (returned, and the grpo weight) and its extent (one
    # past the last valid token, rounded up to 16 tokens so that the loads below keep whole
    # 16-byte vectors).
    msum_row = tl.zeros([BLOCK_T], dtype=tl.float32)
    reach = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        mk = tl.load(mask_row + t * s_mt, mask=t < T, other=0)
        msum_row += mk.to(tl.float32)
        reach = tl.maximum(reach, tl.where(mk != 0, t + 1, 0))
    msum, last = tl.reduce((msum_row, reach), 0, _sum_and_max)
    extent = (last + 15) // 16 * 16
    # A second pre-pass over the row's extent, for GSPO's mean log-ratio or VESPO's log weight (the
    # sum of the token log-ratios clamped to +-20, TRL's bounds; 0 without old_logp: every ratio
    # is 1). Either is stored at seq_ptr[row].
    seq_lr = 0.0
    log_w = 0.0
    if SEQ_RATIO or (SURROGATE == 3 and HAS_OLD):
        lr_row = tl.zeros([BLOCK_T], dtype=tl.float32)
        n_row = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            live = (t < T) & (t < extent)
            mk = tl.load(mask_row + t * s_mt, mask=live, other=0)
            lp = tl.load(logp_row + t * s_lt, mask=live, other=0.0).to(tl.float32)
            old = tl.load(old_row + t * s_ot, mask=live, other=0.0).to(tl.float32)
            d = lp - old
            if SURROGATE == 3:
                d = tl.minimum(tl.maximum(d, -20.0), 20.0)
            lr_row += tl.where(mk != 0, d, 0.0)
            if SEQ_RATIO:
                n_row += tl.where(mk != 0, 1.0, 0.0)
        if SEQ_RATIO:
            seq_lr = tl.sum(lr_row, axis=0) / tl.maximum(tl.sum(n_row, axis=0), 1.0)
            tl.store(seq_ptr + r64, seq_lr)
        else:
            log_w = tl.minimum(tl.maximum(tl.sum(lr_row, axis=0), -18.420680743952367), 20.0)
    g_ratio = 1.0
    g_obj = a
    if SURROGATE == 6:  # GMPO: the row's mean clipped log-ratio M and its objective exp(M) abar
        c_row = tl.zeros([BLOCK_T], dtype=tl.float32)
        a_row = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            live = (t < T) & (t < extent)
            mk = tl.load(mask_row + t * s_mt, mask=live, other=0).to(tl.float32)
            if HAS_OLD:
                lp = tl.load(logp_row + t * s_lt, mask=live, other=0.0).to(tl.float32)
                old = tl.load(old_row + t * s_ot, mask=live, other=0.0).to(tl.float32)
                d = lp - old
            else:
                d = tl.zeros([BLOCK_T], dtype=tl.float32)
            if TOKEN_ADV:
                a_t = tl.where(mk != 0, tl.load(adv_row + t * s_at, mask=live, other=0.0).to(tl.float32), 0.0)
                a_row += tl.where(mk != 0, mk * a_t, 0.0)
            else:
                a_t = a + tl.zeros([BLOCK_T], dtype=tl.float32)  # a tensor test below
            # where(), not minimum()/maximum(): a NaN log-ratio stays NaN
            c = tl.where(a_t > 0.0, tl.where(d > eps_high, eps_high, d),
                         tl.where(a_t < 0.0, tl.where(d < -eps_low, -eps_low, d), 0.0))
            c_row += tl.where(mk != 0, mk * c, 0.0)
        nonempty = msum != 0.0
        weight = tl.where(nonempty, msum, 1.0)
        g_mean = tl.where(nonempty, tl.sum(c_row, axis=0) / weight, 0.0)
        tl.store(seq_ptr + r64, g_mean)
        if TOKEN_ADV:  # noqa: SIM108 (a constexpr branch, as the kernel's others)
            g_adv = tl.where(nonempty, tl.sum(a_row, axis=0) / weight, 0.0)
        else:
            g_adv = a
        g_ratio = tl.exp(g_mean)
        g_obj = g_ratio * g_adv
    phi_pos = 1.0
    phi_neg = 1.0
    if SURROGATE == 3:  # VESPO: the row's two gamma weights, one per sign of the advantage
        tl.store(seq_ptr + r64, log_w)
        w_seq = tl.exp(log_w)
        phi_pos = tl.exp(vl_pos + vk_pos * log_w - vl_pos * w_seq)
        phi_neg = tl.exp(vl_neg + vk_neg * log_w - vl_neg * w_seq)
        # a non-finite weight is 0 (TRL's nan_to_num); phi * 0 == 0 tests that it is finite
        phi_pos = tl.where(phi_pos * 0.0 == 0.0, phi_pos, 0.0)
        phi_neg = tl.where(phi_neg * 0.0 == 0.0, phi_neg, 0.0)
    if LOSS_TYPE == 0:
        wscale = norm / tl.maximum(msum, 1.0)
    elif LOSS_TYPE == 2:
        wscale = norm
    else:
        wscale = 1.0
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if ROW_STATS:
        row_clip = tl.zeros([BLOCK_T], dtype=tl.float32)
        row_high = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        inb = t < T
        m = tl.load(mask_row + t * s_mt, mask=inb, other=0).to(tl.float32)
        keep = m != 0
        live = inb & (t < extent)
        lp = tl.load(logp_row + t * s_lt, mask=live, other=0.0).to(tl.float32)
        if SEQ_RATIO:
            log_ratio = tl.where(keep, seq_lr, 0.0)
            ratio = tl.exp(log_ratio)
            lratio_acc += m * log_ratio
        elif HAS_OLD:
            old = tl.load(old_row + t * s_ot, mask=live, other=0.0).to(tl.float32)
            log_ratio = tl.where(keep, lp - old, 0.0)
            ratio = tl.exp(log_ratio)
            lratio_acc += m * log_ratio
        else:
            ratio = tl.full([BLOCK_T], 1.0, tl.float32)
        if TOKEN_ADV:
            a_t = tl.where(keep, tl.load(adv_row + t * s_at, mask=live, other=0.0).to(tl.float32), 0.0)
        else:
            a_t = a
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        ra = ratio * a_t
        ca = clipped * a_t
        if SURROGATE == 6:  # GMPO: the row's objective, its gradient where the token is not clipped
            pos = (a_t + tl.zeros([BLOCK_T], dtype=tl.float32)) > 0.0  # a tensor test
            neg = (a_t + tl.zeros([BLOCK_T], dtype=tl.float32)) < 0.0
            if HAS_OLD:
                above = pos & (log_ratio > eps_high)
                below = neg & (log_ratio < -eps_low)
            else:  # every log-ratio is 0
                zero = tl.zeros([BLOCK_T], dtype=tl.float32)
                above = pos & (zero > eps_high)
                below = neg & (zero < -eps_low)
            surr = g_obj + tl.zeros([BLOCK_T], dtype=tl.float32)
            g = -tl.where((pos | neg) & ~(above | below), g_obj, 0.0)
            clip_w = tl.where(keep & (above | below), m, 0.0)
            high_w = tl.where(keep & above, m, 0.0)
        elif SURROGATE == 3:  # VESPO: the row's weight by the advantage's sign, times a logp
            nonneg = (a_t + tl.zeros([BLOCK_T], dtype=tl.float32)) >= 0.0  # a tensor test
            a_w = a_t * tl.where(nonneg, phi_pos, phi_neg)
            surr = a_w * lp
            g = -a_w
            clip_w = tl.zeros([BLOCK_T], dtype=tl.float32)  # VESPO clips nothing
            high_w = clip_w
        elif SURROGATE == 4 or SURROGATE == 5:  # DPPO: a truncated weight inside a trust region
            lpk = tl.where(keep, lp, 0.0)
            if HAS_OLD:
                qk = tl.where(keep, old, 0.0)
                rho = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))  # verl's clamp
            else:
                qk = lpk
                rho = tl.full([BLOCK_T], 1.0, tl.float32)
            p = tl.exp(lpk)
            q = tl.exp(qk)
            pos = (a_t + tl.zeros([BLOCK_T], dtype=tl.float32)) > 0.0  # a tensor test
            if SURROGATE == 4:  # total variation
                valid = tl.where(pos, p - q <= eps_high, p - q >= -eps_low)
            else:  # binary KL
                k = q * (qk - lpk) + (1.0 - q) * tl.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
                valid = tl.where(pos, (k <= eps_high) | (p <= q), (k <= eps_low) | (p >= q))
            if DUAL_CLIP:  # the weight's cap c; its truncated tokens are the "dual" metric
                weight = tl.where(valid, tl.minimum(rho, dual_c), 0.0)
                dual_acc += tl.where(keep & valid & (rho > dual_c), m, 0.0)
            else:
                weight = tl.where(valid, rho, 0.0)
            a_w = weight * a_t
            surr = a_w * lpk
            g = -a_w
            clip_w = tl.where(keep & (~valid), m, 0.0)
            high_w = tl.where(keep & (~valid) & pos, m, 0.0)
        elif SURROGATE == 1:  # CISPO: the clipped weight, detached, times a logp
            surr = ca * lp
            g = -ca
            clip_w = tl.where(keep & ((ratio < lo) | (ratio > hi)), m, 0.0)
            # a > 0 is ca > 0 (clipped > 0 wherever ratio > hi >= 0; a tensor test, see below)
            high_w = tl.where(keep & (ratio > hi) & (ca > 0.0), m, 0.0)
        elif SURROGATE == 2:  # SAPO: the soft gate (4 / tau) sigmoid(tau (ratio - 1)) a
            # The sign of a as a tensor (the interpreter cannot and a scalar bool into a block;
            # ra > 0 would miss an underflowed ratio).
            pos = (a_t + tl.zeros([BLOCK_T], dtype=tl.float32)) > 0.0
            tau = tl.where(pos, tau_pos, tau_neg)
            # e capped at the largest float and the ratio too (NaN passes through): where the gate
            # has saturated the product below is then 0 (s * s underflows, or e is 0), not
            # 0 * inf = NaN. (A select on the product instead split a load into scalar ones.)
            big = 3.4028234663852886e38
            e = tl.minimum(tl.exp(-tau * (ratio - 1.0)), big, propagate_nan=tl.PropagateNan.ALL)
            s = 1.0 / (1.0 + e)
            surr = (4.0 / tau) * s * a_t
            rho = tl.minimum(ratio, big, propagate_nan=tl.PropagateNan.ALL)
            g = -(4.0 * (e * s * s)) * (rho * a_t)  # 1 - s = e s: no cancellation as s -> 1
            clip_w = tl.zeros([BLOCK_T], dtype=tl.float32)  # SAPO clips nothing
            high_w = clip_w
        else:
            active = ra <= ca  # the unclipped term is the one min() takes (ties included)
            surr = tl.where(active, ra, ca)
            if DUAL_CLIP:
                # a < 0 is ra < 0 wherever ratio > c > 0 (a tensor test: the interpreter cannot
                # and a scalar bool into a block).
                dual = (ratio > dual_c) & (ra < 0.0)
                surr = tl.where(dual, dual_c * a_t, surr)
                g = -tl.where(active & (~dual), ra, 0.0)
                dual_acc += tl.where(keep & dual, m, 0.0)
            else:
                g = -tl.where(active, ra, 0.0)
            clip_w = tl.where(keep & (~active), m, 0.0)
            high_w = tl.where(keep & (~active) & (ra > 0.0), m, 0.0)  # A > 0 where clipped
        clip_acc += clip_w
        high_acc += high_w
        if ROW_STATS:
            row_clip += clip_w
            row_high += high_w
        if HAS_REF:
            ref = tl.load(ref_row + t * s_rt, mask=live, other=0.0).to(tl.float32)
            kl, dkl = _kl_term(lp - ref, ratio, KL_FORM)
            g += beta * dkl
            per = beta * kl - surr
            kl_acc += tl.where(keep, m * kl, 0.0)
        else:
            per = -surr
        w = m * wscale
        loss_acc += tl.where(keep, w * per, 0.0)
        if SURROGATE == 6:  # the row's geometric-mean ratio
            ratio_acc += tl.where(keep, m * g_ratio, 0.0)
        else:
            ratio_acc += tl.where(keep, m * ratio, 0.0)
        if WRITE_GRAD:
            tl.store(grad_row + t * s_gt, tl.where(keep, w * g, 0.0), mask=t < T)
    if ROW_STATS:  # two more block reductions per row, only when asked for
        tl.store(rows_ptr + r64 * 3, msum)
        tl.store(rows_ptr + r64 * 3 + 1, tl.sum(row_clip, axis=0))
        tl.store(rows_ptr + r64 * 3 + 2, tl.sum(row_high, axis=0))
    return loss_acc, kl_acc, clip_acc, ratio_acc, lratio_acc, dual_acc, high_acc, msum


@triton.jit
def _store_partials(partial_ptr, pid, loss_acc, msum, kl_acc, clip_acc, ratio_acc, lratio_acc,
                    dual_acc, high_acc, NP: tl.constexpr):
    """The program's partials: its per-lane sums reduced (once), and its mask total."""
    tl.store(partial_ptr + pid * NP + 0, tl.sum(loss_acc, axis=0))
    tl.store(partial_ptr + pid * NP + 1, msum)
    tl.store(partial_ptr + pid * NP + 2, tl.sum(kl_acc, axis=0))
    tl.store(partial_ptr + pid * NP + 3, tl.sum(clip_acc, axis=0))
    tl.store(partial_ptr + pid * NP + 4, tl.sum(ratio_acc, axis=0))
    tl.store(partial_ptr + pid * NP + 5, tl.sum(lratio_acc, axis=0))
    tl.store(partial_ptr + pid * NP + 6, tl.sum(dual_acc, axis=0))
    tl.store(partial_ptr + pid * NP + 7, tl.sum(high_acc, axis=0))


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr, grad_ptr, adv_ptr, partial_ptr, seq_ptr,
    s_lr, s_lt, s_or, s_ot, s_rr, s_rt, s_mr, s_mt, s_gr, s_gt, s_a, s_at,
    S, T, rows_per_prog, eps_low, eps_high, beta, dual_c, tau_pos, tau_neg, norm,
    vk_pos, vl_pos, vk_neg, vl_neg,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, LOSS_TYPE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, NP: tl.constexpr, KL_FORM: tl.constexpr = 0,
    DUAL_CLIP: tl.constexpr = False, TOKEN_ADV: tl.constexpr = False, SEQ_RATIO: tl.constexpr = False,
    SURROGATE: tl.constexpr = 0, rows_ptr=None, ROW_STATS: tl.constexpr = False,
):
    """Program ``pid`` streams rows ``[pid * rows_per_prog, ...)`` and writes its partials
    (advantages: one per row, or with ``TOKEN_ADV`` one per token)."""
    pid = tl.program_id(0)
    loss = tl.zeros([BLOCK_T], dtype=tl.float32)
    kl = tl.zeros([BLOCK_T], dtype=tl.float32)
    clip = tl.zeros([BLOCK_T], dtype=tl.float32)
    ratio = tl.zeros([BLOCK_T], dtype=tl.float32)
    lratio = tl.zeros([BLOCK_T], dtype=tl.float32)
    dual = tl.zeros([BLOCK_T], dtype=tl.float32)
    high = tl.zeros([BLOCK_T], dtype=tl.float32)
    msum = 0.0
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, S)
    for row in range(start, end):
        if TOKEN_ADV:  # noqa: SIM108 (a constexpr branch: the load is not compiled at all)
            a = 0.0
        else:
            a = tl.load(adv_ptr + row * s_a).to(tl.float32)
        loss, kl, clip, ratio, lratio, dual, high, r_m = _token_row(
            a, row, logp_ptr, old_ptr, ref_ptr, mask_ptr, grad_ptr, adv_ptr, seq_ptr,
            s_lr, s_lt, s_or, s_ot, s_rr, s_rt, s_mr, s_mt, s_gr, s_gt, s_a, s_at,
            T, eps_low, eps_high, beta, dual_c, tau_pos, tau_neg, norm, loss, kl, clip, ratio,
            lratio, dual, high, HAS_OLD, HAS_REF, LOSS_TYPE, WRITE_GRAD, BLOCK_T, KL_FORM,
            DUAL_CLIP, TOKEN_ADV, SEQ_RATIO, SURROGATE, rows_ptr, ROW_STATS,
            vk_pos, vl_pos, vk_neg, vl_neg,
        )
        msum += r_m
    _store_partials(partial_ptr, pid, loss, msum, kl, clip, ratio, lratio, dual, high, NP)


@triton.jit
def _finalize_kernel(partial_ptr, P, out_ptr, LOSS_TYPE: tl.constexpr, NP: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """Sum ``[P, NP]`` partials (fixed order) into ``[loss, kl, clip, ratio, post_scale,
    log_ratio, dual, high]``."""
    offs = tl.arange(0, BLOCK_P)
    loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    msum = tl.zeros([BLOCK_P], dtype=tl.float32)
    kl = tl.zeros([BLOCK_P], dtype=tl.float32)
    clip = tl.zeros([BLOCK_P], dtype=tl.float32)
    ratio = tl.zeros([BLOCK_P], dtype=tl.float32)
    lratio = tl.zeros([BLOCK_P], dtype=tl.float32)
    dual = tl.zeros([BLOCK_P], dtype=tl.float32)
    high = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + offs
        inb = p < P
        loss += tl.load(partial_ptr + p * NP + 0, mask=inb, other=0.0)
        msum += tl.load(partial_ptr + p * NP + 1, mask=inb, other=0.0)
        kl += tl.load(partial_ptr + p * NP + 2, mask=inb, other=0.0)
        clip += tl.load(partial_ptr + p * NP + 3, mask=inb, other=0.0)
        ratio += tl.load(partial_ptr + p * NP + 4, mask=inb, other=0.0)
        lratio += tl.load(partial_ptr + p * NP + 5, mask=inb, other=0.0)
        dual += tl.load(partial_ptr + p * NP + 6, mask=inb, other=0.0)
        high += tl.load(partial_ptr + p * NP + 7, mask=inb, other=0.0)
    tokens = tl.maximum(tl.sum(msum, axis=0), 1.0)
    total = tl.sum(loss, axis=0)
    if LOSS_TYPE == 1:
        post = 1.0 / tokens
        total = total / tokens
    else:
        post = 1.0
    tl.store(out_ptr + 0, total)
    tl.store(out_ptr + 1, tl.sum(kl, axis=0) / tokens)
    tl.store(out_ptr + 2, tl.sum(clip, axis=0) / tokens)
    tl.store(out_ptr + 3, tl.sum(ratio, axis=0) / tokens)
    tl.store(out_ptr + 4, post)
    tl.store(out_ptr + 5, tl.sum(lratio, axis=0) / tokens)
    tl.store(out_ptr + 6, tl.sum(dual, axis=0) / tokens)
    tl.store(out_ptr + 7, tl.sum(high, axis=0) / tokens)


def finalize(partials: torch.Tensor, loss_type: str) -> torch.Tensor:
    """``[N_STATS]`` float32 ``[loss, kl, clip_fraction, ratio_mean, post_scale,
    log_ratio_mean, dual_clip_fraction, clip_high_fraction]`` from partials."""
    stats = torch.empty(N_STATS, dtype=torch.float32, device=partials.device)
    P = partials.shape[0]
    block = min(1024, max(16, triton.next_power_of_2(P)))
    _finalize_kernel[(1,)](partials, P, stats, LOSS_TYPE=LOSS_TYPE_CODES[loss_type],
                           NP=N_PARTIALS, BLOCK_P=block, num_warps=4)
    return stats


def dual_clip_args(dual_clip: float | None) -> tuple[float, bool]:
    """The kernels' ``(dual_c, DUAL_CLIP)``; off, the dual-clip code is compiled out."""
    return (0.0, False) if dual_clip is None else (float(dual_clip), True)


def row_norm(S: int, T: int, loss_type: str, max_completion_length: int | None) -> float:
    """The constant part of the token weight applied in the kernel (see module doc)."""
    if loss_type == "grpo":
        return 1.0 / max(S, 1)
    if loss_type == "dr_grpo":
        return 1.0 / (max(S, 1) * (T if max_completion_length is None else max_completion_length))
    return 1.0


def token_args(
    logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
    mask: torch.Tensor, need_grad: bool,
) -> tuple[list, torch.Tensor]:
    """Pointer and stride arguments shared by the token kernels, and the gradient buffer."""
    S, T = logp.shape
    grad = torch.empty((S, T) if need_grad else (0, 0), dtype=grad_dtype(logp), device=logp.device)
    old = logp if old_logp is None else old_logp
    ref = logp if ref_logp is None else ref_logp
    m = mask_arg(mask)
    g_strides = grad.stride() if need_grad else (0, 0)
    args = [logp, old, ref, m, grad,
            *logp.stride(), *old.stride(), *ref.stride(), *m.stride(), *g_strides]
    return args, grad


def _policy_loss_fwd(
    logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
    advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float, beta: float,
    loss_type: str, max_completion_length: int, need_grad: bool, kl_form: int = 0,
    dual_clip: float | None = None, seq_ratio: bool = False, surrogate: str = "clip",
    tau_pos: float = 1.0, tau_neg: float = 1.05, row_stats: bool = False,
    vespo: tuple[float, ...] = VESPO_DEFAULTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launch: ``stats [N_STATS]`` float32, GSPO's per-row log-ratios (``[S]`` float32
    with ``seq_ratio``; VESPO's log weights with ``surrogate="vespo"``, GMPO's mean clipped
    log-ratios with ``"gmpo"``; else empty), the per-row
    clip weights (``[S, 3]`` float32 with ``row_stats``, else ``[0, 3]``) and the gradient
    (``[S, T]``, or empty)."""
    S, T = logp.shape
    max_len = None if max_completion_length <= 0 else max_completion_length
    args, grad = token_args(logp, old_logp, ref_logp, mask, need_grad)
    rows_per_prog = max(1, min(64, S // (4 * sm_count(logp.device))))
    P = triton.cdiv(S, rows_per_prog) if S else 0
    launch = bool(P and T)
    # Every program writes its partials: no fill needed unless nothing is launched.
    partials = (torch.empty if launch else torch.zeros)(
        max(P, 1), N_PARTIALS, dtype=torch.float32, device=logp.device)
    block_t, warps = token_block(T, logp.element_size())
    dual_c, has_dual = dual_clip_args(dual_clip)
    token_adv = advantages.dim() == 2
    seq = sequence_buffer(S, seq_ratio or surrogate in ROW_SURROGATES, logp.device)
    # Written row by row by the kernel (zeros: rows of an empty launch stay 0).
    rows = torch.zeros(S if row_stats else 0, 3, dtype=torch.float32, device=logp.device)
    if launch:
        _policy_loss_fwd_kernel[(P,)](
            *args[:5], advantages, partials, seq, *args[5:], advantages.stride(0),
            advantages.stride(1) if token_adv else 0,
            S, T, rows_per_prog, eps_low, eps_high, beta, dual_c, tau_pos, tau_neg,
            row_norm(S, T, loss_type, max_len), *vespo,
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None,
            LOSS_TYPE=LOSS_TYPE_CODES[loss_type], WRITE_GRAD=need_grad, BLOCK_T=block_t,
            NP=N_PARTIALS, KL_FORM=kl_form, DUAL_CLIP=has_dual, TOKEN_ADV=token_adv,
            SEQ_RATIO=seq_ratio and old_logp is not None,
            SURROGATE=SURROGATE_CODES[surrogate], rows_ptr=rows if row_stats else None,
            ROW_STATS=row_stats, num_warps=warps,
        )
    return finalize(partials, loss_type), seq, rows, grad


def sequence_buffer(S: int, seq_ratio: bool, device: torch.device) -> torch.Tensor:
    """GSPO's per-row log-ratios (or VESPO's log weights), written by the kernel (zeros: a row
    without old_logp, or a launch without tokens, leaves 0); empty when neither is asked for."""
    return torch.zeros(S if seq_ratio else 0, dtype=torch.float32, device=device)


@torch.library.custom_op("iama_triton::policy_loss", mutates_args=())
def _policy_loss_op(
    logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
    advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float, beta: float,
    loss_type: str, max_completion_length: int, need_grad: bool, kl_form: int = 0,
    dual_clip: float | None = None, seq_ratio: bool = False, surrogate: str = "clip",
    tau_pos: float = 1.0, tau_neg: float = 1.05, row_stats: bool = False,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with launch_device(logp.device):
        return _policy_loss_fwd(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high,
                                beta, loss_type, max_completion_length, need_grad, kl_form,
                                dual_clip, seq_ratio, surrogate, tau_pos, tau_neg, row_stats,
                                (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))


@_policy_loss_op.register_fake
def _(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, loss_type,
      max_completion_length, need_grad, kl_form=0, dual_clip=None, seq_ratio=False,
      surrogate="clip", tau_pos=1.0, tau_neg=1.05, row_stats=False, vespo_k_pos=2.0,
      vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    shape = tuple(logp.shape) if need_grad else (0, 0)
    per_row = seq_ratio or surrogate in ROW_SURROGATES
    return (logp.new_empty(N_STATS, dtype=torch.float32),
            logp.new_empty(logp.shape[0] if per_row else 0, dtype=torch.float32),
            logp.new_empty((logp.shape[0] if row_stats else 0, 3), dtype=torch.float32),
            logp.new_empty(shape, dtype=grad_dtype(logp)))


def backward_logp(grad: torch.Tensor, stats: torch.Tensor, grad_stats: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """``d loss / d logp`` times ``grad_output``: the saved gradient times one scalar."""
    return (grad * (grad_stats[0] * stats[4])).to(dtype)


def _setup_context(ctx, inputs, output):
    stats, _, _, grad = output
    # Only the loss carries a gradient: without this, autograd would allocate and fill a zero
    # [S, T] gradient for the `grad` output on every backward (a full extra write of it).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad, stats)
    ctx.logp_dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_stats, grad_seq, grad_rows, grad_grad):
    grad, stats = ctx.saved_tensors
    d_logp = None if grad_stats is None else backward_logp(grad, stats, grad_stats, ctx.logp_dtype)
    return (d_logp,) + (None,) * (ctx.n_inputs - 1)


_policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


def needs_grad(logp: torch.Tensor) -> bool:
    return logp.requires_grad and torch.is_grad_enabled()


def policy_loss_triton(
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
    """Triton :func:`iama_kernels.policy_loss`; arguments already validated. float32 outputs."""
    stats, seq, rows, _ = _policy_loss_op(
        logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, loss_type,
        0 if max_completion_length is None else int(max_completion_length), needs_grad(logp),
        kl_form(kl_estimator, kl_weight), dual_clip, ratio_level == "sequence", surrogate, tau_pos, tau_neg,
        row_stats, *vespo,
    )
    metrics = stats.detach()
    per_row = ratio_level == "sequence" or surrogate in ROW_SURROGATES
    return PolicyLossOutput(stats[0], metrics[1], metrics[2], metrics[3], metrics[5], metrics[6],
                            metrics[7], seq.detach() if per_row else None,
                            rows.detach() if row_stats else None)

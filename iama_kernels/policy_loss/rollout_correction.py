"""Public function ``rollout_correction``: the train/rollout correction's token weights.

A trainer that samples with one engine (vLLM, SGLang) and trains with another sees two
log-probs per token: the rollout engine's ``rollout_logp`` and the trainer's own ``old_logp`` of
the same policy. Their ratio ``exp(old - rollout)`` reweights (truncated importance sampling)
or filters (rejection) the tokens of the policy loss; OpenRLHF's ``is_correction_*`` options and
verl's rollout correction are of this kind. This op computes, from the two log-probs and the
mask, each token's weight in the loss (the coefficient times the mask) and the correction's
metrics in one read of the three tensors (two for sequence-level units, the second while the row
is in cache): in C++ on the CPU, in Triton on CUDA; the reference is float64 PyTorch. The
weights go to :func:`iama_kernels.policy_loss` as its ``mask``.
"""

from __future__ import annotations

import torch

from .. import _cpu_backend as _cb
from .. import _triton_backend as _tb
from .._checks import check_choice, check_float, check_like_logp, check_real, check_tensor
from .._dispatch import Backend, Call, choose, reference_check
from .._types import RolloutCorrectionOutput
from .api import row_span

LEVELS = ("token", "sequence")
GATES = ("ratio", "tv", "binary_kl")
MODES = ("mask", "clip")
PROB_BOUND = 1e-6  # the probabilities of the TV and binary-KL gates are clamped to [1e-6, 1 - 1e-6]

_ROW_FIELDS = 4  # each row's sum of m d, sum of m, dropped share, statistic


def _gate_statistic(gate: str, old: torch.Tensor, rollout: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    if gate == "ratio":
        return ratio
    p = rollout.exp().clamp(PROB_BOUND, 1 - PROB_BOUND)
    q = old.exp().clamp(PROB_BOUND, 1 - PROB_BOUND)
    if gate == "tv":
        return (p - q).abs()
    np_ = (-torch.expm1(rollout)).clamp(PROB_BOUND, 1 - PROB_BOUND)
    nq = (-torch.expm1(old)).clamp(PROB_BOUND, 1 - PROB_BOUND)
    kl = p * torch.log(p / q) + np_ * torch.log(np_ / nq)
    return torch.where(kl < 0, 0.0, kl)  # (see rollout_correction's doc: held at >= 0)


def _rollout_correction_ref(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                            sequence: bool, gate: str, clip: bool, low: float, high: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(weights [S, T], rows [S, 4])``: the tokens with a zero mask selected out first."""
    keep = mask != 0
    m = torch.where(keep, mask.double(), 0.0)
    old = torch.where(keep, old_logp.double(), 0.0)
    rollout = torch.where(keep, rollout_logp.double(), 0.0)
    d = old - rollout
    ratio = d.exp()
    rows = torch.zeros(old.shape[0], _ROW_FIELDS, dtype=torch.float64, device=old.device)
    rows[:, 0] = (d * m).sum(-1)
    rows[:, 1] = m.sum(-1)
    if sequence:
        if gate == "ratio":
            stat = (rows[:, 0] / rows[:, 1]).exp()
        else:
            token_stat = torch.where(keep, _gate_statistic(gate, old, rollout, ratio) * m, 0.0)
            stat = token_stat.sum(-1) / rows[:, 1]
        kept = (stat >= low) & (stat <= high)  # (an empty row's 0 / 0 drops it)
        weights = torch.where(keep & kept[:, None], ratio * m, 0.0)
        rows[:, 2] = (~kept).double()
        rows[:, 3] = stat
        return weights, rows
    stat = _gate_statistic(gate, old, rollout, ratio)
    if clip:
        dropped = (stat < low) | (stat > high)  # (a NaN ratio is neither, and stays NaN)
        coef = ratio.clamp(min=low, max=high)
    else:
        dropped = ~((stat >= low) & (stat <= high))
        coef = torch.where(dropped, 0.0, ratio)
    weights = torch.where(keep, coef * m, 0.0)
    rows[:, 2] = torch.where(keep & dropped, m, 0.0).sum(-1)
    return weights, rows


def _rollout_correction_cpu(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                            sequence: bool, gate: str, clip: bool, low: float, high: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.iama.rollout_correction(old_logp, rollout_logp, mask, sequence, gate, clip, low, high)


_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, _rollout_correction_cpu, _cb.cpu_announce),
    Backend("triton", _tb.check_triton, _tb.rollout_correction_triton, _tb.announce_triton),
    Backend("reference", reference_check, _rollout_correction_ref),
]


def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    gate: str = "ratio",
    mode: str = "mask",
    threshold: tuple[float, float] | list[float] = (0.5, 5.0),
    impl: str = "auto",
) -> RolloutCorrectionOutput:
    """The train/rollout correction: each token's weight in the loss, and its metrics.

    With ``d = old_logp - rollout_logp`` (the log importance ratio of the trainer's policy over the
    rollout engine's, per token) and ``m`` the mask's value, a *unit* (a token, or a whole row with
    ``level="sequence"``) has a statistic: with ``gate="ratio"`` the token's ratio ``e^d`` (a row:
    ``exp`` of its mask-weighted mean ``d``); with ``"tv"`` the sampled token's probability gap
    ``|p - q|``, with ``"binary_kl"`` its binary KL ``p log(p/q) + (1-p) log((1-p)/(1-q))``
    (``p = e^rollout``, ``q = e^old``, both clamped to ``[1e-6, 1 - 1e-6]``, and ``1 - p`` as
    ``-expm1(rollout)``, ``1 - q`` likewise, clamped alike: the clamp's own bound ``1 - 1e-6`` is
    not a float32, and ``1 - p`` of a clamped float32 ``p`` is ``1.0133e-6``, which puts the KL of a
    token whose other probability is not clamped about ``1e-5`` off; a row: their mask-weighted
    mean). The binary KL is held at ``>= 0``: it is non-negative, but in float32 the rounding of its
    two terms leaves it below 0 for about one token in ten at a log-prob mismatch of ``1e-3`` (four
    in ten at ``1e-4``), which a lower bound of 0 (OpenRLHF's default for the divergence gates)
    would drop: the tokens on which the two policies agree best. ``mode="mask"`` keeps the units
    whose statistic lies in ``[low, high]`` (a NaN statistic, an empty row's included, drops its
    unit) and gives their tokens the weight ``e^d``, the others 0 (rejection plus importance
    weights: OpenRLHF's ``is_correction_mode="mask"``); ``mode="clip"`` (token level, ratio gate)
    gives every token ``clamp(e^d, low, high)`` (truncated importance sampling, two-sided). A
    token's weight is that coefficient times ``m``.

    Args:
        old_logp: ``[S, T]`` the trainer's log-probs of the sampled tokens (float16/bfloat16/
            float32/float64); read detached.
        rollout_logp: ``[S, T]`` the rollout engine's (any floating dtype; with another dtype
            than ``old_logp`` both are read in the compute dtype).
        mask: ``[S, T]`` bool, integer or floating token weights (a token counts where it is not
            0; the others are not read, so NaN padding is fine, and weigh 0).
        level: ``"token"`` or ``"sequence"``.
        gate: ``"ratio"``, ``"tv"`` or ``"binary_kl"``.
        mode: ``"mask"`` or ``"clip"`` (``"clip"`` needs ``level="token"`` and ``gate="ratio"``).
        threshold: ``(low, high)``, ``low <= high`` (OpenRLHF's ``is_correction_threshold``; for
            the divergence gates only ``high`` bites when ``low <= 0``).
        impl: ``"auto"``, ``"cpu"`` (C++: one pass, AVX-512 where the CPU has it), ``"triton"``
            (CUDA tensors; no float64) or ``"reference"`` (float64 PyTorch; what ``auto`` runs
            where neither does).

    Returns:
        :class:`RolloutCorrectionOutput`: ``weights`` ``[S, T]`` (float32; float64 for float64
        inputs), ``log_ratio_mean`` (mask-weighted mean of ``d``: minus OpenRLHF's ``vllm_kl``),
        ``filtered_fraction`` (token level: the mask-weighted share of tokens dropped, or in clip
        mode clipped; sequence level: the share of rows dropped), ``mask_sums`` ``[S]`` (each
        row's mask total) and ``row_statistic`` (``[S]`` at sequence level, else ``None``). The
        two means are 0 where there is nothing to average; in the weights' dtype.
    """
    old_logp = check_float("old_logp", old_logp).detach()  # (every backend reads them detached)
    if old_logp.dim() != 2:
        raise ValueError(f"old_logp must have shape [S, T], got {tuple(old_logp.shape)}")
    rollout_logp = check_float("rollout_logp", rollout_logp).detach()
    mask = check_tensor("mask", mask)
    check_like_logp(old_logp, like="old_logp", rollout_logp=rollout_logp, mask=mask)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    check_choice("level", level, LEVELS)
    check_choice("gate", gate, GATES)
    check_choice("mode", mode, MODES)
    if mode == "clip" and (level != "token" or gate != "ratio"):
        raise ValueError(
            f"mode='clip' needs level='token' and gate='ratio', got level={level!r}, gate={gate!r}"
        )
    if not isinstance(threshold, tuple | list) or len(threshold) != 2:
        raise TypeError(f"threshold must be a pair (low, high), got {threshold!r}")
    low = check_real("threshold[0]", threshold[0])
    high = check_real("threshold[1]", threshold[1])
    if not low <= high:
        raise ValueError(f"threshold must have low <= high, got {tuple(threshold)!r}")
    dtype = torch.float64 if torch.float64 in (old_logp.dtype, rollout_logp.dtype) else torch.float32
    call = Call(
        "rollout_correction",
        old_logp.device,
        impl != "auto",
        {"dtype": dtype, "row_span": row_span(old_logp, rollout_logp, mask)},
    )
    backend = choose("rollout_correction", impl, _BACKENDS, call)
    sequence = level == "sequence"
    weights, rows = backend.run(old_logp, rollout_logp, mask, sequence, gate, mode == "clip", low, high)
    return _output(weights.to(dtype), rows, sequence, dtype)


def _output(weights: torch.Tensor, rows: torch.Tensor, sequence: bool, dtype: torch.dtype
            ) -> RolloutCorrectionOutput:
    totals = rows.sum(0, dtype=torch.float64)  # (zeros for S = 0)
    mass = totals[1]
    log_ratio_mean = torch.where(mass != 0, totals[0] / mass, 0.0)
    if sequence:
        filtered = totals[2] / max(rows.shape[0], 1)
    else:
        filtered = torch.where(mass != 0, totals[2] / mass, 0.0)
    statistic = rows[:, 3].to(dtype) if sequence else None
    return RolloutCorrectionOutput(weights, log_ratio_mean.to(dtype), filtered.to(dtype),
                                   rows[:, 1].to(dtype), statistic)

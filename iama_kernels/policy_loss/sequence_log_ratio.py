"""Public function ``sequence_log_ratio``: each sequence's sum (or mean) of token log-ratios.

The pre-pass of sequence-level importance weights that a trainer computes next to the loss:
TRL's VESPO weight sums each sequence's clamped token log-ratios, GSPO's ratio is the exp of
their mean. The C++ backend (CPU tensors) and the Triton one (CUDA tensors) read ``logp``,
``old_logp`` and ``mask`` once (no ``[S, T]`` temporaries); the reference is the same in float64
PyTorch.
"""

from __future__ import annotations

import torch

from .. import _cpu_backend as _cb
from .. import _triton_backend as _tb
from .._checks import check_choice, check_float, check_like_logp, check_real, check_tensor
from .._dispatch import Backend, Call, choose, reference_check
from .api import row_span

REDUCTIONS = ("sum", "mean")


def _sequence_log_ratio_ref(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                            low: float | None, high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(sums [S], support [S])``: the masked tokens selected out before the sum."""
    d = logp.detach().double() - old_logp.double()
    if low is not None or high is not None:
        d = d.clamp(min=low, max=high)
    keep = mask != 0
    return torch.where(keep, d, 0.0).sum(-1), keep.sum(-1).double()


def _sequence_log_ratio_cpu(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                            low: float | None, high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.iama.sequence_log_ratio(logp.detach(), old_logp.detach(), mask, low, high)


_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, _sequence_log_ratio_cpu, _cb.cpu_announce),
    Backend("triton", _tb.check_triton, _tb.sequence_log_ratio_triton, _tb.announce_triton),
    Backend("reference", reference_check, _sequence_log_ratio_ref),
]


def sequence_log_ratio(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduce: str = "sum",
    clamp: tuple[float | None, float | None] | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Each row's sum (or mean) of ``logp - old_logp`` over its tokens with a non-zero mask.

    Args:
        logp: ``[S, T]`` log-probs (float16/bfloat16/float32/float64); read detached, the result
            has no gradient.
        old_logp: ``[S, T]`` log-probs to compare with (any floating dtype; with another dtype
            than ``logp`` both are read in the compute dtype).
        mask: ``[S, T]`` bool, integer or floating: a token counts where it is not 0, whatever
            its weight; the other tokens are not read (NaN padding is fine).
        reduce: ``"sum"`` or ``"mean"`` (over the row's support; 0 for an empty row: GSPO's
            log sequence ratio, :func:`policy_loss`'s ``sequence_log_ratio``).
        clamp: ``None`` or ``(low, high)``, either ``None``: each token's difference is clamped
            before the reduction (TRL's VESPO clamps at ``(-20, 20)``).
        impl: ``"auto"``, ``"cpu"`` (C++, one pass), ``"triton"`` (one pass, CUDA tensors; float32
            sums, no float64 ``logp``) or ``"reference"`` (float64 PyTorch; what ``auto`` runs
            where neither does).

    Returns:
        ``[S]`` in float32 (float64 for float64 ``logp``). A NaN difference at a counted token
        makes its row NaN.
    """
    logp = check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [S, T], got {tuple(logp.shape)}")
    old_logp = check_float("old_logp", old_logp)
    mask = check_tensor("mask", mask)
    check_like_logp(logp, old_logp=old_logp, mask=mask)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    check_choice("reduce", reduce, REDUCTIONS)
    low = high = None
    if clamp is not None:
        if not isinstance(clamp, tuple | list) or len(clamp) != 2:
            raise TypeError(f"clamp must be None or a pair (low, high), got {clamp!r}")
        low = check_real("clamp[0]", clamp[0], optional=True)
        high = check_real("clamp[1]", clamp[1], optional=True)
        if low is not None and high is not None and low > high:
            raise ValueError(f"clamp must have low <= high, got {clamp!r}")
    call = Call("sequence_log_ratio", logp.device, impl != "auto",
                {"dtype": logp.dtype, "row_span": row_span(logp, old_logp, mask)})
    backend = choose("sequence_log_ratio", impl, _BACKENDS, call)
    sums, support = backend.run(logp, old_logp, mask, low, high)
    out = sums if reduce == "sum" else torch.where(support > 0, sums / support.clamp(min=1), 0.0)
    return out.to(torch.float64 if logp.dtype == torch.float64 else torch.float32)

"""Public functions ``covariance_top_k`` and ``covariance_band``: the token selections of KL-Cov
and Clip-Cov (Cui et al., 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models").

Both rank each response token by its centred advantage times its centred log-prob,
``cov_t = (A_t - mean A) (logp_t - mean logp)``, the means over the tokens with a non-zero mask
(the covariance between a token's advantage and its log-prob, which drives the policy's entropy
change). KL-Cov puts its KL penalty on the ``k`` tokens with the largest ``cov_t``; Clip-Cov takes
a random share of the tokens whose ``cov_t`` lies in a band (and on which PPO's clip does not act)
out of the loss. verl's ``"kl_cov"`` and ``"clip_cov"`` losses compute these selections on
``[S, T]`` temporaries and gathers of the response tokens; the C++ backend reads ``advantages``,
``logp`` and ``mask`` twice (the means, then the selection) and writes only the indices; the Triton
backend (CUDA) reads them twice too and writes one key or flag per token for ``torch.topk`` or
``torch.nonzero`` (``covariance_triton.py``).
"""

from __future__ import annotations

import numbers

import torch

from .. import _cpu_backend as _cb
from .. import _triton_backend as _tb
from .._checks import check_float, check_like_logp, check_real, check_tensor
from .._dispatch import Backend, Call, choose, reference_check
from .api import row_span

# The Triton backend packs a flat index into 32 bits of a 64-bit key (covariance_triton.py).
TRITON_MAX_TOKENS = 2**32 - 1


def _keep_and_inputs(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mask != 0, advantages.detach().double(), logp.detach().double()


def _top_k_ref(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """float64: the means over the gathered response tokens, then a stable descending sort (NaN
    first, ties by index: the C++ backend's order)."""
    keep, a, lp = _keep_and_inputs(advantages, logp, mask)
    flat = keep.reshape(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return flat
    a, lp = a.reshape(-1)[flat], lp.reshape(-1)[flat]
    cov = (a - a.mean()) * (lp - lp.mean())
    order = torch.sort(cov, descending=True, stable=True).indices
    return flat[order[:k]]


def _band_ref(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, low: float, high: float,
              old_logp: torch.Tensor | None, eps_low: float, eps_high: float) -> torch.Tensor:
    """float64: verl's masked means (the count + 1e-8), the band, PPO's clip test."""
    keep, a, lp = _keep_and_inputs(advantages, logp, mask)
    denominator = keep.sum().double() + 1e-8
    mean_a = torch.where(keep, a, 0.0).sum() / denominator
    mean_lp = torch.where(keep, lp, 0.0).sum() / denominator
    cov = (a - mean_a) * (lp - mean_lp)
    chosen = keep & (cov > low) & (cov < high)
    if old_logp is not None:
        rho = torch.exp(lp - old_logp.detach().double())
        chosen &= ~(-a * rho.clamp(1 - eps_low, 1 + eps_high) > -a * rho)
    return chosen.reshape(-1).nonzero().squeeze(1)


def _top_k_cpu(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    return torch.ops.iama.covariance_top_k(advantages.detach(), logp.detach(), mask, k)


def _band_cpu(advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, low: float, high: float,
              old_logp: torch.Tensor | None, eps_low: float, eps_high: float) -> torch.Tensor:
    old = None if old_logp is None else old_logp.detach()
    return torch.ops.iama.covariance_band(advantages.detach(), logp.detach(), mask, low, high, old,
                                          eps_low, eps_high)


def _triton_check(call: Call) -> str | None:
    if call.details["tokens"] >= TRITON_MAX_TOKENS:
        return (f"S * T = {call.details['tokens']} tokens: the kernels index them in 32 bits "
                f"(at most {TRITON_MAX_TOKENS - 1}); use impl='reference'")
    return _tb.check_triton(call)


_TOP_K_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, _top_k_cpu, _cb.cpu_announce),
    Backend("triton", _triton_check, _tb.covariance_top_k_triton, _tb.announce_triton),
    Backend("reference", reference_check, _top_k_ref),
]
_BAND_BACKENDS: list[Backend] = [
    Backend("cpu", _cb.cpu_check, _band_cpu, _cb.cpu_announce),
    Backend("triton", _triton_check, _tb.covariance_band_triton, _tb.announce_triton),
    Backend("reference", reference_check, _band_ref),
]


def _call(op: str, advantages: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor,
          old_logp: torch.Tensor | None, impl: str) -> Call:
    # a float64 input makes the C++ backend compute in float64; the Triton one refuses it
    dtype = torch.float64 if torch.float64 in (logp.dtype, advantages.dtype) else logp.dtype
    return Call(op, logp.device, impl != "auto",
                {"dtype": dtype, "row_span": row_span(advantages, logp, mask, old_logp),
                 "tokens": logp.numel()})


def _check_inputs(advantages: object, logp: object, mask: object, old_logp: object = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    logp = check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [S, T], got {tuple(logp.shape)}")
    advantages = check_float("advantages", advantages)
    mask = check_tensor("mask", mask)
    old = None if old_logp is None else check_float("old_logp", old_logp)
    check_like_logp(logp, advantages=advantages, mask=mask, old_logp=old)
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    return advantages, logp, mask, old


def covariance_top_k(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """The ``k`` response tokens with the largest ``(A_t - mean A) (logp_t - mean logp)``:
    KL-Cov's tokens (verl's ``"kl_cov"`` puts ``ppo_kl_coef |logp - old_logp|`` on
    ``max(1, int(kl_cov_ratio n))`` of them).

    Args:
        advantages: ``[S, T]`` per-token advantages (any floating dtype).
        logp: ``[S, T]`` log-probs (float16/bfloat16/float32/float64); read detached.
        mask: ``[S, T]`` bool, integer or floating: the response tokens are those where it is not
            0 (their number is ``n``; the means are unweighted, over them); the other tokens are
            never read (NaN padding is fine).
        k: how many to pick, ``>= 1``; ``min(k, n)`` are returned.
        impl: ``"auto"``, ``"cpu"`` (C++: two reads of the inputs, the means in float64, the
            products in float32, or float64 for float64 inputs), ``"triton"`` (CUDA: the C++
            backend's arithmetic and order; no float64) or ``"reference"`` (float64 PyTorch;
            what ``auto`` runs where neither applies).

    Returns:
        ``[min(k, n)]`` int64 flat indices into the row-major ``[S, T]`` (``row = i // T``,
        ``col = i % T``), the largest product first; NaN products rank first (as
        ``torch.topk``), equal ones by index. Backends agree except where two products are within
        rounding of each other at the cut.
    """
    advantages, logp, mask, _ = _check_inputs(advantages, logp, mask)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    call = _call("covariance_top_k", advantages, logp, mask, None, impl)
    return choose("covariance_top_k", impl, _TOP_K_BACKENDS, call).run(advantages, logp, mask, int(k))


def covariance_band(
    advantages: torch.Tensor,
    logp: torch.Tensor,
    mask: torch.Tensor,
    low: float,
    high: float,
    *,
    old_logp: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    impl: str = "auto",
) -> torch.Tensor:
    """The response tokens whose ``(A_t - mean A) (logp_t - mean logp)`` lies strictly between
    ``low`` and ``high``: Clip-Cov's candidates (verl's ``"clip_cov"`` draws
    ``max(1, int(clip_cov_ratio n))`` of them at random, with ``low, high = clip_cov_lb,
    clip_cov_ub``, and takes them out of the loss).

    Args:
        advantages, logp, mask: as :func:`covariance_top_k`. The means are verl's masked means
            (the sum over the response tokens over their count plus 1e-8).
        low, high: the open band, ``low <= high``.
        old_logp: ``None``, or ``[S, T]`` log-probs of the rollout policy: then the tokens on
            which PPO's clip acts are left out, those where ``-A clamp(rho, 1 - eps_low,
            1 + eps_high) > -A rho`` with ``rho = exp(logp - old_logp)`` (verl's test).
        eps_low, eps_high: PPO's clip range (read with ``old_logp`` only).
        impl: ``"auto"``, ``"cpu"`` (C++; the exponential only for the tokens inside the band),
            ``"triton"`` (CUDA; no float64) or ``"reference"`` (float64 PyTorch; what ``auto``
            runs where neither applies).

    Returns:
        ``[c]`` int64 flat indices into the row-major ``[S, T]``, in increasing order (the order
        of ``torch.nonzero``, so that a ``torch.randperm`` draw over them picks what verl's picks).
        Backends agree except for a product within rounding of ``low`` or ``high``, or a ratio
        within rounding of a clip bound.
    """
    advantages, logp, mask, old_logp = _check_inputs(advantages, logp, mask, old_logp)
    low, high = check_real("low", low), check_real("high", high)
    if low > high:
        raise ValueError(f"low must be <= high, got {low} and {high}")
    eps_low, eps_high = check_real("eps_low", eps_low), check_real("eps_high", eps_high)
    call = _call("covariance_band", advantages, logp, mask, old_logp, impl)
    backend = choose("covariance_band", impl, _BAND_BACKENDS, call)
    return backend.run(advantages, logp, mask, low, high, old_logp, eps_low, eps_high)

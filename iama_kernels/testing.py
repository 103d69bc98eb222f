"""Oracles and tolerance helpers shared by the tests and the benchmarks.

Tolerances follow one rule: a backend's error against the float64 reference must stay within a
small multiple of the error that the same-dtype reference itself makes (plus a floor for outputs
that are exactly representable), so that a tolerance never has to be guessed.
"""

from __future__ import annotations

import torch


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max(max |b|, tiny)``: relative to the scale of the oracle."""
    if not a.numel():
        return 0.0
    scale = max(float(b.double().abs().max()), torch.finfo(torch.float64).tiny)
    return max_abs_error(a, b) / scale


def assert_matches_reference(
    out: torch.Tensor,
    oracle64: torch.Tensor,
    same_dtype_ref: torch.Tensor | None = None,
    *,
    factor: float = 4.0,
    rel: float | None = None,
    atol: float = 0.0,
    name: str = "output",
) -> None:
    """Check a backend's output against the float64 oracle.

    Passes when ``|out - oracle64| <= factor * |same_dtype_ref - oracle64| + atol`` (max over
    elements) or, when ``rel`` is given, when the relative error is ``<= rel``. Shapes must match
    exactly and the output must be finite wherever the oracle is.
    """
    if out.shape != oracle64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != oracle {tuple(oracle64.shape)}")
    finite = torch.isfinite(oracle64)
    if not bool(torch.isfinite(out.double())[finite].all()):
        raise AssertionError(f"{name}: non-finite values where the oracle is finite")
    err = max_abs_error(out, oracle64)
    bounds = []
    if same_dtype_ref is not None:
        bounds.append(factor * max_abs_error(same_dtype_ref, oracle64) + atol)
    if rel is not None:
        scale = max(float(oracle64.double().abs().max()), torch.finfo(torch.float64).tiny)
        bounds.append(rel * scale + atol)
    if not bounds:
        bounds.append(atol)
    if err > max(bounds):
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds the tolerance {max(bounds):.3e} "
            f"(oracle scale {float(oracle64.double().abs().max()):.3e})"
        )

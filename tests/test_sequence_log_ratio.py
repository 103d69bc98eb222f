"""sequence_log_ratio: each row's (clamped) log-ratio sum or mean, C++ and reference against a
float64 loop over the tokens, on odd sizes, every dtype and mask kind, strided rows, NaN padding
and empty rows; its mean is policy_loss's GSPO sequence_log_ratio. (The Triton kernel against the
reference: tests/test_triton.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from iama_kernels import policy_loss, sequence_log_ratio


def _loops(logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, reduce: str,
           low: float | None, high: float | None) -> torch.Tensor:
    """float64 oracle, token by token."""
    out = []
    for i in range(logp.shape[0]):
        total, count = 0.0, 0
        for t in range(logp.shape[1]):
            if float(mask[i, t]) != 0:
                d = float(logp[i, t].double()) - float(old[i, t].double())
                d = d if low is None else max(low, d)
                d = d if high is None else min(high, d)
                total, count = total + d, count + 1
        out.append(total if reduce == "sum" else (total / count if count else 0.0))
    return torch.tensor(out, dtype=torch.float64)


def _inputs(S: int, T: int, dtype: torch.dtype, mask_kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(S, T, generator=g, dtype=torch.float64) * torch.linspace(0.01, 12, S)[:, None]
    keep = torch.rand(S, T, generator=g) < 0.8
    keep[1] = False  # an empty row
    masks = {"bool": keep, "uint8": keep.to(torch.uint8), "int64": keep.long() * 3, "int32": keep.int(),
             "float": keep.float() * 0.5, "float64": keep.double()}
    # NaN padding: never read
    return (torch.where(keep, logp, torch.nan).to(dtype), old.to(dtype), masks[mask_kind])


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "uint8", "int64", "int32", "float", "float64"])
def test_matches_the_loops(cpu_ext, impl: str, dtype: torch.dtype, mask_kind: str) -> None:
    S, T = 7, 133  # two full 64-token tiles and a tail
    logp, old, mask = _inputs(S, T, dtype, mask_kind)
    for reduce in ("sum", "mean"):
        for low, high in ((None, None), (-20.0, 20.0), (-1.0, None), (None, 0.5), (0.1, 0.1)):
            clamp = None if low is None and high is None else (low, high)
            got = sequence_log_ratio(logp, old, mask, reduce=reduce, clamp=clamp, impl=impl)
            want = _loops(logp, old, mask, reduce, low, high)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert got.shape == (S,) and bool(torch.isfinite(got).all())
            assert float(got[1]) == 0.0  # the empty row
            # float32 sums of up to 133 terms of size <= ~30: a few ulp of the row's magnitude
            scale = float(torch.where(mask != 0, (logp.double() - old.double()).abs(), 0.0).sum(-1).max())
            tol = 1e-12 * scale if dtype == torch.float64 else 2e-6 * scale
            torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    assert float(_loops(logp, old, mask, "sum", -1.0, None).sub(_loops(logp, old, mask, "sum", None, None))
                 .abs().max()) > 1  # the clamp acted


def test_strided_rows_and_mixed_dtypes(cpu_ext) -> None:
    logp, old, mask = _inputs(5, 70, torch.float32, "bool", seed=1)
    want = sequence_log_ratio(logp, old, mask, clamp=(-20.0, 20.0), impl="reference")
    wide = torch.full((5, 140), torch.nan)
    wide[:, ::2] = logp  # row elements 2 apart: copied once by the glue
    for lp, o, m in ((wide[:, ::2], old, mask), (logp, old.double(), mask),
                     (logp.t().contiguous().t(), old, mask), (logp[:, :70], old, mask.t().contiguous().t())):
        got = sequence_log_ratio(lp, o, m, clamp=(-20.0, 20.0), impl="cpu")
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-5)


def test_mean_is_policy_losss_sequence_ratio(cpu_ext) -> None:
    logp, old, mask = _inputs(6, 90, torch.float32, "bool", seed=2)
    adv = torch.randn(6)
    for impl in ("cpu", "reference"):
        seq = policy_loss(logp, old, None, adv, mask, ratio_level="sequence", impl=impl).sequence_log_ratio
        got = sequence_log_ratio(logp, old, mask, reduce="mean", impl=impl)
        torch.testing.assert_close(got, seq, rtol=1e-6, atol=1e-6)


def test_edge_sizes_and_nan(cpu_ext) -> None:
    for S, T in ((0, 5), (3, 0), (1, 1)):
        logp, old = -torch.rand(S, T), -torch.rand(S, T)
        mask = torch.ones(S, T, dtype=torch.bool)
        for impl in ("cpu", "reference"):
            got = sequence_log_ratio(logp, old, mask, impl=impl)
            want = (logp.double() - old.double()).sum(-1)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    logp, old = torch.zeros(2, 3), torch.zeros(2, 3)
    logp[0, 1] = math.nan  # under the mask: the row is NaN, even clamped
    for impl in ("cpu", "reference"):
        got = sequence_log_ratio(logp, old, torch.ones(2, 3), clamp=(-1.0, 1.0), impl=impl)
        assert math.isnan(float(got[0])) and float(got[1]) == 0.0


def test_bad_arguments_are_named(cpu_ext) -> None:
    logp, old, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    for kwargs, error, message in (
        ({"reduce": "max"}, ValueError, "reduce"),
        ({"clamp": (1.0, -1.0)}, ValueError, "low <= high"),
        ({"clamp": (math.nan, 1.0)}, ValueError, r"clamp\[0\] must not be NaN"),
        ({"clamp": 3.0}, TypeError, "clamp must be None or a pair"),
        ({"clamp": ("a", 1.0)}, TypeError, r"clamp\[0\] must be a float"),
    ):
        with pytest.raises(error, match=message):
            sequence_log_ratio(logp, old, mask, **kwargs)
    with pytest.raises(ValueError, match="old_logp must have the shape of logp"):
        sequence_log_ratio(logp, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match=r"logp must have shape \[S, T\]"):
        sequence_log_ratio(torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(TypeError, match="old_logp must have a floating dtype"):
        sequence_log_ratio(logp, torch.zeros(2, 3, dtype=torch.long), mask)
    with pytest.raises(TypeError, match="mask must be"):
        sequence_log_ratio(logp, old, torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="impl='cuda' is not implemented"):
        sequence_log_ratio(logp, old, mask, impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' cannot run sequence_log_ratio"):
        sequence_log_ratio(logp.double(), old.double(), mask, impl="triton")

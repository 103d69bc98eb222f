"""rollout_correction (the train/rollout correction's token weights and metrics): the C++ backend
(its AVX-512, AVX2 and baseline rows) and the Triton kernel (interpreter lane, gpu lane) against
the float64 reference, and the reference against a token-by-token float64 loop; every level,
gate and mode, every dtype and mask kind, odd sizes, strided rows, NaN padding, empty rows and
bad arguments. Decisions at a threshold are compared where the float64 statistic is farther from
it than the same-dtype PyTorch formula's error at that token."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from iama_kernels import RolloutCorrectionOutput, rollout_correction
from iama_kernels.policy_loss.rollout_correction import PROB_BOUND

CASES = [  # (level, gate, mode, threshold)
    ("token", "ratio", "mask", (0.5, 2.0)),
    ("token", "ratio", "clip", (0.5, 2.0)),
    ("token", "tv", "mask", (0.0, 0.05)),
    ("token", "binary_kl", "mask", (0.0, 0.01)),
    ("sequence", "ratio", "mask", (0.8, 1.25)),
    ("sequence", "tv", "mask", (0.0, 0.08)),
    ("sequence", "binary_kl", "mask", (0.0, 0.03)),
]
MASKS = ["bool", "uint8", "int64", "float", "float64", "float16"]
REPO = Path(__file__).resolve().parents[1]


def _inputs(S: int, T: int, dtype: torch.dtype, mask_kind: str, seed: int = 0):
    """Log-probs of every size (some near 0, where the probabilities are clamped), rows whose
    train/rollout mismatch grows from 1e-3 to 1, NaN padding under the mask, an empty row."""
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(S, T, generator=g, dtype=torch.float64) * 0.999 + 1e-4)
    old[:, ::7] = -1e-7  # probability ~1: clamped
    spread = torch.logspace(-3, 0, S, dtype=torch.float64)[:, None]
    rollout = (old + torch.randn(S, T, generator=g, dtype=torch.float64) * spread).clamp(max=0.0)
    keep = torch.rand(S, T, generator=g) < 0.8
    if S > 1:
        keep[1] = False  # an empty row
    masks = {
        "bool": keep,
        "uint8": keep.to(torch.uint8),
        "int64": keep.long() * 2,
        "float": keep.float() * 0.5,
        "float64": keep.double() * 1.5,
        "float16": keep.half(),
    }
    old = torch.where(keep, old, torch.nan).to(dtype)  # NaN padding: never read
    return old, torch.where(keep, rollout, torch.inf).to(dtype), masks[mask_kind]


def _loop(old, rollout, mask, level, gate, mode, low, high):
    """float64 oracle, token by token: (weights, log_ratio_mean, filtered, mask_sums, statistic)."""
    S, T = old.shape
    w = torch.zeros(S, T, dtype=torch.float64)
    sums, stats, mass_total, d_total, dropped_total, rows_dropped = [], [], 0.0, 0.0, 0.0, 0

    def token_stat(o, r):
        ratio = math.exp(o - r)
        if gate == "ratio":
            return ratio
        p = min(max(math.exp(r), PROB_BOUND), 1 - PROB_BOUND)
        q = min(max(math.exp(o), PROB_BOUND), 1 - PROB_BOUND)
        if gate == "tv":
            return abs(p - q)
        np_ = min(max(-math.expm1(r), PROB_BOUND), 1 - PROB_BOUND)
        nq = min(max(-math.expm1(o), PROB_BOUND), 1 - PROB_BOUND)
        return max(0.0, p * math.log(p / q) + np_ * math.log(np_ / nq))

    for i in range(S):
        toks = [
            (t, float(mask[i, t]), float(old[i, t]), float(rollout[i, t]))
            for t in range(T)
            if float(mask[i, t]) != 0
        ]
        msum = sum(m for _, m, _, _ in toks)
        sums.append(msum)
        mass_total += msum
        d_total += sum(m * (o - r) for _, m, o, r in toks)
        if level == "sequence":
            if msum == 0:
                stat = math.nan
            elif gate == "ratio":
                stat = math.exp(sum(m * (o - r) for _, m, o, r in toks) / msum)
            else:
                stat = sum(m * token_stat(o, r) for _, m, o, r in toks) / msum
            stats.append(stat)
            kept = low <= stat <= high
            rows_dropped += 0 if kept else 1
            for t, m, o, r in toks:
                w[i, t] = math.exp(o - r) * m if kept else 0.0
            continue
        for t, m, o, r in toks:
            s, ratio = token_stat(o, r), math.exp(o - r)
            if mode == "clip":
                dropped, coef = not (low <= s <= high), min(max(ratio, low), high)
            else:
                dropped = not (low <= s <= high)
                coef = 0.0 if dropped else ratio
            dropped_total += m if dropped else 0.0
            w[i, t] = coef * m
    filtered = (
        rows_dropped / max(S, 1)
        if level == "sequence"
        else (dropped_total / mass_total if mass_total else 0.0)
    )
    return (
        w,
        d_total / mass_total if mass_total else 0.0,
        filtered,
        torch.tensor(sums, dtype=torch.float64),
        torch.tensor(stats, dtype=torch.float64) if level == "sequence" else None,
    )


def _same_dtype_statistic(old, rollout, gate):
    """The token statistic by PyTorch in the inputs' compute dtype (its error is the yardstick)."""
    o, r = old.float(), rollout.float()
    if gate == "ratio":
        return (o - r).exp()
    p = r.exp().clamp(PROB_BOUND, 1 - PROB_BOUND)
    q = o.exp().clamp(PROB_BOUND, 1 - PROB_BOUND)
    if gate == "tv":
        return (p - q).abs()
    np_, nq = (-r.expm1()).clamp(PROB_BOUND, 1 - PROB_BOUND), (-o.expm1()).clamp(PROB_BOUND, 1 - PROB_BOUND)
    return (p * (p / q).log() + np_ * (np_ / nq).log()).clamp(min=0)


def _distance(s64: torch.Tensor, gate: str, low: float, high: float) -> torch.Tensor:
    """How far each statistic is from a bound it can cross (a divergence, >= 0 in every backend,
    never crosses a lower bound <= 0)."""
    if gate != "ratio" and low <= 0:
        return (s64 - high).abs()
    return torch.minimum((s64 - low).abs(), (s64 - high).abs())


def _unsure(old, rollout, mask, level, gate, low, high):
    """[S, T] bool: tokens whose decision a float32 computation may take either way (their float64
    statistic within 8x the same-dtype formula's error of a bound, or their row's)."""
    keep = mask != 0
    o64, r64 = torch.where(keep, old.double(), 0.0), torch.where(keep, rollout.double(), 0.0)
    o32, r32 = o64.to(old.dtype), r64.to(old.dtype)
    if level == "token":
        from iama_kernels.policy_loss.rollout_correction import _gate_statistic

        s64 = _gate_statistic(gate, o64, r64, (o64 - r64).exp())
        err = (_same_dtype_statistic(o32, r32, gate).double() - s64).abs()
        near = _distance(s64, gate, low, high) < 8 * err + 1e-7 * s64.abs()
        return near & keep
    # a row: its statistic's float32 error is at most its tokens' largest plus the sum's rounding
    ref = rollout_correction(
        old.double(),
        rollout.double(),
        mask.double() if mask.is_floating_point() else mask,
        level=level,
        gate=gate,
        threshold=(low, high),
        impl="reference",
    )
    s64 = ref.row_statistic
    near = _distance(s64, gate, low, high) <= 1e-5 * s64.abs().clamp(min=1e-3)
    return near[:, None] & keep


@pytest.mark.parametrize(("level", "gate", "mode", "threshold"), CASES)
@pytest.mark.parametrize("mask_kind", ["bool", "float64"])
def test_reference_matches_the_loop(level, gate, mode, threshold, mask_kind) -> None:
    old, rollout, mask = _inputs(9, 37, torch.float64, mask_kind, seed=1)
    got = rollout_correction(
        old, rollout, mask, level=level, gate=gate, mode=mode, threshold=threshold, impl="reference"
    )
    w, lr_mean, filtered, sums, stats = _loop(old, rollout, mask, level, gate, mode, *threshold)
    torch.testing.assert_close(got.weights, w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        got.log_ratio_mean, torch.tensor(lr_mean, dtype=torch.float64), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        got.filtered_fraction, torch.tensor(filtered, dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(got.mask_sums, sums, rtol=0, atol=0)
    if stats is None:
        assert got.row_statistic is None
    else:
        torch.testing.assert_close(got.row_statistic, stats, rtol=1e-12, atol=1e-15, equal_nan=True)
    # the test data make every case act: some units dropped (or clipped), some kept
    assert 0.0 < filtered < 1.0, (level, gate, mode, filtered)


def _check_against_reference(got, old, rollout, mask, level, gate, mode, threshold, name):
    ref = rollout_correction(
        old.double(),
        rollout.double(),
        mask,
        level=level,
        gate=gate,
        mode=mode,
        threshold=threshold,
        impl="reference",
    )
    unsure = (
        _unsure(old, rollout, mask, level, gate, *threshold)
        if mode == "mask"
        else torch.zeros_like(mask, dtype=torch.bool)
    )
    assert float(unsure.double().mean()) < 0.02, (
        f"{name}: too many tokens at a threshold for the test to bite"
    )
    out_dtype = torch.float64 if old.dtype == torch.float64 else torch.float32
    assert got.weights.dtype == out_dtype and got.weights.shape == old.shape, name
    w = got.weights.cpu().double()
    sure = ~unsure
    # float32: e^d to a few ulp of d (|d| up to a few units) and of the weight itself
    tol = 1e-12 if old.dtype == torch.float64 else 2e-6
    scale = ref.weights.abs().clamp(min=1.0)
    assert bool(((w - ref.weights).abs() <= tol * scale * 4)[sure].all()), f"{name}: weights"
    assert bool((w[mask == 0] == 0).all()), f"{name}: weight 0 where the mask is 0"
    mass = float(ref.mask_sums.sum())
    torch.testing.assert_close(got.mask_sums.cpu().double(), ref.mask_sums, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.log_ratio_mean.cpu().double(), ref.log_ratio_mean, rtol=1e-5, atol=1e-6)
    unsure_units = (
        (unsure.any(-1).double().sum() / max(old.shape[0], 1))
        if level == "sequence"
        else (torch.where(unsure, mask.double(), 0.0).sum() / max(mass, 1e-30))
    )
    assert abs(float(got.filtered_fraction) - float(ref.filtered_fraction)) <= float(unsure_units) + 1e-6, (
        name
    )
    if level == "sequence":
        stat = got.row_statistic.cpu().double()
        both = torch.isfinite(ref.row_statistic)
        assert bool(torch.isnan(stat[~both]).all()), f"{name}: an empty row's statistic is NaN"
        torch.testing.assert_close(stat[both], ref.row_statistic[both], rtol=2e-5, atol=1e-7)
    else:
        assert got.row_statistic is None


@pytest.mark.parametrize(("level", "gate", "mode", "threshold"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_cpu_matches_reference(cpu_ext, level, gate, mode, threshold, dtype, mask_kind) -> None:
    # rows of 16-token vectors and a ragged tail; int64 / float64 masks take the baseline row
    old, rollout, mask = _inputs(13, 133, dtype, mask_kind, seed=2)
    got = rollout_correction(
        old, rollout, mask, level=level, gate=gate, mode=mode, threshold=threshold, impl="cpu"
    )
    _check_against_reference(
        got, old, rollout, mask, level, gate, mode, threshold, f"cpu {dtype} {mask_kind}"
    )


@pytest.mark.parametrize(("level", "gate", "mode", "threshold"), CASES)
def test_avx512_and_baseline_rows_agree(cpu_ext, level, gate, mode, threshold) -> None:
    """A bool mask takes the AVX-512 or AVX2 row (where the CPU has it), the same mask as int64
    the baseline row: exp16/log16 are exp_acc/log_acc's steps, so they agree to the sums'
    rounding."""
    old, rollout, mask = _inputs(11, 301, torch.float32, "bool", seed=3)
    a = rollout_correction(
        old, rollout, mask, level=level, gate=gate, mode=mode, threshold=threshold, impl="cpu"
    )
    b = rollout_correction(
        old, rollout, mask.long(), level=level, gate=gate, mode=mode, threshold=threshold, impl="cpu"
    )
    torch.testing.assert_close(a.weights, b.weights, rtol=2e-7, atol=0)
    for field in ("log_ratio_mean", "filtered_fraction", "mask_sums"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-7)


def test_every_instruction_set_build_matches_reference(cpu_ext, tmp_path) -> None:
    """float32 rows with a bool mask take the AVX-512 build, the AVX2 one or the baseline one,
    whichever the CPU runs; IAMA_CPU_ISA caps the choice (a subprocess each), so every build this
    machine can run is checked against the float64 reference."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from iama_kernels import _extension, rollout_correction
        from test_rollout_correction import CASES, _inputs
        _extension.load()
        old, rollout, mask = _inputs(9, 203, torch.float32, "bool", seed=12)
        outs = [tuple(rollout_correction(old, rollout, mask, level=level, gate=gate, mode=mode,
                                         threshold=threshold, impl="cpu"))
                for level, gate, mode, threshold in CASES]
        torch.save(outs, sys.argv[1])
    """)
    old, rollout, mask = _inputs(9, 203, torch.float32, "bool", seed=12)
    for isa in ("generic", "avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, IAMA_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, cwd=REPO, timeout=300)
        for fields, (level, gate, mode, threshold) in zip(torch.load(path), CASES, strict=True):
            _check_against_reference(RolloutCorrectionOutput(*fields), old, rollout, mask, level, gate, mode,
                                     threshold, f"{isa} {level} {gate} {mode}")


def test_strided_and_mixed_dtypes(cpu_ext) -> None:
    old, rollout, mask = _inputs(6, 70, torch.float32, "bool", seed=4)
    want = rollout_correction(old, rollout, mask, threshold=(0.5, 2.0), impl="reference")
    wide = torch.full((6, 140), torch.nan)
    wide[:, ::2] = old
    for o, r, m in (
        (wide[:, ::2], rollout, mask),
        (old, rollout.double(), mask),
        (old.t().contiguous().t(), rollout, mask.t().contiguous().t()),
        (old, rollout.bfloat16().float(), mask),
    ):
        got = rollout_correction(o, r, m, threshold=(0.5, 2.0), impl="cpu")
        ref = rollout_correction(o, r, m, threshold=(0.5, 2.0), impl="reference")
        assert got.weights.dtype == ref.weights.dtype
        torch.testing.assert_close(got.weights.double(), ref.weights.double(), rtol=1e-5, atol=1e-6)
    assert rollout_correction(old, rollout.double(), mask, impl="cpu").weights.dtype == torch.float64
    torch.testing.assert_close(
        rollout_correction(wide[:, ::2], rollout, mask, threshold=(0.5, 2.0), impl="cpu").weights,
        want.weights.float(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_binary_kl_below_zero_is_held_at_zero(cpu_ext) -> None:
    """Nearly equal policies: the float32 formula goes below 0 for a share of the tokens, which
    OpenRLHF's default lower bound of 0 drops; every backend keeps them all."""
    g = torch.Generator().manual_seed(5)
    old = torch.log(torch.rand(64, 256, generator=g) * 0.98 + 0.01)
    rollout = old + torch.randn(64, 256, generator=g) * 1e-4
    mask = torch.ones(64, 256, dtype=torch.bool)
    p, q = rollout.exp().clamp(PROB_BOUND, 1 - PROB_BOUND), old.exp().clamp(PROB_BOUND, 1 - PROB_BOUND)
    raw = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()  # OpenRLHF's float32 formula
    assert float((raw < 0).float().mean()) > 0.2
    for impl in ("cpu", "reference"):
        for level in ("token", "sequence"):
            out = rollout_correction(
                old, rollout, mask, level=level, gate="binary_kl", threshold=(0.0, 0.01), impl=impl
            )
            assert float(out.filtered_fraction) == 0.0, (impl, level)
            torch.testing.assert_close(out.weights.float(), (old - rollout).exp(), rtol=1e-6, atol=0)


def test_edge_sizes_and_nan(cpu_ext) -> None:
    for S, T in ((0, 5), (3, 0), (1, 1), (2, 17)):
        old, rollout = -torch.rand(S, T), -torch.rand(S, T)
        mask = torch.ones(S, T, dtype=torch.bool)
        for level in ("token", "sequence"):
            outs = [
                rollout_correction(old, rollout, mask, level=level, threshold=(0.0, 10.0), impl=impl)
                for impl in ("cpu", "reference")
            ]
            for a, b in zip(outs[0], outs[1], strict=True):
                if a is None:
                    assert b is None
                    continue
                torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-7, equal_nan=True)
            if T == 0 and level == "sequence":  # empty rows: dropped, statistic NaN
                assert float(outs[0].filtered_fraction) == (1.0 if S else 0.0)
    # a NaN under the mask: its token dropped (mask mode), its metric NaN; clip mode keeps NaN
    old, rollout = torch.zeros(2, 3), torch.zeros(2, 3)
    old[0, 1] = math.nan
    for impl in ("cpu", "reference"):
        out = rollout_correction(old, rollout, torch.ones(2, 3), impl=impl)
        assert float(out.weights[0, 1]) == 0.0 and math.isnan(float(out.log_ratio_mean))
        clipped = rollout_correction(old, rollout, torch.ones(2, 3), mode="clip", impl=impl)
        assert math.isnan(float(clipped.weights[0, 1])) and float(clipped.weights[1, 0]) == 1.0


def test_bad_arguments_are_named(cpu_ext) -> None:
    old, rollout, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    for kwargs, error, message in (
        ({"level": "seq"}, ValueError, "level must be one of"),
        ({"gate": "kl"}, ValueError, "gate must be one of"),
        ({"mode": "truncate"}, ValueError, "mode must be one of"),
        ({"mode": "clip", "level": "sequence"}, ValueError, "mode='clip' needs level='token'"),
        ({"mode": "clip", "gate": "tv"}, ValueError, "mode='clip' needs level='token' and gate='ratio'"),
        ({"threshold": (2.0, 1.0)}, ValueError, "low <= high"),
        ({"threshold": (math.nan, 1.0)}, ValueError, r"threshold\[0\] must not be NaN"),
        ({"threshold": 3.0}, TypeError, "threshold must be a pair"),
        ({"impl": "cuda"}, ValueError, "impl='cuda' is not implemented"),
    ):
        with pytest.raises(error, match=message):
            rollout_correction(old, rollout, mask, **kwargs)
    with pytest.raises(ValueError, match="rollout_logp must have the shape of old_logp"):
        rollout_correction(old, torch.zeros(2, 4), mask)
    with pytest.raises(ValueError, match=r"old_logp must have shape \[S, T\]"):
        rollout_correction(torch.zeros(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(TypeError, match="rollout_logp must have a floating dtype"):
        rollout_correction(old, torch.zeros(2, 3, dtype=torch.long), mask)
    with pytest.raises(TypeError, match="mask must be"):
        rollout_correction(old, rollout, torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="impl='triton' cannot run rollout_correction"):
        rollout_correction(old.double(), rollout.double(), mask, impl="triton")


def test_op_passes_opcheck(cpu_ext) -> None:
    old, rollout, mask = _inputs(5, 21, torch.float32, "bool", seed=6)
    old, rollout = torch.nan_to_num(old), torch.nan_to_num(rollout, posinf=0.0)
    mask[1, :3] = True  # (no empty row: its NaN statistic fails opcheck's output comparison)
    for args in (
        (False, "ratio", False, 0.5, 2.0),
        (True, "binary_kl", False, 0.0, 0.03),
        (False, "ratio", True, 0.5, 2.0),
    ):
        torch.library.opcheck(torch.ops.iama.rollout_correction.default, (old, rollout, mask, *args))


def test_compiles_fullgraph(cpu_ext) -> None:
    old, rollout, mask = _inputs(4, 40, torch.float32, "bool", seed=7)

    @torch.compile(fullgraph=True, backend="eager")
    def weights(o, r, m):
        out = rollout_correction(o, r, m, level="sequence", gate="tv", threshold=(0.0, 0.1), impl="cpu")
        return out.weights, out.filtered_fraction

    w, f = weights(old, rollout, mask)
    want = rollout_correction(
        old, rollout, mask, level="sequence", gate="tv", threshold=(0.0, 0.1), impl="cpu"
    )
    assert torch.equal(w, want.weights) and torch.equal(f, want.filtered_fraction)


# ---- the Triton backend ----------------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param("interpreter", marks=pytest.mark.interpreter),
        pytest.param("gpu", marks=pytest.mark.gpu),
    ]
)
def lane(request: pytest.FixtureRequest) -> tuple[torch.device, tuple[int, int]]:
    """``(device, (S, T))``: CPU tensors through the interpreter at a small size (rows of two
    blocks, the second ragged), or CUDA."""
    pytest.importorskip("triton")
    from iama_kernels._triton_backend import interpreter_enabled

    if request.param == "interpreter":
        if not interpreter_enabled():
            pytest.skip("TRITON_INTERPRET is not set (machines with CUDA run the gpu lane)")
        request.getfixturevalue("cpu_ext")
        return torch.device("cpu"), (5, 1100)
    return torch.device("cuda"), (300, 4100)


@pytest.mark.parametrize(("level", "gate", "mode", "threshold"), CASES)
@pytest.mark.parametrize(
    ("dtype", "mask_kind"),
    [(torch.float32, "bool"), (torch.bfloat16, "float"), (torch.float16, "int64")],
    ids=str,
)
def test_triton_matches_reference(lane, level, gate, mode, threshold, dtype, mask_kind) -> None:
    device, (S, T) = lane
    old, rollout, mask = _inputs(S, T, dtype, mask_kind, seed=8)
    got = rollout_correction(
        old.to(device),
        rollout.to(device),
        mask.to(device),
        level=level,
        gate=gate,
        mode=mode,
        threshold=threshold,
        impl="triton",
    )
    assert got.weights.device.type == device.type
    _check_against_reference(
        got, old, rollout, mask, level, gate, mode, threshold, f"triton {dtype} {mask_kind}"
    )


def test_triton_op_passes_opcheck(lane) -> None:
    from iama_kernels.policy_loss import rollout_correction_triton  # noqa: F401  (registers the op)

    device, _ = lane
    old, rollout, mask = _inputs(4, 19, torch.float32, "bool", seed=9)
    old, rollout = torch.nan_to_num(old).to(device), torch.nan_to_num(rollout, posinf=0.0).to(device)
    mask[1, :3] = True  # (no empty row: its NaN statistic fails opcheck's output comparison)
    torch.library.opcheck(
        torch.ops.iama_triton.rollout_correction.default,
        (old, rollout, mask.to(device), True, "tv", False, 0.0, 0.08),
    )


def test_float64_bounds_are_not_rounded_to_float32(cpu_ext) -> None:
    """A float64 ratio between 1.1 and float32(1.1) = 1.1000000238: above the bound, dropped (or
    clamped) by every float64 backend, at token and at sequence level."""
    d = math.log(1.1 + 1e-8)
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    rollout = old - d
    mask = torch.ones(2, 3, dtype=torch.bool)
    for impl in ("cpu", "reference"):
        for level in ("token", "sequence"):
            out = rollout_correction(old, rollout, mask, level=level, threshold=(0.5, 1.1), impl=impl)
            assert float(out.filtered_fraction) == 1.0 and not out.weights.any(), (impl, level)
        out = rollout_correction(old, rollout, mask, mode="clip", threshold=(0.5, 1.1), impl=impl)
        assert torch.equal(out.weights, torch.full((2, 3), 1.1, dtype=torch.float64)), impl


def test_the_benchmark_runs(cpu_ext, capsys, benchmark_script) -> None:
    """benchmarks/rollout_correction.py at a tiny size (it checks the kernel against eager PyTorch)."""
    module = benchmark_script("rollout_correction")
    assert module.main(["--shapes", "3x50,5x70", "--rounds", "2", "--no-write"]) == 0
    assert capsys.readouterr().out.count("iama cpu") == 2 * len(module.CASES) * 2  # progress and table

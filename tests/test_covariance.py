"""covariance_top_k / covariance_band (KL-Cov's and Clip-Cov's token selections): the C++ and Triton
backends against the float64 reference and against loops written from the definitions, on odd
sizes, ties, NaN, every mask kind, strided inputs and several thread counts. The Triton tests run
in two lanes: CPU tensors through the interpreter (and exactly the C++ backend's result there) and
CUDA tensors at larger sizes (``gpu``)."""

from __future__ import annotations

import pytest
import torch

from iama_kernels import covariance_band, covariance_top_k

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MASKS = ["bool", "int64", "float", "uint8"]


def _inputs(S: int, T: int, dtype: torch.dtype, mask_kind: str, row_adv: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(S, 1, generator=g).expand(S, T) if row_adv else torch.randn(S, T, generator=g)
    logp = -3 * torch.rand(S, T, generator=g)
    old = logp + 0.3 * torch.randn(S, T, generator=g)
    keep = torch.rand(S, T, generator=g) < 0.7
    keep[0, :2] = True
    mask = {"bool": keep, "int64": keep.long(), "uint8": keep.to(torch.uint8),
            "float": keep * (0.25 + torch.rand(S, T, generator=g))}[mask_kind]  # weights: only != 0 counts
    nan = torch.tensor(float("nan"))
    # NaN padding: never read by either backend
    return (torch.where(keep, adv, nan).to(dtype), torch.where(keep, logp, nan).to(dtype),
            torch.where(keep, old, nan).to(dtype), mask)


def _products(adv: torch.Tensor, logp: torch.Tensor, keep: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Each token's (A - mean A)(logp - mean logp) in float64, with loops' plain means."""
    a, lp = adv.double().reshape(-1).tolist(), logp.double().reshape(-1).tolist()
    kept = [i for i, k in enumerate(keep.reshape(-1).tolist()) if k]
    mean_a = sum(a[i] for i in kept) / (len(kept) + offset)
    mean_l = sum(lp[i] for i in kept) / (len(kept) + offset)
    products = [(x - mean_a) * (y - mean_l) for x, y in zip(a, lp, strict=True)]
    return torch.tensor(products, dtype=torch.float64)


def _tolerance(dtype: torch.dtype, cov: torch.Tensor) -> float:
    # float32 products: the differences and the product rounded (3 ulps), the means too; the
    # inputs are exact in float32 for the half dtypes. float64: summation order of the means.
    ulp = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    return 16 * ulp * (1.0 + float(cov.nan_to_num(0.0).abs().max()))  # the padding's products are NaN


def _assert_top_k(picked: torch.Tensor, cov: torch.Tensor, keep: torch.Tensor, k: int, tol: float) -> None:
    """picked is a valid top k of cov over keep: the right number, distinct, kept, in decreasing
    order, and no token left out above the cut (all up to tol: ties within rounding may go
    either way)."""
    flat_keep = keep.reshape(-1)
    n = int(flat_keep.sum())
    assert picked.dtype == torch.long and picked.shape == (min(k, n),)
    assert picked.unique().numel() == picked.numel() and bool(flat_keep[picked].all())
    values = cov[picked]
    assert bool((values[1:] <= values[:-1] + tol).all())
    left_out = flat_keep.clone()
    left_out[picked] = False
    if bool(left_out.any()):
        assert float(cov[left_out].max()) <= float(values.min()) + tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("row_adv", [True, False])
def test_top_k_is_the_top_k_of_the_products(cpu_ext, dtype: torch.dtype, mask_kind: str,
                                            row_adv: bool) -> None:
    adv, logp, _, mask = _inputs(37, 129, dtype, mask_kind, row_adv)
    keep = mask != 0
    cov = _products(adv, logp, keep)
    n = int(keep.sum())
    tol = _tolerance(dtype, cov)
    for k in (1, 3, 97, 700, n - 1, n, n + 5):
        for impl in ("cpu", "reference"):
            picked = covariance_top_k(adv, logp, mask, k, impl=impl)
            _assert_top_k(picked, cov, keep, k, tol)
        # away from ties within rounding (none here with per-token advantages) the two agree exactly
        if not row_adv:
            assert torch.equal(covariance_top_k(adv, logp, mask, k, impl="cpu"),
                               covariance_top_k(adv, logp, mask, k, impl="reference"))


def test_top_k_ties_go_to_the_lower_index(cpu_ext) -> None:
    S, T = 9, 50
    mask = torch.rand(S, T, generator=torch.Generator().manual_seed(3)) < 0.6
    flat = mask.reshape(-1).nonzero().squeeze(1)
    adv = torch.full((S, T), 0.5)  # every product 0
    logp = -torch.rand(S, T)
    for impl in ("cpu", "reference"):
        assert torch.equal(covariance_top_k(adv, logp, mask, 40, impl=impl), flat[:40])
    # row advantages: equal products within a row that has one log-prob value; the order is by value,
    # then by index
    adv = torch.tensor([1.0, -1.0, 2.0]).unsqueeze(1).expand(3, 4)
    logp = torch.tensor([-1.0, -3.0, -1.0]).unsqueeze(1).expand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    # means: A 2/3, logp -5/3: products 1/3 * 2/3 (row 0), -5/3 * -4/3 (row 1), 4/3 * 2/3 (row 2)
    expected = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 0, 1])
    for impl in ("cpu", "reference"):
        assert torch.equal(covariance_top_k(adv, logp, mask, 10, impl=impl), expected)


def test_top_k_ranks_nan_first_and_never_reads_the_padding(cpu_ext) -> None:
    adv, logp, _, mask = _inputs(8, 33, torch.float32, "bool", False, seed=5)
    keep = mask != 0
    zeros = torch.where(keep, adv, 0.0), torch.where(keep, logp, 0.0)
    for impl in ("cpu", "reference"):
        assert torch.equal(covariance_top_k(adv, logp, mask, 20, impl=impl),
                           covariance_top_k(*zeros, mask, 20, impl=impl))
    poisoned = adv.clone()
    poisoned[3, 7] = float("nan")
    mask = mask.clone()
    mask[3, 7] = True
    for impl in ("cpu", "reference"):
        # the NaN advantage makes mean A NaN: every product is NaN, ranked by index
        expected = mask.reshape(-1).nonzero().squeeze(1)[:5]
        assert torch.equal(covariance_top_k(poisoned, logp, mask, 5, impl=impl), expected)


def test_top_k_ranks_an_overflowed_nan_first_after_the_bar(cpu_ext) -> None:
    """A NaN product among finite ones (float32 overflow: inf * 0) in a tile read after the buffer
    has been cut, in a tile whose other products are below the bar, still ranks first (as
    torch.topk ranks NaN)."""
    S, T = 40, 64
    adv = torch.full((S, T), -1e38)
    adv[-1, 0] = 3e38  # a - mean A = 4e38: inf in float32, at the front of its tile
    logp = torch.full((S, T), -1.0)
    logp[: S // 2] = -3.0
    logp[-1, 0] = logp[0, 1] = -2.0  # mean logp exactly -2: logp - mean logp = 0 there
    mask = torch.ones(S, T, dtype=torch.bool)
    # products: NaN at the overflow, 0 at [0, 1], (a - mean A) * -1 > 0 in the first half, < 0 after
    assert torch.equal(covariance_top_k(adv, logp, mask, 3, impl="cpu"), torch.tensor([(S - 1) * T, 0, 2]))
    # in float64 nothing overflows
    in_double = covariance_top_k(adv.double(), logp.double(), mask, 3, impl="cpu")
    assert torch.equal(in_double, torch.tensor([0, 2, 3]))
    assert torch.equal(in_double, covariance_top_k(adv.double(), logp.double(), mask, 3, impl="reference"))


def test_top_k_does_not_depend_on_the_thread_count(cpu_ext) -> None:
    # 96 rows of 1024: 6 blocks of 16 rows; k small (the bar) and large (the buffers' cut)
    adv, logp, _, mask = _inputs(96, 1024, torch.float32, "bool", False, seed=11)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append([covariance_top_k(adv, logp, mask, k, impl="cpu") for k in (1, 19, 1500, 40000)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    keep = mask != 0
    cov = _products(adv, logp, keep)
    for k, picked in zip((1, 19, 1500, 40000), results[0], strict=True):
        _assert_top_k(picked, cov, keep, k, _tolerance(torch.float32, cov))


def test_strided_and_mixed_dtype_inputs(cpu_ext) -> None:
    adv, logp, old, mask = _inputs(21, 65, torch.float32, "bool", False, seed=2)
    # column-strided views, and a transposed copy's transpose (rows not contiguous)
    wide = torch.zeros(21, 130)
    wide[:, ::2] = logp
    logp_strided = wide[:, ::2]
    adv_t = adv.t().contiguous().t()
    for impl in ("cpu", "reference"):
        assert torch.equal(covariance_top_k(adv_t, logp_strided, mask, 50, impl=impl),
                           covariance_top_k(adv, logp, mask, 50, impl=impl))
        old_t = old.t().contiguous().t()
        assert torch.equal(covariance_band(adv_t, logp_strided, mask, 0.05, 0.8, old_logp=old_t, impl=impl),
                           covariance_band(adv, logp, mask, 0.05, 0.8, old_logp=old, impl=impl))
    # float64 advantages with float32 log-probs: computed in float64
    assert torch.equal(covariance_top_k(adv.double(), logp, mask, 50, impl="cpu"),
                       covariance_top_k(adv.double(), logp.double(), mask, 50, impl="cpu"))


def _band_by_loops(adv, logp, old, mask, low, high, eps_low, eps_high) -> torch.Tensor:
    keep = (mask != 0).reshape(-1)
    cov = _products(adv, logp, mask != 0, offset=1e-8)
    inside = keep & (cov > low) & (cov < high)
    if old is not None:
        a = adv.double().reshape(-1)
        rho = torch.exp(logp.double() - old.double()).reshape(-1)
        active = torch.where(a > 0, rho > 1 + eps_high, torch.where(a < 0, rho < 1 - eps_low, False))
        inside &= ~active
    return inside, cov


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("clip", [False, True])
def test_band_is_the_tokens_inside_the_band(cpu_ext, dtype: torch.dtype, mask_kind: str, clip: bool) -> None:
    adv, logp, old, mask = _inputs(37, 129, dtype, mask_kind, False, seed=7)
    low, high, eps_low, eps_high = 0.05, 0.9, 0.2, 0.28
    expected, cov = _band_by_loops(adv, logp, old if clip else None, mask, low, high, eps_low, eps_high)
    tol = _tolerance(dtype, cov)
    rho = torch.exp(logp.double() - old.double()).reshape(-1)
    near_edge = ((cov - low).abs() < tol) | ((cov - high).abs() < tol)
    near_edge |= ((rho - 1 - eps_high).abs() < 1e-6) | ((rho - 1 + eps_low).abs() < 1e-6)
    assert int(expected.sum()) > 100
    if clip:  # the clip test takes tokens out
        assert int(expected.sum()) < int(_band_by_loops(adv, logp, None, mask, low, high, 0, 0)[0].sum())
    for impl in ("cpu", "reference"):
        got = covariance_band(adv, logp, mask, low, high, old_logp=old if clip else None, eps_low=eps_low,
                              eps_high=eps_high, impl=impl)
        assert got.dtype == torch.long and bool((got[1:] > got[:-1]).all())
        chosen = torch.zeros_like(expected)
        chosen[got] = True
        assert not bool(((chosen != expected) & ~near_edge).any())
    if dtype == torch.float64 or not clip:
        got = [covariance_band(adv, logp, mask, low, high, old_logp=old if clip else None, eps_low=eps_low,
                               eps_high=eps_high, impl=impl) for impl in ("cpu", "reference")]
        assert torch.equal(*got)


def test_band_clip_test_removes_the_clipped_tokens(cpu_ext) -> None:
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0, 1.0]])
    logp = torch.tensor([[-1.0, -2.0, -1.0, -2.0, -1.0, -1.5]])
    # ratios: e^0.5 (clipped above with A > 0), 1, e^-0.5 (clipped below with A < 0), 1, e^0.5 (A = 0:
    # never clipped), e^-0.5 (A > 0: below the range is not clipped)
    old = logp - torch.tensor([[0.5, 0.0, -0.5, 0.0, 0.5, -0.5]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    for impl in ("cpu", "reference"):
        everything = covariance_band(adv, logp, mask, -1e9, 1e9, impl=impl)
        assert torch.equal(everything, torch.arange(6))
        kept = covariance_band(adv, logp, mask, -1e9, 1e9, old_logp=old, eps_low=0.2, eps_high=0.28,
                               impl=impl)
        assert torch.equal(kept, torch.tensor([1, 3, 4, 5]))


def test_empty_selections(cpu_ext) -> None:
    adv, logp, old, _ = _inputs(4, 9, torch.float32, "bool", False)
    nothing = torch.zeros(4, 9, dtype=torch.bool)
    for impl in ("cpu", "reference"):
        assert covariance_top_k(adv, logp, nothing, 3, impl=impl).shape == (0,)
        assert covariance_band(adv, logp, nothing, -1.0, 1.0, old_logp=old, impl=impl).shape == (0,)
        assert covariance_band(adv, logp, torch.ones(4, 9), 2.0, 2.0, impl=impl).shape == (0,)
        none = torch.zeros(0, 5)
        assert covariance_top_k(none, none, none, 1, impl=impl).shape == (0,)


def test_bad_arguments_are_named(cpu_ext) -> None:
    adv, logp, old, mask = _inputs(4, 9, torch.float32, "bool", False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        covariance_top_k(adv, logp, mask, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        covariance_top_k(adv, logp, mask, True)
    with pytest.raises(TypeError, match="k must be an int"):
        covariance_top_k(adv, logp, mask, 2.0)
    with pytest.raises(ValueError, match="advantages must have the shape of logp"):
        covariance_top_k(adv[:, :3], logp, mask, 2)
    with pytest.raises(ValueError, match="logp must have shape"):
        covariance_top_k(adv, logp.reshape(-1), mask, 2)
    with pytest.raises(TypeError, match="logp must have a floating dtype"):
        covariance_top_k(adv, logp.long(), mask, 2)
    with pytest.raises(TypeError, match="mask must be"):
        covariance_top_k(adv, logp, mask.to(torch.complex64), 2)
    with pytest.raises(ValueError, match="old_logp must have the shape of logp"):
        covariance_band(adv, logp, mask, 0.0, 1.0, old_logp=old[:2])
    with pytest.raises(ValueError, match="low must be <= high"):
        covariance_band(adv, logp, mask, 2.0, 1.0)
    with pytest.raises(ValueError, match="high must not be NaN"):
        covariance_band(adv, logp, mask, 0.0, float("nan"))
    with pytest.raises(TypeError, match="eps_low must be a float"):
        covariance_band(adv, logp, mask, 0.0, 1.0, eps_low="0.2")
    with pytest.raises(ValueError, match="impl='triton' cannot run covariance_top_k"):
        covariance_top_k(adv.double(), logp, mask, 2, impl="triton")  # float64: refused, never cast
    with pytest.raises(ValueError, match="impl must be one of"):
        covariance_band(adv, logp, mask, 0.0, 1.0, impl="fast")
    # the op itself names its arguments too
    with pytest.raises(ValueError, match="k must be >= 1"):
        torch.ops.iama.covariance_top_k(adv, logp, mask, 0)
    with pytest.raises(ValueError, match="mask must have the shape of logp"):
        torch.ops.iama.covariance_band(adv, logp, mask[:1], 0.0, 1.0, None, 0.2, 0.2)


def test_ops_pass_opcheck(cpu_ext) -> None:
    adv, logp, old, mask = _inputs(6, 11, torch.float32, "bool", False)
    adv, logp, old = (torch.nan_to_num(t) for t in (adv, logp, old))
    torch.library.opcheck(torch.ops.iama.covariance_top_k.default, (adv, logp, mask, 5))
    torch.library.opcheck(torch.ops.iama.covariance_band.default, (adv, logp, mask, 0.0, 1.0, old, 0.2, 0.28))


def test_device_path_of_verl_clip_cov_agrees(cpu_ext) -> None:
    """verl's clip_cov candidates in verl's own arithmetic (the path off the CPU) are the op's."""
    from iama.integrations.verl_loss import _band_on_device

    adv, logp, old, mask = _inputs(37, 129, torch.float32, "bool", False, seed=9)
    keep = mask != 0
    adv, logp, old = (torch.where(keep, t, 0.0) for t in (adv, logp, old))
    assert torch.equal(_band_on_device(logp, old, adv, keep, 0.2, 0.28, 0.05, 0.9),
                       covariance_band(adv, logp, keep, 0.05, 0.9, old_logp=old, eps_low=0.2, eps_high=0.28))


# ---- the Triton backend ----------------------------------------------------------------------

@pytest.fixture(params=[pytest.param("interpreter", marks=pytest.mark.interpreter),
                        pytest.param("gpu", marks=pytest.mark.gpu)])
def lane(request: pytest.FixtureRequest) -> tuple[torch.device, tuple[int, int]]:
    """``(device, (S, T))``: CPU tensors through the interpreter at a small size (rows of two
    blocks, the second ragged, as the C++ backend's result is also checked there), or CUDA."""
    pytest.importorskip("triton")
    from iama_kernels._triton_backend import interpreter_enabled

    if request.param == "interpreter":
        if not interpreter_enabled():
            pytest.skip("TRITON_INTERPRET is not set (machines with CUDA run the gpu lane)")
        request.getfixturevalue("cpu_ext")
        return torch.device("cpu"), (11, 1100)
    return torch.device("cuda"), (200, 2100)


def _on(device: torch.device, *tensors: torch.Tensor | None):
    return tuple(None if t is None else t.to(device) for t in tensors)


TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("row_adv", [True, False])
def test_triton_top_k_and_band(lane, dtype: torch.dtype, mask_kind: str, row_adv: bool) -> None:
    """A valid top k and the band (up to rounding at its edges) against the loops; on the
    interpreter lane exactly the C++ backend's indices (the same float32 arithmetic and order)."""
    device, (S, T) = lane
    adv, logp, old, mask = _inputs(S, T, dtype, mask_kind, row_adv, seed=21)
    keep = mask != 0
    cov = _products(adv, logp, keep)
    tol = _tolerance(dtype, cov)
    n = int(keep.sum())
    d_adv, d_logp, d_old, d_mask = _on(device, adv, logp, old, mask)
    for k in (1, 37, 2000, n + 3):
        picked = covariance_top_k(d_adv, d_logp, d_mask, k, impl="triton")
        assert picked.device.type == device.type
        _assert_top_k(picked.cpu(), cov, keep, k, tol)
        if device.type == "cpu":
            assert torch.equal(picked, covariance_top_k(adv, logp, mask, k, impl="cpu"))
    for clip in (False, True):
        expected, band_cov = _band_by_loops(adv, logp, old if clip else None, mask, 0.05, 0.9, 0.2, 0.28)
        rho = torch.exp(logp.double() - old.double()).reshape(-1)
        near_edge = ((band_cov - 0.05).abs() < tol) | ((band_cov - 0.9).abs() < tol)
        near_edge |= ((rho - 1.28).abs() < 1e-6) | ((rho - 0.8).abs() < 1e-6)
        got = covariance_band(d_adv, d_logp, d_mask, 0.05, 0.9, old_logp=d_old if clip else None,
                              eps_low=0.2, eps_high=0.28, impl="triton").cpu()
        assert got.dtype == torch.long and bool((got[1:] > got[:-1]).all())
        chosen = torch.zeros_like(expected)
        chosen[got] = True
        assert int(expected.sum()) > 50 and not bool(((chosen != expected) & ~near_edge).any())
        if device.type == "cpu" and not clip:  # with the clip test exp() may round differently
            assert torch.equal(got, covariance_band(adv, logp, mask, 0.05, 0.9, impl="cpu"))


def test_triton_order_ties_nan_signed_zero_and_infinity(lane) -> None:
    """The key's order is the C++ backend's total order: equal products by index (+0 and -0
    equal), NaN first, -inf below every finite product yet above the padding."""
    device, _ = lane
    mask = torch.rand(9, 50, generator=torch.Generator().manual_seed(3)) < 0.6
    flat = mask.reshape(-1).nonzero().squeeze(1)
    # A = its mean exactly: every product is 0, +0 or -0 by the sign of logp - mean logp
    adv, logp = torch.full((9, 50), 0.5), -torch.rand(9, 50)
    assert torch.equal(covariance_top_k(*_on(device, adv, logp, mask), 40, impl="triton").cpu(), flat[:40])
    adv = torch.tensor([1.0, -1.0, 2.0]).unsqueeze(1).expand(3, 4)
    logp = torch.tensor([-1.0, -3.0, -1.0]).unsqueeze(1).expand(3, 4)
    full = torch.ones(3, 4, dtype=torch.bool)
    assert torch.equal(covariance_top_k(*_on(device, adv, logp, full), 10, impl="triton").cpu(),
                       torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 0, 1]))
    # a NaN product from a float32 overflow ranks first; -inf products last
    S, T = 40, 64
    adv = torch.full((S, T), -1e38)
    adv[-1, 0] = 3e38
    logp = torch.full((S, T), -1.0)
    logp[: S // 2] = -3.0
    logp[-1, 0] = logp[0, 1] = -2.0
    full = torch.ones(S, T, dtype=torch.bool)
    assert torch.equal(covariance_top_k(*_on(device, adv, logp, full), 3, impl="triton").cpu(),
                       torch.tensor([(S - 1) * T, 0, 2]))
    adv = torch.tensor([[3e38, -3e38, 0.0, 1.0, 5.0]])
    logp = torch.tensor([[-3e38, -3e38, -1.0, -2.0, 0.0]])
    part = torch.tensor([[True, True, True, True, False]])
    # means over the 4: A 0.25, logp -1.5e38: products -inf, +inf, then two finite; the padding
    # (its key the lowest) is not picked even with k > n
    got = covariance_top_k(*_on(device, adv, logp, part), 10, impl="triton").cpu()
    assert torch.equal(got, covariance_top_k(adv, logp, part, 10, impl="reference"))
    assert torch.equal(got, torch.tensor([1, 3, 2, 0]))


def test_triton_strides_mixed_dtypes_empty_and_nan_padding(lane) -> None:
    device, _ = lane
    adv, logp, old, mask = _inputs(21, 65, torch.float32, "bool", False, seed=2)
    want_k = covariance_top_k(adv, logp, mask, 50, impl="reference")
    want_band = covariance_band(adv, logp, mask, 0.05, 0.8, impl="reference")
    adv, logp, old, mask = _on(device, adv, logp, old, mask)
    wide = torch.zeros(21, 130, device=device)
    wide[:, ::2] = logp
    adv_t = adv.t().contiguous().t()
    for a, lp, m in ((adv_t, wide[:, ::2], mask), (adv, logp, mask.t().contiguous().t())):
        assert torch.equal(covariance_top_k(a, lp, m, 50, impl="triton").cpu(), want_k)
    assert torch.equal(covariance_band(adv_t, wide[:, ::2], mask, 0.05, 0.8, impl="triton").cpu(), want_band)
    # advantages in bfloat16 with float32 log-probs
    got = covariance_top_k(adv.bfloat16(), logp, mask, 50, impl="triton").cpu()
    assert torch.equal(got, covariance_top_k(adv.bfloat16().cpu(), logp.cpu(), mask.cpu(), 50,
                                             impl="reference"))
    # NaN padding is never read: zeros there give the same selections
    zeros = torch.where(mask, adv, 0.0), torch.where(mask, logp, 0.0)
    assert torch.equal(covariance_top_k(*zeros, mask, 30, impl="triton"),
                       covariance_top_k(adv, logp, mask, 30, impl="triton"))
    nothing = torch.zeros_like(mask)
    assert covariance_top_k(adv, logp, nothing, 3, impl="triton").shape == (0,)
    assert covariance_band(adv, logp, nothing, -1.0, 1.0, old_logp=old, impl="triton").shape == (0,)
    none = torch.zeros(0, 5, device=device)
    assert covariance_top_k(none, none, none, 1, impl="triton").shape == (0,)
    assert covariance_band(none, none, none, 0.0, 1.0, impl="triton").shape == (0,)
    # the clip test's cases, one by one
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0, 1.0]])
    logp = torch.tensor([[-1.0, -2.0, -1.0, -2.0, -1.0, -1.5]])
    old = logp - torch.tensor([[0.5, 0.0, -0.5, 0.0, 0.5, -0.5]])
    kept = covariance_band(*_on(device, adv, logp, torch.ones(1, 6)), -1e9, 1e9,
                           old_logp=old.to(device), eps_low=0.2, eps_high=0.28, impl="triton")
    assert torch.equal(kept.cpu(), torch.tensor([1, 3, 4, 5]))


def test_triton_refusals_and_choice() -> None:
    """float64 and index overflow are refused with the reason; ``auto`` never takes the interpreter."""
    pytest.importorskip("triton")
    from iama_kernels._dispatch import Call
    from iama_kernels.policy_loss.covariance import TRITON_MAX_TOKENS, _triton_check

    adv, logp, _, mask = _inputs(4, 9, torch.float32, "bool", False)
    big = Call("covariance_top_k", torch.device("cuda"), True,
               {"dtype": torch.float32, "row_span": 8, "tokens": TRITON_MAX_TOKENS})
    assert "32 bits" in _triton_check(big)
    with pytest.raises(ValueError, match="float64 inputs are not supported"):
        covariance_band(adv, logp.double(), mask, 0.0, 1.0, impl="triton")
    from iama_kernels._dispatch import choose
    from iama_kernels.policy_loss.covariance import _BAND_BACKENDS, _TOP_K_BACKENDS

    on_cpu = Call("covariance_top_k", torch.device("cpu"), False,
                  {"dtype": torch.float32, "row_span": 8, "tokens": 36})
    for backends in (_TOP_K_BACKENDS, _BAND_BACKENDS):
        assert choose("covariance_top_k", "auto", backends, on_cpu).name in ("cpu", "reference")


def test_triton_ops_pass_opcheck(lane) -> None:
    from iama_kernels.policy_loss import covariance_triton  # noqa: F401  (registers the ops)

    device, _ = lane
    adv, logp, old, mask = _inputs(6, 11, torch.float32, "bool", False)
    adv, logp, old = (torch.nan_to_num(t) for t in (adv, logp, old))
    adv, logp, old, mask = _on(device, adv, logp, old, mask)
    torch.library.opcheck(torch.ops.iama_triton.covariance_top_k.default, (adv, logp, mask, 5))
    torch.library.opcheck(torch.ops.iama_triton.covariance_band.default,
                          (adv, logp, mask, 0.0, 1.0, old, 0.2, 0.28))

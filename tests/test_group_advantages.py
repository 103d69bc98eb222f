"""group_advantages: scaling, valid masks, lambda and multi-criterion mixing (SPEC sections 2, 4).

Expected values are assembled from the independent per-criterion oracles of
:mod:`iama_kernels.testing` (subset enumeration, CDF integration, the SoftBestOfN formula), the
aggregator's lambda at the batch-level values, and TRL's scaling convention.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iama_kernels import (
    BestOfN,
    Criterion,
    Mean,
    Min,
    Objective,
    SmoothMin,
    SoftBestOfN,
    WeightedSum,
    first_variation,
    group_advantages,
)
from iama_kernels.testing import (
    brute_force_unbiased,
    plugin_by_integration,
    plugin_group_value_by_cdf,
    random_rewards,
    soft_best_of_n_oracle,
    unbiased_value,
)

EPS32 = torch.finfo(torch.float32).eps
TRANSFORMS = (BestOfN(3), SoftBestOfN(0.3), Mean())
AGGREGATES = (WeightedSum([0.5, 0.3, 0.2]), Min(), SmoothMin([0.2, 0.3, 0.5], gamma=4.0))


def _ga(rewards: torch.Tensor, objective: object, **kw: object):
    return group_advantages(rewards, objective, impl="reference", **kw)


def _oracle_s_and_value(r: torch.Tensor, transform: object, estimator: str) -> tuple[torch.Tensor, float]:
    """Centred first variation and value of one group ``[g]`` from the independent oracles."""
    r = r.double()
    if bool((r == r[0]).all()):  # a constant group: exactly 0 (the oracles would leave rounding noise)
        return torch.zeros_like(r), float(r[0])
    if isinstance(transform, Mean):
        return r - r.mean(), float(r.mean())
    if isinstance(transform, SoftBestOfN):
        return soft_best_of_n_oracle(r, transform.tau)
    if estimator == "unbiased":
        return brute_force_unbiased(r, transform.n), unbiased_value(r, transform.n)
    return plugin_by_integration(r, transform.n), float(plugin_group_value_by_cdf(r, transform.n))


def _oracle(rewards: torch.Tensor, objective: Objective, estimator: str, scale: str, eps: float,
            valid: torch.Tensor | None = None, lam: torch.Tensor | None = None):
    """(advantages, shaped, values, lambda) in float64 from per-group oracles."""
    B, G, m = rewards.shape
    valid = torch.ones(B, G, dtype=torch.bool) if valid is None else valid
    s = torch.zeros(B, G, m, dtype=torch.float64)
    values = torch.zeros(B, m, dtype=torch.float64)
    for b in range(B):
        if not valid[b].any():
            continue
        for i, t in enumerate(objective.transforms):
            s_bi, v_bi = _oracle_s_and_value(rewards[b, valid[b], i], t, estimator)
            s[b, valid[b], i] = s_bi
            values[b, i] = v_bi
    if lam is None:
        has = valid.any(-1)
        # batch-level values: mean over groups with a valid sample (0 when there is none)
        R = values[has].mean(0) if bool(has.any()) else torch.zeros(m, dtype=torch.float64)
        lam = objective.aggregate.gradient(R)
    shaped = (s * lam.double()).sum(-1)
    adv = torch.zeros_like(shaped)
    if scale == "none":
        adv = shaped.clone()
    elif scale == "group":
        for b in range(B):
            x = shaped[b, valid[b]]
            std = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
            adv[b, valid[b]] = 0.0 if std + eps == 0 else x / (std + eps)
    else:
        x = shaped[valid]
        std = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        adv[valid] = 0.0 if std + eps == 0 else x / (std + eps)
    return adv, shaped, values, lam


@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregate", AGGREGATES, ids=repr)
def test_multi_criterion_against_oracles(estimator: str, scale: str, aggregate: object) -> None:
    g = torch.Generator().manual_seed(3)
    r = random_rewards(8, 6, ties=True, dtype=torch.float64, generator=g, m=3)
    obj = Objective([Criterion(f"c{i}", t) for i, t in enumerate(TRANSFORMS)], aggregate)
    for eps in (1e-4, 0.0):
        out = _ga(r, obj, estimator=estimator, scale=scale, eps=eps)
        adv, shaped, values, lam = _oracle(r, obj, estimator, scale, eps)
        torch.testing.assert_close(out.values, values, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.criterion_weights, lam, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.shaped, shaped, rtol=0, atol=1e-12)
        # scaled advantages: relative to the std they were divided by
        torch.testing.assert_close(out.advantages, adv, rtol=0, atol=1e-10)
        assert all(t.dtype == torch.float64 for t in out)


def test_plain_grpo_matches_trl_convention() -> None:
    g = torch.Generator().manual_seed(1)
    r = random_rewards(16, 8, ties=True, dtype=torch.float64, generator=g)
    mean, std = r.mean(-1, keepdim=True), r.std(-1, keepdim=True)  # Bessel-corrected, as in TRL
    for t in (Mean(), BestOfN(1)):
        out = _ga(r, t)  # defaults: scale="group", eps=1e-4
        torch.testing.assert_close(out.advantages, (r - mean) / (std + 1e-4), rtol=0, atol=1e-12)
        torch.testing.assert_close(out.shaped, r - mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.values, mean, rtol=0, atol=1e-12)
        assert torch.equal(out.criterion_weights, torch.ones(1, dtype=torch.float64))
    # A 2-D [B, G] input is the one-criterion [B, G, 1] input.
    a2, a3 = _ga(r, BestOfN(4)), _ga(r.unsqueeze(-1), BestOfN(4))
    assert all(torch.equal(x, y) for x, y in zip(a2, a3, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_groups_give_exact_zero(dtype: torch.dtype, scale: str) -> None:
    r = torch.tensor([[3.0] * 5, [-0.5] * 5, [0.0] * 5, [1.0, 0.0, 1.0, 1.0, 0.0]], dtype=dtype)
    for estimator in ("plugin", "unbiased"):
        for t in (Mean(), BestOfN(2), BestOfN(5), SoftBestOfN(0.05)):
            for eps in (1e-4, 0.0):
                out = _ga(r, t, estimator=estimator, scale=scale, eps=eps)
                assert bool(torch.isfinite(out.advantages).all())
                assert bool((out.advantages[:3] == 0).all()), (t, eps)
                assert bool((out.shaped[:3] == 0).all())
                all_constant = _ga(r[:3], t, estimator=estimator, scale=scale, eps=eps)
                assert bool((all_constant.advantages == 0).all())


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
def test_valid_mask_excludes_invalid_samples(scale: str, estimator: str) -> None:
    g = torch.Generator().manual_seed(5)
    B, G = 9, 7
    r = random_rewards(B, G, ties=True, dtype=torch.float64, generator=g, m=3)
    valid = torch.rand(B, G, generator=g) < 0.7
    valid[0] = False  # a group with no valid sample
    valid[1] = False
    # a group with a single valid sample (plugin), or with exactly n = 3 (unbiased needs G >= n)
    valid[1, 2:3 if estimator == "plugin" else 5] = True
    valid[2] = True
    valid[3, :3] = True  # enough for BestOfN(3) "unbiased"
    for b in range(4, B):
        valid[b, torch.randperm(G, generator=g)[:3]] = True
    obj = Objective([Criterion(f"c{i}", t) for i, t in enumerate(TRANSFORMS)], SmoothMin([1, 1, 1], 2.0))
    garbage = r.clone()
    garbage[~valid] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    out = _ga(garbage, obj, estimator=estimator, scale=scale, valid=valid)
    adv, shaped, values, lam = _oracle(r, obj, estimator, scale, 1e-4, valid)
    for got, want in zip(out, (adv, shaped, values, lam), strict=True):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert bool((out.advantages[~valid] == 0).all() and (out.shaped[~valid] == 0).all())
    assert bool((out.values[0] == 0).all())
    if estimator == "plugin":  # a single valid sample has advantage 0
        assert bool((out.advantages[1] == 0).all())
    # Equal to running the reference on each compacted group with the same lambda.
    if scale != "batch":
        for b in range(2, B):
            one = _ga(r[b : b + 1, valid[b]], obj, estimator=estimator, scale=scale,
                      criterion_weights=out.criterion_weights)
            torch.testing.assert_close(out.advantages[b, valid[b]], one.advantages[0], rtol=0, atol=1e-13)
            torch.testing.assert_close(out.values[b], one.values[0], rtol=0, atol=1e-13)
    # All-true mask is no mask.
    full = _ga(r, obj, estimator=estimator, scale=scale, valid=torch.ones(B, G, dtype=torch.bool))
    for got, want in zip(full, _ga(r, obj, estimator=estimator, scale=scale), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_lambda_is_gradient_of_g_at_batch_values() -> None:
    g = torch.Generator().manual_seed(8)
    r = random_rewards(6, 8, ties=False, dtype=torch.float64, generator=g, m=2)
    h = 1e-6
    for agg in (WeightedSum([0.25, 0.75]), Min(), SmoothMin([0.4, 0.6], gamma=1.5)):
        obj = Objective([Criterion("a", BestOfN(4)), Criterion("b", SoftBestOfN(0.2))], agg)
        out = _ga(r, obj)
        R = out.values.mean(0)
        fd = torch.stack([(agg.value(R + h * e) - agg.value(R - h * e)) / (2 * h)
                          for e in torch.eye(2, dtype=torch.float64)])
        torch.testing.assert_close(out.criterion_weights, fd, rtol=0, atol=1e-8)
    # Min with tied batch values splits lambda evenly.
    tied = torch.stack([r[..., 0], r[..., 0]], -1)
    out = _ga(tied, Objective([Criterion("a", BestOfN(2)), Criterion("b", BestOfN(2))], Min()))
    assert torch.equal(out.criterion_weights, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_criterion_weights_override_and_mixing() -> None:
    g = torch.Generator().manual_seed(9)
    r = random_rewards(8, 8, ties=True, dtype=torch.float32, generator=g, m=3)
    obj = Objective([Criterion("best", BestOfN(4)), Criterion("soft", SoftBestOfN(0.1)),
                     Criterion("mean", Mean())], Min())
    for estimator in ("plugin", "unbiased"):
        for lam in ([2.0, 0.0, 0.5], torch.tensor([0.1, 0.7, 0.2], dtype=torch.float64)):
            out = _ga(r, obj, estimator=estimator, scale="none", criterion_weights=lam)
            lam_t = torch.as_tensor(lam, dtype=torch.float32)
            assert torch.equal(out.criterion_weights, lam_t)
            parts = [first_variation(r[..., i], t, estimator=estimator, impl="reference")
                     for i, t in enumerate(obj.transforms)]
            want = sum(lam_t[i] * parts[i] for i in range(3))
            torch.testing.assert_close(out.shaped, want, rtol=0, atol=8 * EPS32 * float(want.abs().max()))
            assert torch.equal(out.advantages, out.shaped)
    # The estimator only changes BestOfN criteria.
    soft_mean = Objective([Criterion("soft", SoftBestOfN(0.1)), Criterion("mean", Mean())])
    a, b = _ga(r[..., 1:], soft_mean), _ga(r[..., 1:], soft_mean, estimator="unbiased")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_identical_and_permutation(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(10)
    r = random_rewards(8, 9, ties=True, dtype=dtype, generator=g)
    for scale in ("group", "batch", "none"):
        for t, est in [(BestOfN(3), "unbiased"), (BestOfN(5), "plugin"), (SoftBestOfN(0.2), "plugin")]:
            out = _ga(r, t, estimator=est, scale=scale)
            for b in range(r.shape[0]):
                for value in r[b].unique():
                    tied = out.advantages[b][r[b] == value]
                    assert torch.equal(tied, tied[:1].expand_as(tied))
            perm = torch.randperm(9, generator=g)
            out_p = _ga(r[:, perm], t, estimator=est, scale=scale)
            # shaped is exact; the scale's sums run in input order, so the std may move by an ulp.
            assert torch.equal(out_p.shaped, out.shaped[:, perm])
            assert torch.equal(out_p.values, out.values)
            torch.testing.assert_close(out_p.advantages, out.advantages[:, perm],
                                       rtol=8 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_float32_against_float64(scale: str) -> None:
    g = torch.Generator().manual_seed(12)
    r = random_rewards(16, 16, ties=True, dtype=torch.float32, generator=g, m=2)
    obj = Objective([Criterion("a", BestOfN(4)), Criterion("b", SoftBestOfN(0.1))], SmoothMin([1, 1], 3.0))
    for estimator in ("plugin", "unbiased"):
        a32 = _ga(r, obj, estimator=estimator, scale=scale)
        a64 = _ga(r.double(), obj, estimator=estimator, scale=scale)
        for x32, x64 in zip(a32, a64, strict=True):
            assert x32.dtype == torch.float32
            # Measured worst: 1.5e-6 relative to the output scale for advantages.
            bound = 64 * EPS32 * max(1.0, float(x64.abs().max()))
            assert float((x32.double() - x64).abs().max()) <= bound


# --- property tests (hypothesis) ---------------------------------------------------------------


@st.composite
def _batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    B, G, m = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    values = draw(st.lists(st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 2.0]),
                                     st.floats(-50, 50, allow_nan=False, width=32)),
                           min_size=B * G * m, max_size=B * G * m))
    bits = draw(st.lists(st.booleans(), min_size=B * G, max_size=B * G))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n = draw(st.integers(1, G))
    return torch.tensor(values, dtype=dtype).reshape(B, G, m), torch.tensor(bits).reshape(B, G), n


@settings(max_examples=40, deadline=None)
@given(_batches(), st.sampled_from(["group", "batch", "none"]), st.sampled_from([1e-4, 0.0]))
def test_property_scaled_advantages(batch: tuple[torch.Tensor, torch.Tensor, int], scale: str,
                                    eps: float) -> None:
    r, valid, n = batch
    m = r.shape[-1]
    transforms = [BestOfN(n), SoftBestOfN(0.5), Mean()][:m]
    obj = Objective([Criterion(f"c{i}", t) for i, t in enumerate(transforms)], SmoothMin([1.0] * m, 1.0))
    out = _ga(r, obj, scale=scale, eps=eps, valid=valid)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    assert bool((out.advantages[~valid] == 0).all())
    # The exact float64 oracle, evaluated on the same (rounded) inputs.
    adv, shaped, values, _ = _oracle(r.double(), obj, "plugin", scale, eps, valid)
    tol = 1e-9 if r.dtype == torch.float64 else 1e-4
    big = max(1.0, float(r.abs().max()))
    torch.testing.assert_close(out.values.double(), values, rtol=0, atol=tol * big)
    torch.testing.assert_close(out.shaped.double(), shaped, rtol=0, atol=tol * big)
    if scale == "none" or eps > 0:  # with eps = 0 the division amplifies rounding of tiny stds
        torch.testing.assert_close(out.advantages.double(), adv, rtol=0,
                                   atol=tol * big / max(eps, 1e-2) if scale != "none" else tol * big)

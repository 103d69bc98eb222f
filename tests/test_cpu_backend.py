"""The C++ CPU backend (``impl="cpu"``) against the float64 reference, op by op.

Tolerances come from measured error: with float32 inputs the backend computes group statistics
in double and the token loss with ~1 ulp exps, and its measured error against the float64 oracle
is below 1e-7 relative (advantages, loss, metrics) and within a small multiple of the float32
reference's own error (per-token gradients); the bounds below are 1e-5 relative, as specified.
float64 agrees to ~1e-12 (bound 1e-10: a division by a small group std amplifies the rounding of
both sides; the unbiased weights of G = 1024 come from a ratio recurrence, ~1e-13).

Every test takes the ``cpu_ext`` fixture, which builds the extension on first use and skips the
test with the reason when it cannot be built (no compiler, no ninja).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import iama_kernels as ik
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
    group_values,
    nonlinear_grpo_loss,
    policy_loss,
)
from iama_kernels._dispatch import Call, choose
from iama_kernels.testing import (
    assert_matches_reference,
    policy_loss_by_loops,
    random_rewards,
    reference_pair,
    saturated_sapo_inputs,
)

REPO = Path(__file__).resolve().parent.parent
REL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _rel(dtype: torch.dtype) -> float:
    return REL[torch.float64 if dtype == torch.float64 else torch.float32]


def _check_all(out: tuple, oracle: tuple, rel: float) -> None:
    names = tuple(getattr(oracle, "_fields", range(len(oracle))))
    for name, a, b in zip(names, out, oracle, strict=True):
        if a is None or b is None:  # sequence_log_ratio with per-token ratios
            assert a is None and b is None, name
            continue
        assert a.dtype == b.dtype or b.dtype == torch.float64, name
        # kl: for |ref - logp| < 1/2 the kernels sum the series of exp(d) - d - 1 instead of
        # forming it, which is more accurate than the float64 oracle itself (its cancellation
        # leaves ~1e-10 relative error in the mean kl): a float64 kl is checked to 1e-9.
        tol = max(rel, 1e-9) if name == "kl" else rel
        assert_matches_reference(a.detach(), b.detach(), rel=tol, name=str(name))


TRANSFORMS = [Mean(), BestOfN(1), BestOfN(2), BestOfN(3), BestOfN(7), SoftBestOfN(0.3), SoftBestOfN(1e-6)]


# ------------------------------------------------------------------------------------------
# first_variation / group_values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 2, 3, 7, 13, 16, 100])
@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_variation_and_values_match_reference(cpu_ext, G, estimator, dtype):
    rewards = random_rewards(12, G, dtype=dtype) * 3 + 1e3  # an offset: the min shift must keep precision
    for transform in TRANSFORMS:
        if estimator == "unbiased" and isinstance(transform, BestOfN) and transform.n > G:
            continue
        s = first_variation(rewards, transform, estimator=estimator, impl="cpu")
        v = group_values(rewards, transform, estimator=estimator, impl="cpu")
        s64, s_ref = reference_pair(first_variation, rewards, transform, estimator=estimator)
        v64, _ = reference_pair(group_values, rewards, transform, estimator=estimator)
        assert s.dtype == s_ref.dtype
        assert_matches_reference(s, s64, rel=_rel(dtype), name=f"first_variation {transform}")
        assert_matches_reference(v, v64, rel=_rel(dtype), name=f"group_values {transform}")
        # Centred per group, and exactly 0 for constant groups (kind 3 of random_rewards).
        assert float(s.double().sum(-1).abs().max()) <= 1e-4 * max(1.0, float(s.abs().max()))
        assert torch.equal(s[3::4], torch.zeros_like(s[3::4]))


@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
@pytest.mark.parametrize("n", [2, 37, 512, 1024])
def test_large_groups_stay_finite_and_accurate(cpu_ext, estimator, n):
    """G = 1024 with any n: binomial weights without overflow (C(1023, 511) ~ 1e306)."""
    rewards = random_rewards(4, 1024, dtype=torch.float32, ties=False)
    for dtype in (torch.float32, torch.float64):
        r = rewards.to(dtype)
        s = first_variation(r, BestOfN(n), estimator=estimator, impl="cpu")
        v = group_values(r, BestOfN(n), estimator=estimator, impl="cpu")
        s64, _ = reference_pair(first_variation, r, BestOfN(n), estimator=estimator)
        v64, _ = reference_pair(group_values, r, BestOfN(n), estimator=estimator)
        assert torch.isfinite(s).all() and torch.isfinite(v).all()
        # float64: the recurrence's error (one rounding per step over ~1000 steps) bounds this.
        rel = 1e-5 if dtype == torch.float32 else 1e-10
        assert_matches_reference(s, s64, rel=rel, name="s")
        assert_matches_reference(v, v64, rel=rel, name="value")


def test_half_rewards_and_leading_dims(cpu_ext):
    rewards = random_rewards(6, 9, dtype=torch.float64).reshape(2, 3, 9)
    for dtype in (torch.float16, torch.bfloat16):
        r = rewards.to(dtype)
        s = first_variation(r, BestOfN(3), estimator="unbiased", impl="cpu")
        v = group_values(r, SoftBestOfN(0.5), impl="cpu")
        assert s.shape == (2, 3, 9) and s.dtype == torch.float32 and v.shape == (2, 3)
        s64, _ = reference_pair(first_variation, r, BestOfN(3), estimator="unbiased")
        v64, _ = reference_pair(group_values, r, SoftBestOfN(0.5))
        assert_matches_reference(s, s64, rel=1e-5)
        assert_matches_reference(v, v64, rel=1e-5)


# ------------------------------------------------------------------------------------------
# group_advantages
# ------------------------------------------------------------------------------------------

OBJECTIVES = {
    "sum": Objective([Criterion("a", BestOfN(4)), Criterion("b", SoftBestOfN(0.2)), Criterion("c", Mean())],
                     WeightedSum([0.5, 0.3, 0.2])),
    "min": Objective([Criterion("a", BestOfN(3)), Criterion("b", BestOfN(2))], Min()),
    "smooth": Objective([Criterion("a", BestOfN(5)), Criterion("b", SoftBestOfN(0.5))],
                        SmoothMin([1, 2], 3.0)),
    "single": BestOfN(4),
}


def _rewards_for(objective, B: int, G: int, dtype: torch.dtype, ties: bool = True) -> torch.Tensor:
    m = len(ik.objectives.as_objective(objective))
    r = random_rewards(B, G, m=m, dtype=dtype, ties=ties)
    r[3::4] = r[3::4, :1]  # constant groups (already so with ties)
    return r[..., 0] if isinstance(objective, BestOfN) else r


# (objective, G, estimator) with G >= n where the estimator is unbiased; G = 3 runs the plug-in
# estimator with n > G.
ADVANTAGE_CASES = [
    (name, G, estimator)
    for name in OBJECTIVES
    for G in (3, 8, 13)
    for estimator in ("plugin", "unbiased")
    if estimator == "plugin" or ik.objectives.as_objective(OBJECTIVES[name]).max_n() <= G
]


@pytest.mark.parametrize(("name", "G", "estimator"), ADVANTAGE_CASES)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(cpu_ext, name, G, scale, estimator):
    objective = OBJECTIVES[name]
    for dtype in (torch.float32, torch.float64):
        for eps in (1e-4, 0.0):
            # eps = 0 divides by the std: groups whose first variation is constant only up to
            # rounding (binary rewards with few zeros under BestOfN) give rounding noise divided by
            # its own std in every implementation, so eps = 0 runs on continuous rewards.
            rewards = _rewards_for(objective, 9, G, dtype, ties=eps > 0)
            kw = dict(estimator=estimator, scale=scale, eps=eps)
            out = group_advantages(rewards, objective, impl="cpu", **kw)
            oracle, ref = reference_pair(group_advantages, rewards, objective, **kw)
            assert [t.dtype for t in out] == [t.dtype for t in ref]
            _check_all(out, oracle, _rel(dtype))
            # constant groups (every 4th) get exactly 0
            assert torch.equal(out.advantages[3::4], torch.zeros_like(out.advantages[3::4]))


@pytest.mark.parametrize("name", ["smooth", "single"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
def test_group_advantages_with_valid_mask(cpu_ext, name, scale, estimator):
    objective = OBJECTIVES[name]
    B, G = 16, 11
    rewards = _rewards_for(objective, B, G, torch.float32)
    gen = torch.Generator().manual_seed(1)
    valid = torch.rand(B, G, generator=gen) < 0.7
    valid[0] = False  # an empty group: value 0, left out of the batch values
    valid[1] = True
    valid[2, :5] = True  # at least n = 5 valid samples where the group is not empty
    valid[2, 5:] = False
    counts = valid.sum(-1)
    valid[(counts > 0) & (counts < 5)] = True
    rewards[~valid] = float("nan")  # invalid samples are never read into the arithmetic
    kw = dict(estimator=estimator, scale=scale, valid=valid)
    out = group_advantages(rewards, objective, impl="cpu", **kw)
    oracle, _ = reference_pair(group_advantages, rewards, objective, **kw)
    _check_all(out, oracle, 1e-5)
    assert torch.equal(out.advantages[~valid], torch.zeros_like(out.advantages[~valid]))
    assert torch.equal(out.values[0], torch.zeros_like(out.values[0]))


def test_group_advantages_with_criterion_weights(cpu_ext):
    objective = OBJECTIVES["min"]
    rewards = random_rewards(10, 6, m=2, dtype=torch.float32)
    for weights in ([0.25, 0.75], torch.tensor([1.0, 0.0], dtype=torch.float64)):
        out = group_advantages(rewards, objective, criterion_weights=weights, impl="cpu")
        oracle, _ = reference_pair(group_advantages, rewards, objective, criterion_weights=weights)
        _check_all(out, oracle, 1e-5)


def test_group_advantages_large_group(cpu_ext):
    objective = Objective([Criterion("a", BestOfN(300)), Criterion("b", BestOfN(1024))])
    rewards = random_rewards(4, 1024, m=2, dtype=torch.float32)
    out = group_advantages(rewards, objective, estimator="unbiased", impl="cpu")
    oracle, _ = reference_pair(group_advantages, rewards, objective, estimator="unbiased")
    _check_all(out, oracle, 1e-5)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize(("G", "second"), [(13, SoftBestOfN(0.3)), (16, SoftBestOfN(0.3)), (16, Mean())])
def test_ties_are_bit_identical_whatever_the_order(cpu_ext, m, scale, G, second):
    """Tied samples get identical outputs, and permuting a group permutes its outputs bit for bit
    (every reduction inside a group runs in a canonical order). G = 13 takes the general path,
    G = 16 the fixed-size one (and with BestOfN/Mean criteria in float32, its AVX-512 kernel)."""
    objective = Objective([Criterion(f"c{i}", t) for i, t in enumerate([BestOfN(4), second][:m])])
    B = 8
    for dtype in (torch.float32, torch.float64):
        base = random_rewards(B, 5, m=m, dtype=dtype)
        rewards = base[:, torch.arange(G) % 5]  # every sample has 1-2 exact copies
        for estimator in ("plugin", "unbiased"):
            out = group_advantages(rewards, objective, estimator=estimator, scale=scale, impl="cpu")
            adv = out.advantages
            for j in range(G):
                assert torch.equal(adv[:, j], adv[:, j % 5]), "tied samples differ"
            perm = torch.randperm(G)
            kw = dict(estimator=estimator, scale=scale, impl="cpu")
            out_p = group_advantages(rewards[:, perm], objective, **kw)
            assert torch.equal(out_p.advantages, adv[:, perm])
            assert torch.equal(out_p.shaped, out.shaped[:, perm])
            assert torch.equal(out_p.values, out.values)
            t0 = objective.transforms[0]
            s = first_variation(rewards[..., 0], t0, estimator=estimator, impl="cpu")
            s_p = first_variation(rewards[:, perm, 0], t0, estimator=estimator, impl="cpu")
            assert torch.equal(s_p, s[:, perm])


@pytest.mark.parametrize("G", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_size_groups_equal_the_general_path_bit_for_bit(cpu_ext, G, dtype):
    """Groups of 4/8/16/32/64 without a valid mask take the fixed-size kernels (compile-time G;
    for G = 16 float32 with Mean/BestOfN criteria and scale group/none, the AVX-512 kernel where
    the CPU has it); an all-true valid mask sends the same batch through the general path. Both
    round alike, so they must agree bit for bit, ties (exact copies, constant groups), strides and
    eps = 0 included; and the fixed path is checked against the float64 reference."""
    ops = torch.ops.iama
    gen = torch.Generator().manual_seed(G)
    B = 11
    for m, kinds in ((1, [1]), (2, [1, 1]), (2, [1, 0]), (3, [0, 1, 2])):
        rewards = torch.randn(B, G, m, generator=gen, dtype=dtype)
        rewards[::3] = torch.randint(0, 3, rewards[::3].shape, generator=gen).to(dtype)  # ties
        rewards[4] = 0.5  # a constant group
        ns = [min(4, G) if k == 1 else 1 for k in kinds]
        taus = [0.3] * m
        lam = torch.rand(m, generator=gen, dtype=dtype)
        all_valid = torch.ones(B, G, dtype=torch.bool)
        strided = rewards.permute(1, 0, 2).contiguous().permute(1, 0, 2)
        for estimator in ("plugin", "unbiased"):
            for scale in ("group", "batch", "none"):
                for eps in (1e-4, 0.0):
                    args = (lam, kinds, ns, taus, estimator, scale, eps)
                    fixed = ops.group_advantages(rewards, None, *args)
                    general = ops.group_advantages(rewards, all_valid, *args)
                    other_strides = ops.group_advantages(strided, None, *args)
                    for a, b, c in zip(fixed, general, other_strides, strict=True):
                        assert torch.equal(a, b) and torch.equal(a, c), (m, kinds, estimator, scale, eps)
    # against the reference, on continuous rewards (BestOfN(4) + Mean)
    objective = Objective([Criterion("a", BestOfN(min(4, G))), Criterion("b", Mean())],
                          WeightedSum([0.7, 0.3]))
    rewards = torch.randn(64, G, 2, generator=gen, dtype=dtype)
    for estimator in ("plugin", "unbiased"):
        out = group_advantages(rewards, objective, estimator=estimator, impl="cpu")
        oracle, _ = reference_pair(group_advantages, rewards, objective, estimator=estimator)
        _check_all(out, oracle, _rel(dtype))


def test_non_contiguous_rewards(cpu_ext):
    objective = OBJECTIVES["smooth"]
    rewards = random_rewards(8, 7, m=2, dtype=torch.float32)
    expected = group_advantages(rewards, objective, estimator="unbiased", impl="cpu")
    transposed = rewards.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    sliced = torch.stack([rewards, rewards], -1)[..., 0]  # strides (28, 4, 2)
    for r in (transposed, sliced, rewards[..., [0, 1]]):
        out = group_advantages(r, objective, estimator="unbiased", impl="cpu")
        for a, b in zip(out, expected, strict=True):
            assert torch.equal(a, b)
    # and a strided 2-D batch for first_variation
    wide = random_rewards(6, 10, dtype=torch.float64)
    s = first_variation(wide.t().contiguous().t(), BestOfN(3), impl="cpu")
    assert torch.equal(s, first_variation(wide, BestOfN(3), impl="cpu"))


# ------------------------------------------------------------------------------------------
# policy_loss
# ------------------------------------------------------------------------------------------


def _token_inputs(S: int, T: int, dtype: torch.dtype, *, seed: int = 0, mask_kind: str = "bool"):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(S, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(S, T, generator=gen, dtype=torch.float64)
    keep = torch.rand(S, T, generator=gen) < 0.8
    keep[1] = False  # an empty row
    adv = torch.randn(S, generator=gen, dtype=torch.float64)
    logp = torch.where(keep, logp, torch.nan)  # padding may hold NaN: never read
    old = torch.where(keep, old, torch.inf)
    if mask_kind == "bool":
        mask = keep
    elif mask_kind == "int":
        mask = keep.to(torch.int32) * 2
    elif mask_kind == "int64":  # read as is by the kernel (TRL's and verl's masks); weights 1-3
        mask = keep.to(torch.int64) * torch.randint(1, 4, (S, T), generator=gen)
    else:
        mask = keep.to(torch.float32) * torch.rand(S, T, generator=gen).add(0.5)
    return logp.to(dtype), old.to(dtype), ref.to(dtype), adv.to(torch.float32), mask


def _loss_and_grad(impl: str, logp, *args, **kwargs):
    x = logp.detach().clone().requires_grad_(True)
    out = policy_loss(x, *args, impl=impl, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "int", "int64", "float"])
def test_policy_loss_matches_reference(cpu_ext, loss_type, dtype, mask_kind):
    S, T = 9, 131  # odd sizes: tiles of 64 tokens plus a tail
    logp, old, ref, adv, mask = _token_inputs(S, T, dtype, mask_kind=mask_kind)
    for beta, with_old, with_ref in ((0.04, True, True), (0.0, False, False), (0.1, False, True)):
        kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, loss_type=loss_type,
                  max_completion_length=150 if loss_type == "dr_grpo" else None)
        o = old if with_old else None
        r = ref if with_ref else None
        out, grad = _loss_and_grad("cpu", logp, o, r, adv, mask, **kw)
        ref_out, ref_grad = _loss_and_grad("reference", logp, o, r, adv, mask, **kw)
        o64 = None if o is None else o.double()
        r64 = None if r is None else r.double()
        oracle, grad64 = _loss_and_grad("reference", logp.double(), o64, r64, adv, mask, **kw)
        assert out.loss.dtype == ref_out.loss.dtype and grad.dtype == logp.dtype
        # the inputs are exactly the same numbers in every dtype: the error is the kernel's own
        _check_all(out, oracle, _rel(dtype))
        assert_matches_reference(grad, grad64, ref_grad, factor=2.0, rel=_rel(dtype), name="grad")
        padding = mask == 0
        assert torch.isfinite(grad).all() and torch.equal(grad[padding], torch.zeros_like(grad[padding]))


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_policy_loss_ratio_weighted_kl_matches_reference(cpu_ext, loss_type, dtype, mask_kind):
    """kl_weight="ratio" (TRL's bias-corrected KL); float32 + bool takes the templated row, not
    the hand-vectorised one, which has no ratio-weighted KL."""
    S, T = 9, 131
    logp, old, ref, adv, mask = _token_inputs(S, T, dtype, mask_kind=mask_kind)
    for with_old in (True, False):
        o = old if with_old else None
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.07, loss_type=loss_type, kl_weight="ratio",
                  max_completion_length=150 if loss_type == "dr_grpo" else None)
        out, grad = _loss_and_grad("cpu", logp, o, ref, adv, mask, **kw)
        _, ref_grad = _loss_and_grad("reference", logp, o, ref, adv, mask, **kw)
        o64 = None if o is None else o.double()
        oracle, grad64 = _loss_and_grad("reference", logp.double(), o64, ref.double(), adv, mask, **kw)
        _check_all(out, oracle, _rel(dtype))
        assert_matches_reference(grad, grad64, ref_grad, factor=2.0, rel=_rel(dtype), name="grad")
        _, plain_grad = _loss_and_grad("cpu", logp, o, ref, adv, mask, **dict(kw, kl_weight="none"))
        assert not torch.equal(grad, plain_grad)


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_policy_loss_dual_clip_matches_reference(cpu_ext, loss_type, dtype, mask_kind):
    """dual_clip (verl's clip_ratio_c): float32 + bool takes the hand-vectorised AVX-512 row
    (on such a CPU), the others the templated row."""
    S, T = 9, 131
    logp, old, ref, adv, mask = _token_inputs(S, T, dtype, mask_kind=mask_kind)
    adv[::2] = -adv[::2].abs()  # rows with negative advantages, where the dual clip acts
    for beta, r, kl_weight in ((0.0, None, "none"), (0.05, ref, "none"), (0.05, ref, "ratio")):
        kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, loss_type=loss_type, kl_weight=kl_weight,
                  dual_clip=1.2, max_completion_length=150 if loss_type == "dr_grpo" else None)
        out, grad = _loss_and_grad("cpu", logp, old, r, adv, mask, **kw)
        _, ref_grad = _loss_and_grad("reference", logp, old, r, adv, mask, **kw)
        r64 = None if r is None else r.double()
        oracle, grad64 = _loss_and_grad("reference", logp.double(), old.double(), r64, adv, mask, **kw)
        assert float(oracle.dual_clip_fraction) > 0.02
        _check_all(out, oracle, _rel(dtype))
        assert_matches_reference(grad, grad64, ref_grad, factor=2.0, rel=_rel(dtype), name="grad")
        _, plain_grad = _loss_and_grad("cpu", logp, old, r, adv, mask, **dict(kw, dual_clip=None))
        assert not torch.equal(grad, plain_grad)


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_policy_loss_token_advantages_match_reference(cpu_ext, loss_type, dtype, mask_kind):
    """[S, T] advantages (the templated rows' kTokenAdv; float32 + bool leaves the AVX-512 row),
    NaN under the mask, rows of any stride, with and without the dual clip and the ratio KL."""
    S, T = 9, 131
    logp, old, ref, _, mask = _token_inputs(S, T, dtype, mask_kind=mask_kind)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(S, T + 3, generator=gen)  # rows with a stride: read in place
    adv = torch.where(mask != 0, wide[:, :T], torch.nan)
    for kl_weight, dual_clip, kind in (("none", None, loss_type), ("ratio", 1.2, loss_type)):
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, loss_type=kind, kl_weight=kl_weight,
                  dual_clip=dual_clip, max_completion_length=150 if kind == "dr_grpo" else None)
        out, grad = _loss_and_grad("cpu", logp, old, ref, adv, mask, **kw)
        _, ref_grad = _loss_and_grad("reference", logp, old, ref, adv, mask, **kw)
        oracle, grad64 = _loss_and_grad("reference", logp.double(), old.double(), ref.double(), adv.double(),
                                        mask, **kw)
        _check_all(out, oracle, _rel(dtype))
        assert_matches_reference(grad, grad64, ref_grad, factor=2.0, rel=_rel(dtype), name="grad")
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_policy_loss_sequence_ratio_matches_reference(cpu_ext, loss_type, dtype, mask_kind):
    """ratio_level="sequence" (GSPO): the row's mean log-ratio first, then the row with old := logp
    and the mean added (float32 + bool: the AVX-512 row's kSeq build; the others the templated row),
    with row and per-token advantages, the dual clip and the ratio KL."""
    S, T = 9, 131
    logp, old, ref, adv, mask = _token_inputs(S, T, dtype, mask_kind=mask_kind)
    shift = torch.linspace(-0.5, 0.5, S, dtype=torch.float64).unsqueeze(1)  # rows on both sides of the clip
    logp = (logp.double() + shift).to(dtype)
    adv[::2] = -adv[::2].abs()
    noise = torch.randn(S, T, generator=torch.Generator().manual_seed(6))
    token_adv = torch.where(mask != 0, noise, torch.nan)
    for a, r, kl_weight, dual_clip in ((adv, None, "none", None), (adv, ref, "none", 1.2),
                                       (adv, ref, "ratio", None), (token_adv, ref, "none", 1.2)):
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.0 if r is None else 0.05, loss_type=loss_type,
                  kl_weight=kl_weight, dual_clip=dual_clip, ratio_level="sequence",
                  max_completion_length=150 if loss_type == "dr_grpo" else None)
        out, grad = _loss_and_grad("cpu", logp, old, r, a, mask, **kw)
        _, ref_grad = _loss_and_grad("reference", logp, old, r, a, mask, **kw)
        r64 = None if r is None else r.double()
        oracle, grad64 = _loss_and_grad("reference", logp.double(), old.double(), r64, a.double(), mask, **kw)
        assert float(oracle.clip_fraction) > 0.05
        _check_all(out, oracle, _rel(dtype))
        assert_matches_reference(grad, grad64, ref_grad, factor=2.0, rel=_rel(dtype), name="grad")
        assert torch.isfinite(grad).all()
        _, token_grad = _loss_and_grad("cpu", logp, old, r, a, mask, **dict(kw, ratio_level="token"))
        assert not torch.equal(grad, token_grad)


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_policy_loss_surrogates_match_reference(cpu_ext, surrogate, dtype, mask_kind):
    """CISPO and SAPO (float32 with a bool mask and row advantages: the AVX-512 row's kSurr builds
    where the CPU has AVX-512; the others the templated row's) with row and per-token advantages,
    both ratio levels and the ratio KL."""
    S, T = 9, 131
    logp, old, ref, adv, mask = _token_inputs(S, T, dtype, mask_kind=mask_kind)
    shift = torch.linspace(-0.5, 0.5, S, dtype=torch.float64).unsqueeze(1)  # ratios off the range
    logp = (logp.double() + shift).to(dtype)
    adv[::2] = -adv[::2].abs()
    noise = torch.randn(S, T, generator=torch.Generator().manual_seed(6))
    token_adv = torch.where(mask != 0, noise, torch.nan)
    for loss_type, a, r, kl_weight, level in (("grpo", adv, None, "none", "token"),
                                              ("token", adv, ref, "ratio", "sequence"),
                                              ("dr_grpo", token_adv, ref, "none", "token"),
                                              ("grpo", token_adv, ref, "ratio", "sequence")):
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.0 if r is None else 0.05, loss_type=loss_type,
                  kl_weight=kl_weight, ratio_level=level, surrogate=surrogate, tau_pos=1.2, tau_neg=0.8)
        out, grad = _loss_and_grad("cpu", logp, old, r, a, mask, **kw)
        _, ref_grad = _loss_and_grad("reference", logp, old, r, a, mask, **kw)
        r64 = None if r is None else r.double()
        oracle, grad64 = _loss_and_grad("reference", logp.double(), old.double(), r64, a.double(), mask, **kw)
        if surrogate == "cispo":
            assert float(oracle.clip_fraction) > 0.05 and float(oracle.clip_high_fraction) > 0.01
        _check_all(out, oracle, _rel(dtype))
        assert_matches_reference(grad, grad64, ref_grad, factor=2.0, rel=_rel(dtype), name="grad")
        assert torch.isfinite(grad).all()
        _, clip_grad = _loss_and_grad("cpu", logp, old, r, a, mask, **dict(kw, surrogate="clip"))
        assert not torch.equal(grad, clip_grad)


@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_policy_loss_row_stats_match_reference(cpu_ext, surrogate, mask_kind):
    """row_stats=True: the token pass's own per-row sums (mask total, clipped, clipped above), for
    the AVX-512 row (float32, bool mask, clip) and the templated ones, row and per-token advantages."""
    logp, old, ref, adv, mask = _token_inputs(9, 131, torch.float32, mask_kind=mask_kind)
    logp = logp + torch.linspace(-0.5, 0.5, 9).unsqueeze(1)
    token_adv = torch.randn(9, 131, generator=torch.Generator().manual_seed(3))
    for a in (adv, token_adv):
        kw = dict(beta=0.05, surrogate=surrogate, row_stats=True)
        out, grad = _loss_and_grad("cpu", logp, old, ref, a, mask, **kw)
        want, _ = _loss_and_grad("reference", logp.double(), old.double(), ref.double(), a.double(), mask,
                                 **kw)
        assert out.row_clip_weights.dtype == torch.float32 and out.row_clip_weights.shape == (9, 3)
        torch.testing.assert_close(out.row_clip_weights.double(), want.row_clip_weights, rtol=1e-6, atol=1e-6)
        if surrogate != "sapo":
            assert float(want.row_clip_weights[:, 1].sum()) > 1
        plain, plain_grad = _loss_and_grad("cpu", logp, old, ref, a, mask, **dict(kw, row_stats=False))
        assert plain.row_clip_weights is None and torch.equal(plain_grad, grad)


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
def test_policy_loss_surrogates_mixed_dtypes_and_layouts(cpu_ext, surrogate):
    """bfloat16 logp with float32 old/ref, float16, float32 logp with float64 old, strided rows,
    and TRL's CISPO bound (eps_low = 1: no lower bound)."""
    logp, old, ref, adv, mask = _token_inputs(6, 40, torch.float32)
    kw = dict(beta=0.02, surrogate=surrogate, eps_low=1.0 if surrogate == "cispo" else 0.2, eps_high=0.1)
    for lp, o in ((logp.bfloat16(), old), (logp.half(), old.half()), (logp, old.double()),
                  (logp.t().contiguous().t(), old)):
        r = ref if o.dtype != torch.float16 else ref.half()
        out, grad = _loss_and_grad("cpu", lp, o, r, adv, mask, **kw)
        ref_out, ref_grad = _loss_and_grad("reference", lp, o, r, adv, mask, **kw)
        _check_all(out, ref_out, 1e-5)
        assert grad.dtype == lp.dtype
        assert_matches_reference(grad, ref_grad.double(), rel=1e-5 if lp.dtype == torch.float32 else 1e-2)


def test_policy_loss_sapo_saturated_gate(cpu_ext):
    """The saturated gate's derivative is 0 (not 0 * inf), as the reference's."""
    logp, old, adv, mask = saturated_sapo_inputs()
    for tau in (1.0, 100.0):
        kw = dict(surrogate="sapo", tau_pos=tau, tau_neg=tau)
        out, grad = _loss_and_grad("cpu", logp, old, None, adv, mask, **kw)
        want, want_grad = _loss_and_grad("reference", logp, old, None, adv, mask, **kw)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and grad[0, :4].eq(0).all()
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_policy_loss_surrogate_errors_from_the_op(cpu_ext):
    """The op checks its own options (a caller of torch.ops.iama skips the Python checks)."""
    logp, old, ref, adv, mask = _token_inputs(3, 8, torch.float32)
    op = torch.ops.iama.policy_loss_fwd
    base = (logp, old, ref, adv, mask, 0.2, 0.2, 0.0, "grpo", None, False)
    with pytest.raises(ValueError, match="surrogate must be 'clip', 'cispo', 'sapo', 'vespo', 'dppo_tv', "
                                         "'dppo_kl' or 'gmpo', got 'ppo'"):
        op(*base, None, False, "ppo")
    with pytest.raises(ValueError, match="tau_pos and tau_neg must be finite and > 0"):
        op(*base, None, False, "sapo", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"dual_clip applies to surrogate='clip' \(and DPPO's weight cap\)"):
        op(*base, 2.0, False, "cispo")


def test_policy_loss_sequence_ratio_mixed_dtypes(cpu_ext):
    """bfloat16 logp with float32 old (the loss pass reads logp converted to old's dtype),
    float16, strided rows, and no old_logp (every ratio 1, every l_i 0)."""
    logp, old, ref, adv, mask = _token_inputs(6, 40, torch.float32)
    no_old, _ = _loss_and_grad("cpu", logp, None, ref, adv, mask, beta=0.02, ratio_level="sequence")
    token, _ = _loss_and_grad("cpu", logp, None, ref, adv, mask, beta=0.02)
    assert all(torch.equal(a, b) for a, b in zip(no_old[:7], token[:7], strict=True))
    assert torch.equal(no_old.sequence_log_ratio, torch.zeros(6))
    for lp, o in ((logp.bfloat16(), old), (logp.half(), old.half()), (logp, old.double()),
                  (logp.t().contiguous().t(), old)):
        out, grad = _loss_and_grad("cpu", lp, o, ref, adv, mask, beta=0.02, ratio_level="sequence")
        ref_out, ref_grad = _loss_and_grad("reference", lp, o, ref, adv, mask, beta=0.02,
                                           ratio_level="sequence")
        _check_all(out, ref_out, 1e-5)
        assert grad.dtype == lp.dtype
        assert_matches_reference(grad, ref_grad.double(), rel=1e-5 if lp.dtype == torch.float32 else 1e-2)


def test_policy_loss_matches_the_loop_oracle(cpu_ext):
    logp, old, ref, adv, mask = _token_inputs(5, 70, torch.float64, mask_kind="float")
    for loss_type in ("grpo", "token", "dr_grpo"):
        out, grad = _loss_and_grad("cpu", logp, old, ref, adv, mask, beta=0.05, loss_type=loss_type)
        oracle = policy_loss_by_loops(logp, old, ref, adv, mask, beta=0.05, loss_type=loss_type)
        for a, b in ((out.loss.detach(), oracle.loss), (out.clip_fraction, oracle.clip_fraction),
                     (out.ratio_mean, oracle.ratio_mean), (grad, oracle.grad)):
            assert_matches_reference(a, b, rel=1e-12)
        # kl: the kernel's series for small |d| is more accurate than exp(d) - d - 1 in float64
        assert_matches_reference(out.kl, oracle.kl, rel=1e-9)


@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo", "vespo", "dppo_tv", "dppo_kl", "gmpo"])
def test_policy_loss_float64_every_flag_combination(cpu_ext, surrogate):
    """float64 rows take one kernel build with run-time flags (kRuntimeFlags in
    csrc/include/iama/loss.h) where the other dtypes have one per combination: every surrogate
    with row and per-token advantages, plain and ratio KL, with and without a dual clip where it
    applies, every mask kind, against the float64 reference."""
    S, T = 7, 133
    duals = [None, 3.0] if surrogate in ("clip", "dppo_tv", "dppo_kl") else [None]
    for mask_kind in ("bool", "int64", "float"):
        logp, old, ref, adv, mask = _token_inputs(S, T, torch.float64, mask_kind=mask_kind, seed=3)
        gen = torch.Generator().manual_seed(4)
        adv_tok = torch.randn(S, T, generator=gen, dtype=torch.float64)
        for a, kl_weight, dual in itertools.product((adv, adv_tok), ("none", "ratio"), duals):
            kw = dict(beta=0.05, kl_weight=kl_weight, dual_clip=dual, surrogate=surrogate, eps_high=0.28)
            out, grad = _loss_and_grad("cpu", logp, old, ref, a, mask, **kw)
            oracle, grad64 = _loss_and_grad("reference", logp, old, ref, a, mask, **kw)
            _check_all(out, oracle, _rel(torch.float64))
            assert_matches_reference(grad, grad64, rel=_rel(torch.float64), name="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", [{}, {"surrogate": "cispo"}, {"ratio_level": "sequence"},
                                     {"surrogate": "vespo", "kl_weight": "ratio"}, {"dual_clip": 3.0}])
def test_policy_loss_binary_masks_of_every_type_equal_the_bool_mask(cpu_ext, dtype, options):
    """A mask of 0s and 1s of any type (TRL's and verl's int64, int32, uint8, float) is narrowed
    to bytes row by row and takes the bool mask's rows: the same results, bit for bit; a mask
    whose rows mix 0/1 rows and weighted ones takes each row's route and matches the reference."""
    S, T = 9, 131
    logp, old, ref, adv, keep = _token_inputs(S, T, dtype, seed=5)
    kw = dict(beta=0.05, eps_high=0.28, **options)
    want, want_grad = _loss_and_grad("cpu", logp, old, ref, adv, keep, **kw)
    for mask_dtype in (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64, torch.float16):
        out, grad = _loss_and_grad("cpu", logp, old, ref, adv, keep.to(mask_dtype), **kw)
        for name, a, b in zip(out._fields, out, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b), (mask_dtype, name)
        assert torch.equal(grad, want_grad), mask_dtype
    weighted = keep.to(torch.int64)
    weighted[3] *= 2  # a weighted row between 0/1 rows
    weighted[6, 5] = 3
    for mask in (weighted, weighted.to(torch.float32)):
        out, grad = _loss_and_grad("cpu", logp, old, ref, adv, mask, **kw)
        oracle, grad64 = _loss_and_grad("reference", logp.double(), old.double(), ref.double(), adv, mask,
                                        **kw)
        _, ref_grad = _loss_and_grad("reference", logp, old, ref, adv, mask, **kw)  # its own rounding
        _check_all(out, oracle, _rel(dtype))
        assert_matches_reference(grad, grad64, ref_grad, factor=2.0, rel=_rel(dtype), name="grad")
        assert not torch.equal(out.loss, want.loss)  # the weights count


def test_policy_loss_mixed_dtypes_and_layouts(cpu_ext):
    S, T = 6, 40
    logp, old, ref, adv, mask = _token_inputs(S, T, torch.float32)
    cases = {
        "bf16 logp, f32 old/ref": (logp.bfloat16(), old, ref),
        "f16 logp, f16 old, f32 ref": (logp.half(), old.half(), ref),
        "f32 logp, f64 old": (logp, old.double(), ref),
        "transposed": (logp.t().contiguous().t(), old.t().contiguous().t(), ref),
        "sliced": (torch.cat([logp, logp], 1)[:, :T], torch.cat([old, old], 1)[:, T:], ref[:, :]),
    }
    for name, (lp, o, r) in cases.items():
        out, grad = _loss_and_grad("cpu", lp, o, r, adv, mask, beta=0.02)
        ref_out, ref_grad = _loss_and_grad("reference", lp, o, r, adv, mask, beta=0.02)
        _check_all(out, ref_out, 1e-5)
        assert grad.dtype == lp.dtype, name
        tol = 1e-5 if lp.dtype == torch.float32 else 1e-2
        assert_matches_reference(grad, ref_grad.double(), rel=tol, name=name)
    # a non-contiguous mask, and an int64 one in rows of a wider tensor (read with its row stride)
    out, _ = _loss_and_grad("cpu", logp, old, ref, adv, mask.t().contiguous().t(), beta=0.02)
    expected, expected_grad = _loss_and_grad("cpu", logp, old, ref, adv, mask, beta=0.02)
    assert torch.equal(out.loss, expected.loss)
    wide = torch.cat([mask.long(), 1 - mask.long()], 1)
    out, grad = _loss_and_grad("cpu", logp, old, ref, adv, wide[:, :T], beta=0.02)
    assert torch.equal(out.loss, expected.loss) and torch.equal(grad, expected_grad)


def test_policy_loss_backward_scales_by_grad_output(cpu_ext):
    logp, old, ref, adv, mask = _token_inputs(4, 20, torch.float32)
    x = logp.clone().requires_grad_(True)
    out = policy_loss(x, old, ref, adv, mask, beta=0.1, impl="cpu")
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(3 * out.loss, x)
    assert torch.allclose(g3, 3 * g1, rtol=1e-6, atol=0)
    assert not out.kl.requires_grad and not out.clip_fraction.requires_grad


@pytest.mark.parametrize("op", ["policy_loss", "nonlinear_grpo_loss"])
def test_backward_of_one_reuses_nothing_that_later_backwards_read(cpu_ext, op):
    """A grad_output of 1 hands the saved gradient to autograd as is (no multiply): repeated
    backwards with retain_graph, in-place changes to ``x.grad`` in between, and a scaled loss
    (grad_output 2.5) must all still see the original gradient, against the float64 reference."""
    B, G, T = 2, 4, 20
    logp, old, ref, adv, mask = _token_inputs(B * G, T, torch.float32)
    rewards = torch.randn(B, G, 3, generator=torch.Generator().manual_seed(3))

    def run(x: torch.Tensor, impl: str) -> torch.Tensor:
        if op == "policy_loss":
            return policy_loss(x, old, ref, adv, mask, beta=0.1, impl=impl).loss
        return nonlinear_grpo_loss(x, old, ref, mask, rewards, OBJECTIVES["sum"], beta=0.1, impl=impl).loss

    x64 = logp.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(run(x64, "reference"), x64)
    x = logp.clone().requires_grad_(True)
    loss = run(x, "cpu")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    assert_matches_reference(first, expected, rel=1e-5, name="grad")
    loss.backward(retain_graph=True)  # accumulates in place into x.grad
    assert torch.equal(x.grad, first + first)
    x.grad.zero_()  # an in-place write to x.grad must not reach the saved gradient
    loss.backward(retain_graph=True)
    assert torch.equal(x.grad, first)
    x.grad = None
    (2.5 * loss).backward(retain_graph=True)
    assert torch.equal(x.grad, first * 2.5)
    x.grad = None
    loss.backward()  # the last backward frees the graph (the saved gradient may be taken over)
    assert torch.equal(x.grad, first)
    # a fresh graph, freed by its first backward
    x.grad = None
    run(x, "cpu").backward()
    assert torch.equal(x.grad, first)


def test_backward_of_one_hands_over_the_saved_gradient(cpu_ext):
    """With a grad_output of 1 and a graph that is being freed, x.grad is the gradient the forward
    op wrote (no multiply, no copy); with retain_graph=True it is a copy."""
    logp, old, ref, adv, mask = _token_inputs(4, 30, torch.float32)
    x = logp.clone().requires_grad_(True)
    for retain in (False, True):
        x.grad = None
        loss, *_, token_grad = torch.ops.iama.policy_loss_fwd(x, old, ref, adv, mask, 0.2, 0.2, 0.1, "grpo",
                                                              None)
        loss.backward(retain_graph=retain)
        assert torch.equal(x.grad, token_grad)
        assert (x.grad.data_ptr() == token_grad.data_ptr()) == (not retain)


def test_empty_and_fully_masked_batches(cpu_ext):
    for S, T in ((0, 5), (3, 0), (4, 6)):
        logp = torch.zeros(S, T)
        mask = torch.zeros(S, T, dtype=torch.bool)
        adv = torch.ones(S)
        for level in ("token", "sequence"):
            out = policy_loss(logp, logp, None, adv, mask, ratio_level=level, impl="cpu")
            expected = policy_loss(logp, logp, None, adv, mask, ratio_level=level, impl="reference")
            for a, b in zip(out, expected, strict=True):
                assert (a is None and b is None) or torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# nonlinear_grpo_loss
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sum", "smooth", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonlinear_grpo_loss_matches_reference(cpu_ext, name, dtype):
    objective = OBJECTIVES[name]
    B, G, T = 5, 7, 45
    rewards = _rewards_for(objective, B, G, torch.float64 if dtype == torch.float64 else torch.float32)
    logp, old, ref, _, mask = _token_inputs(B * G, T, dtype)
    kw = dict(estimator="unbiased", scale="group", beta=0.04, loss_type="token")
    x = logp.clone().requires_grad_(True)
    out = nonlinear_grpo_loss(x, old, ref, mask, rewards, objective, impl="cpu", **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    x64 = logp.double().requires_grad_(True)
    oracle = nonlinear_grpo_loss(x64, old.double(), ref.double(), mask, rewards.double(), objective,
                                 impl="reference", **kw)
    (grad64,) = torch.autograd.grad(oracle.loss, x64)
    rel = _rel(dtype)
    _check_all(out, oracle, rel)
    assert grad.dtype == dtype
    assert_matches_reference(grad, grad64, rel=rel if dtype != torch.bfloat16 else 1e-2, name="grad")
    # the one-pass op equals the two ops run separately, bit for bit
    adv = group_advantages(rewards, objective, estimator="unbiased", impl="cpu").advantages
    sep = policy_loss(logp, old, ref, adv.reshape(-1), mask, beta=0.04, loss_type="token", impl="cpu")
    assert torch.equal(out.loss.detach(), sep.loss) and torch.equal(out.advantages, adv)
    # GSPO's sequence ratio through the one-pass op
    seq = nonlinear_grpo_loss(logp, old, ref, mask, rewards, objective, impl="cpu", ratio_level="sequence",
                              **kw)
    seq64 = nonlinear_grpo_loss(logp.double(), old.double(), ref.double(), mask, rewards.double(), objective,
                                impl="reference", ratio_level="sequence", **kw)
    _check_all(seq, seq64, rel)
    sep = policy_loss(logp, old, ref, adv.reshape(-1), mask, beta=0.04, loss_type="token", impl="cpu",
                      ratio_level="sequence")
    assert torch.equal(seq.loss, sep.loss) and not torch.equal(seq.loss, out.loss.detach())
    # CISPO and SAPO through the one-pass op
    for surrogate in ("cispo", "sapo"):
        sk = dict(kw, surrogate=surrogate, tau_neg=1.3)
        alt = nonlinear_grpo_loss(logp, old, ref, mask, rewards, objective, impl="cpu", **sk)
        alt64 = nonlinear_grpo_loss(logp.double(), old.double(), ref.double(), mask, rewards.double(),
                                    objective, impl="reference", **sk)
        _check_all(alt, alt64, rel)
        sep = policy_loss(logp, old, ref, adv.reshape(-1), mask, beta=0.04, loss_type="token", impl="cpu",
                          surrogate=surrogate, tau_neg=1.3)
        assert torch.equal(alt.loss, sep.loss) and not torch.equal(alt.loss, out.loss.detach())


# ------------------------------------------------------------------------------------------
# torch.library: opcheck, dispatch, errors
# ------------------------------------------------------------------------------------------


def _op_samples() -> list[tuple[str, tuple]]:
    torch.manual_seed(0)
    r = random_rewards(4, 6, m=2, dtype=torch.float32)
    valid = torch.rand(4, 6) < 0.8
    valid[:, :3] = True
    lam = torch.tensor([0.4, 0.6])
    S, T = 24, 10
    logp = (-torch.rand(S, T)).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(S, T)
    ref = logp.detach() + 0.1 * torch.randn(S, T)
    mask = torch.rand(S, T) < 0.8
    adv = torch.randn(S)
    codes = ([1, 2], [3, 1], [1.0, 0.5])
    return [
        ("group_stats", (r, None, *codes, "plugin")),
        ("group_stats", (r.double(), valid, *codes, "unbiased")),
        ("group_advantages", (r, valid, lam, *codes, "unbiased", "group", 1e-4)),
        ("group_advantages", (r.double(), None, lam, *codes, "plugin", "batch", 0.0)),
        ("policy_loss_fwd", (logp, old, ref, adv, mask, 0.2, 0.2, 0.04, "grpo", None)),
        ("policy_loss_fwd", (logp, None, None, adv, mask.float(), 0.1, 0.3, 0.0, "dr_grpo", 12)),
        ("policy_loss_fwd", (logp, old, ref, adv, mask.long(), 0.2, 0.28, 0.1, "token", None, True)),
        ("nonlinear_grpo_fwd", (logp, old, ref, mask, r, lam, *codes, "plugin", "group", 1e-4, 0.2, 0.2, 0.04,
                                "token", None)),
        ("policy_loss_fwd", (logp, old, None, adv, mask, 0.2, 0.28, 0.0, "grpo", None, False, 2.0, True)),
        ("nonlinear_grpo_fwd", (logp, old, ref, mask, r, lam, *codes, "plugin", "group", 1e-4, 0.2, 0.2, 0.04,
                                "grpo", None, False, None, True)),
        ("policy_loss_fwd", (logp, old, ref, adv, mask, 1.0, 4.0, 0.04, "token", None, True, None, False,
                             "cispo")),
        ("nonlinear_grpo_fwd", (logp, old, ref, mask, r, lam, *codes, "plugin", "group", 1e-4, 0.2, 0.2, 0.04,
                                "grpo", None, False, None, True, "sapo", 1.0, 1.5)),
        ("policy_loss_fwd", (logp, old, ref, adv, mask, 0.2, 0.2, 0.04, "grpo", None, False, 2.0, False,
                             "clip", 1.0, 1.05, True)),
        ("policy_loss_fwd", (logp, old, ref, adv, mask.long(), 0.0, 0.0, 0.04, "token", None, True, None,
                             False, "vespo", 1.0, 1.05, False, 1.5, 2.5, 3.0, 1.2)),
        ("policy_loss_fwd", (logp, old, ref, adv, mask, 0.2, 0.28, 0.04, "token", None, True, 1.3, False,
                             "dppo_kl")),
        ("policy_loss_fwd", (logp, old, ref, adv, mask.long(), 1.5, 0.4, 0.04, "grpo", None, True, None,
                             False, "gmpo")),
    ]


@pytest.mark.parametrize("index", range(16))
def test_opcheck(cpu_ext, index):
    name, args = _op_samples()[index]
    torch.library.opcheck(getattr(torch.ops.iama, name).default, args)


def test_auto_picks_cpu_for_cpu_tensors_and_refuses_other_devices(cpu_ext):
    from iama_kernels._cpu_backend import cpu_check
    from iama_kernels.policy_loss.api import _POLICY_LOSS_BACKENDS

    names = [b.name for b in _POLICY_LOSS_BACKENDS]
    assert names.index("cpu") < names.index("reference")
    call = Call("policy_loss", torch.device("cpu"), False, {"dtype": torch.float32, "shape": (2, 3)})
    assert choose("policy_loss", "auto", _POLICY_LOSS_BACKENDS, call).name == "cpu"
    gpu = Call("policy_loss", torch.device("cuda", 0), True, {"dtype": torch.float32, "shape": (2, 3)})
    reason = cpu_check(gpu)
    assert reason is not None and "CPU tensors only" in reason
    with pytest.raises(ValueError, match="CPU tensors only"):
        choose("policy_loss", "cpu", _POLICY_LOSS_BACKENDS, gpu)


BAD_CALLS = [
    lambda impl: group_advantages(torch.randn(2, 3, 2), BestOfN(2), impl=impl),
    lambda impl: group_advantages(torch.randn(2, 3), BestOfN(4), estimator="unbiased", impl=impl),
    lambda impl: group_advantages(torch.randn(2, 3), BestOfN(2), scale="std", impl=impl),
    lambda impl: group_advantages(torch.tensor([[0.0, float("nan")]]), Mean(), impl=impl),
    lambda impl: first_variation(torch.randn(2, 3).int(), Mean(), impl=impl),
    lambda impl: policy_loss(torch.randn(2, 3), None, None, torch.randn(3), torch.ones(2, 3), impl=impl),
    lambda impl: policy_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), beta=0.1,
                             impl=impl),
    lambda impl: nonlinear_grpo_loss(torch.randn(5, 3), None, None, torch.ones(5, 3), torch.randn(2, 3),
                                     Mean(), impl=impl),
]


@pytest.mark.parametrize("index", range(len(BAD_CALLS)))
def test_bad_input_errors_are_the_same(cpu_ext, index):
    call = BAD_CALLS[index]
    errors = []
    for impl in ("reference", "cpu"):
        with pytest.raises((ValueError, TypeError)) as info:
            call(impl)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_kernel_checks_reject_bad_op_arguments(cpu_ext):
    r = torch.randn(2, 3, 1)
    with pytest.raises(ValueError, match="estimator"):
        torch.ops.iama.group_stats(r, None, [0], [1], [1.0], "median")
    with pytest.raises(ValueError, match="one entry per criterion"):
        torch.ops.iama.group_stats(r, None, [0, 1], [1], [1.0], "plugin")
    with pytest.raises(ValueError, match="valid samples per group"):
        torch.ops.iama.group_stats(r, torch.tensor([[True, False, False]] * 2), [1], [2], [1.0], "unbiased")
    with pytest.raises(ValueError, match="ref_logp is required"):
        torch.ops.iama.policy_loss_fwd(torch.zeros(2, 2), None, None, torch.zeros(2), torch.ones(2, 2),
                                       0.2, 0.2, 0.1, "grpo", None)


def test_every_instruction_set_build_agrees(cpu_ext):
    """The token pass is compiled for the baseline, AVX2+FMA and AVX-512 and chosen at run time;
    IAMA_CPU_ISA caps the choice (in a subprocess each), so every build this machine can run is
    checked against the float64 reference. The group kernels (baseline and AVX-512 builds) must
    agree with each other bit for bit."""
    script = textwrap.dedent("""
        import sys, torch
        from iama_kernels import _extension
        _extension.load()
        g = torch.Generator().manual_seed(0)
        logp = -torch.rand(7, 300, generator=g, dtype=torch.float64)
        old = logp + 0.2 * torch.randn(7, 300, generator=g, dtype=torch.float64)
        ref = logp + 0.2 * torch.randn(7, 300, generator=g, dtype=torch.float64)
        mask = torch.rand(7, 300, generator=g) < 0.9
        adv = torch.randn(7, generator=g)
        results = []
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            out = torch.ops.iama.policy_loss_fwd(logp.to(dtype), old.to(dtype), ref.to(dtype), adv, mask,
                                                 0.2, 0.2, 0.05, "token", None)
            results.append([t.double() for t in out])
        for dtype in (torch.float32, torch.float64):  # the dual clip (verl's clip_ratio_c)
            out = torch.ops.iama.policy_loss_fwd(logp.to(dtype), old.to(dtype), None, adv, mask,
                                                 0.2, 0.2, 0.0, "token", None, False, 1.15)
            results.append([t.double() for t in out])
        for dtype in (torch.float32, torch.float64):  # GSPO's sequence ratio
            out = torch.ops.iama.policy_loss_fwd(logp.to(dtype), old.to(dtype), ref.to(dtype), adv, mask,
                                                 0.2, 0.2, 0.05, "grpo", None, False, 1.15, True)
            results.append([t.double() for t in out])
        for surrogate in ("cispo", "sapo", "vespo", "dppo_kl", "gmpo"):  # ratios off the clip range; both
            # signs of A
            # VESPO: token log-ratios whose row sums stay about +-0.2, where the weights vary; DPPO:
            # probabilities below 1, and its weight cap
            lp, o = (logp + 0.3, old) if surrogate in ("cispo", "sapo") else (logp, old)
            if surrogate == "vespo":
                o = logp + 0.05 * (old - logp)
            cap = 1.15 if surrogate == "dppo_kl" else None
            for dtype in (torch.float32, torch.float64):
                out = torch.ops.iama.policy_loss_fwd(lp.to(dtype), o.to(dtype), ref.to(dtype),
                                                     adv, mask, 0.2, 0.28, 0.05, "grpo", None, False, cap,
                                                     False, surrogate, 1.2, 0.8, True, 1.5, 2.5, 3.0, 1.2)
                results.append([t.double() for t in out])
        rewards = torch.randn(300, 16, 2, generator=g)
        rewards[::4] = torch.randint(0, 2, rewards[::4].shape, generator=g).float()
        lam = torch.tensor([0.6, 0.4])
        for est, scale in (("unbiased", "group"), ("plugin", "none"), ("unbiased", "batch")):
            results.append(list(torch.ops.iama.group_advantages(rewards, None, lam, [1, 0], [4, 1],
                                                                [1.0, 1.0], est, scale, 1e-4)))
        for mask_dtype in (torch.int64, torch.int32):  # narrowed to bytes: the bool mask's float32 row
            out = torch.ops.iama.policy_loss_fwd(logp.float(), old.float(), ref.float(), adv,
                                                 mask.to(mask_dtype), 0.2, 0.2, 0.05, "token", None)
            results.append([t.double() for t in out])
        torch.save(results, sys.argv[1])
    """)
    per_isa = {}
    for isa in ("generic", "avx2", "avx512"):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"iama_token_pass_{os.getpid()}_{isa}.pt"
        env = dict(os.environ, IAMA_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, cwd=REPO, timeout=300)
        per_isa[isa] = torch.load(path)
        path.unlink()
    oracle = per_isa["generic"][2]  # float64 (std::exp in every build)
    dual_oracle = per_isa["generic"][4]
    seq_oracle = per_isa["generic"][6]
    assert float(dual_oracle[5]) > 0.02  # some tokens are dual-clipped
    surrogate_oracles = per_isa["generic"][8:17:2]  # the float64 CISPO, SAPO, VESPO, DPPO, GMPO results
    assert float(surrogate_oracles[0][2]) > 0.05  # some CISPO weights are clipped
    log_w = surrogate_oracles[2][7]  # VESPO's: weights on both sides of 1
    assert float(log_w.min()) < -0.05 and float(log_w.max()) > 0.05
    assert float(surrogate_oracles[3][2]) > 0.01 and float(surrogate_oracles[3][5]) > 0.01  # DPPO acts
    assert float(surrogate_oracles[4][2]) > 0.05  # GMPO clips
    for isa, (f32, bf16, f64, f32_dual, f64_dual, f32_seq, f64_seq, *rest) in per_isa.items():
        surrogates, groups, narrowed = rest[:10], rest[10:13], rest[13:]
        for out in narrowed:
            assert all(torch.equal(a, b) for a, b in zip(out, f32, strict=True)), isa
        pairs = (surrogates[0:2], surrogates[2:4], surrogates[4:6], surrogates[6:8], surrogates[8:10])
        for (f32_surr, f64_surr), want in zip(pairs, surrogate_oracles, strict=True):
            for a, b in zip(f32_surr, want, strict=True):
                assert_matches_reference(a, b, rel=1e-5, name=f"{isa} float32 surrogate")
            for a, b in zip(f64_surr, want, strict=True):
                assert_matches_reference(a, b, rel=1e-12, name=f"{isa} float64 surrogate")
        for a, b in zip(f32_seq, seq_oracle, strict=True):
            assert_matches_reference(a, b, rel=1e-5, name=f"{isa} float32 sequence ratio")
        for a, b in zip(f64_seq, seq_oracle, strict=True):
            assert_matches_reference(a, b, rel=1e-12, name=f"{isa} float64 sequence ratio")
        # the group kernels (fixed-size pass, and for AVX-512 the fused G = 16 kernel) round alike
        for a, b in zip(groups, per_isa["generic"][17:20], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), isa
        for a, b in zip(f32, oracle, strict=True):
            assert_matches_reference(a, b, rel=1e-5, name=f"{isa} float32")
        for a, b in zip(f64, oracle, strict=True):
            assert_matches_reference(a, b, rel=1e-12, name=f"{isa} float64")
        for a, b in zip(f32_dual, dual_oracle, strict=True):
            assert_matches_reference(a, b, rel=1e-5, name=f"{isa} float32 dual clip")
        for a, b in zip(f64_dual, dual_oracle, strict=True):
            assert_matches_reference(a, b, rel=1e-12, name=f"{isa} float64 dual clip")
        # bfloat16 inputs are other numbers than the oracle's (tokens may change clipping):
        # the builds must agree with each other, up to the bfloat16 rounding of the gradient.
        for a, b in zip(bf16, per_isa["generic"][1], strict=True):
            assert_matches_reference(a, b, rel=1e-2, name=f"{isa} bfloat16")


_HAND_ROW_SCRIPT = textwrap.dedent("""
    import itertools, sys, torch
    from iama_kernels import _extension
    _extension.load()
    g = torch.Generator().manual_seed(0)
    S, T = 13, 517
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    mask = torch.rand(S, T, generator=g) < 0.9
    # finite inputs (every sum compared), then non-finite tokens under the mask: NaN and inf
    # gradients, rounded to each dtype's NaN (and NaN sums)
    inputs = [(logp, old, ref, False)]
    logp, old, ref = logp.clone(), old.clone(), ref.clone()
    logp[2, 5] = float("nan"); logp[3, 7] = float("inf"); old[4, 9] = -float("inf"); ref[5, 11] = float("nan")
    inputs.append((logp, old, ref, True))
    adv = torch.randn(S, generator=g)
    # per-token advantages of both signs (verl's [bs, T] ones), NaN padding where the mask is 0
    token_adv = torch.where(mask, torch.randn(S, T, generator=g), float("nan"))
    # token weights (verl's rollout IS weights on the mask), a -0.0 among the masked-out ones
    weights = torch.where(mask, 0.5 + torch.rand(S, T, generator=g), 0.0)
    weights[~mask] = -0.0
    results = []
    # the plain k3 with every case; every other KL estimator (KlForm codes: TRL's ratio k3, k2, k1,
    # |x|, and k3+, k1+, |x|+ with k2's derivative) with a few
    plain = [("clip", None, False, mask, adv), ("clip", 1.15, False, mask.long(), adv),
             ("clip", None, True, mask, adv), ("cispo", None, False, mask, adv),
             ("sapo", None, False, mask, adv), ("vespo", None, False, mask, adv),
             ("clip", 1.15, False, mask, token_adv), ("clip", None, True, mask.long(), token_adv),
             ("clip", None, False, mask, token_adv), ("cispo", None, False, mask, token_adv),
             ("sapo", None, False, mask, token_adv), ("sapo", None, True, mask.long(), token_adv),
             ("dppo_tv", None, False, mask, adv), ("dppo_kl", 1.15, False, mask.long(), adv),
             ("dppo_tv", 1.15, False, mask, token_adv), ("dppo_kl", None, False, mask, token_adv),
             ("gmpo", None, False, mask, adv), ("gmpo", None, False, mask.long(), token_adv),
             ("vespo", None, False, mask, token_adv),
             ("clip", None, False, weights, adv), ("clip", 1.15, False, weights, token_adv),
             ("clip", None, True, weights, adv), ("gmpo", None, False, weights, adv),
             ("dppo_kl", None, False, weights, token_adv), ("vespo", None, False, weights, adv)]
    others = [("clip", 1.15, False, mask, adv), ("clip", None, True, mask, adv),
              ("sapo", None, False, mask, adv), ("clip", 1.15, False, mask, token_adv),
              ("cispo", None, False, mask, token_adv), ("sapo", None, False, mask, token_adv),
              ("dppo_kl", 1.15, False, mask, token_adv), ("gmpo", None, False, mask, token_adv),
              ("vespo", None, False, mask, token_adv), ("clip", 1.15, False, weights, token_adv)]

    def as_bits(t, canonical_nan):
        if t is None or not t.is_floating_point():
            return t
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return (torch.where(t.isnan(), float("nan"), t) if canonical_nan else t).view(bits)
    cases = [(*case, 0) for case in plain]
    cases += [(*case, form) for form in (1, 2, 3, 4, 8, 11, 12) for case in others]
    for (logp, old, ref, poisoned), dtype, (surrogate, dual, seq, mk, a, kl_form) in itertools.product(
            inputs, (torch.float32, torch.bfloat16, torch.float16), cases):
        out = torch.ops.iama.policy_loss_fwd(logp.to(dtype), old.to(dtype), ref.to(dtype), a, mk,
                                             0.2, 0.28, 0.05, "grpo", None, kl_form, dual, seq, surrogate,
                                             1.2, 0.8, True, 1.5, 2.5, 3.0, 1.2)
        # compared as bits, NaN included; but a NaN's sign with the other estimators: where a
        # NaN logp's -d meets its NaN ratio, each build's operand order of a fused multiply-add
        # picks one of them
        results.append([as_bits(t, canonical_nan=kl_form != 0) for t in out])
        # the NaN tokens reach the gradient (and only they)
        results[-1].append(bool(torch.isnan(out[-1]).any()) == poisoned)
    torch.save(results, sys.argv[1])
""")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs an AVX-512 CPU")
def test_hand_vectorised_rows_equal_the_templated_rows_bit_for_bit(cpu_ext, tmp_path):
    """The AVX-512 build's hand-written rows (float32, bfloat16 and float16 log-probs, a byte mask
    or one narrowed to bytes; row advantages with every surrogate, per-token ones with the clipped
    surrogate, its dual clip and sequence ratio, CISPO, SAPO (its temperature by each token's
    sign), DPPO (its bound by each token's sign, with and without its weight cap), GMPO and VESPO
    (its weight by each token's sign): every case of these dtypes, with a byte mask or float32
    token weights; the plain k3 and every
    other KL estimator, NaN signs aside) compute what the
    templated rows of the AVX2 build compute, bit for bit: losses, metrics and gradients, NaN and
    inf tokens and NaN advantage padding included (half-precision gradients compared as bits)."""
    per_isa = {}
    for isa in ("avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", _HAND_ROW_SCRIPT, str(path)], check=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, IAMA_CPU_ISA=isa))
        per_isa[isa] = torch.load(path)
    assert len(per_isa["avx512"]) == 2 * 3 * (25 + 7 * 10)
    for k, (a, b) in enumerate(zip(per_isa["avx2"], per_isa["avx512"], strict=True)):
        assert a[-1] and b[-1], k
        for x, y in zip(a[:-1], b[:-1], strict=True):
            assert (x is None and y is None) or torch.equal(x, y), k


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs an AVX-512 CPU")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler")
def test_hand_row_log_and_dppo_kl_equal_the_scalar_ones_bit_for_bit(tmp_path):
    """The hand row's log16 and DPPO-KL's divergence (which reaches the row only through compares
    with its bounds, so the row test rarely sees its last bits) equal log_acc and the templated
    row's divergence compiled for AVX2 + FMA, bit for bit, on a million inputs: random, special
    values, every pair of specials, and arbitrary bit patterns (csrc/tests/hand_math_check.cpp)."""
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX", "g++")
    flags = ["-O2", "-std=c++17", f"-I{REPO / 'csrc' / 'include'}", f"-I{REPO / 'csrc' / 'cpu'}"]
    flags += [f"-I{path}" for path in include_paths()]
    objects = []
    for name in ("hand_math_scalar", "hand_math_check"):
        objects.append(str(tmp_path / f"{name}.o"))
        subprocess.run([cxx, *flags, "-c", str(REPO / "csrc" / "tests" / f"{name}.cpp"), "-o", objects[-1]],
                       check=True, timeout=300)
    subprocess.run([cxx, *objects, "-o", str(tmp_path / "check")], check=True, timeout=300)
    done = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" 0 of 1048576 differ") == 2, done.stdout


def test_missing_compiler_is_reported_and_auto_falls_back(tmp_path):
    """Without a compiler: importing works, impl='cpu' says what to install, impl='auto' runs the
    reference and logs it once."""
    script = textwrap.dedent("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        import iama_kernels as ik
        r = torch.randn(3, 4)
        try:
            ik.first_variation(r, ik.BestOfN(2), impl="cpu")
        except ValueError as error:
            print("CPU-ERROR:", error)
        a = ik.first_variation(r, ik.BestOfN(2))
        b = ik.first_variation(r, ik.BestOfN(2))
        assert torch.equal(a, ik.first_variation(r, ik.BestOfN(2), impl="reference"))
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), IAMA_BUILD_DIR=str(tmp_path / "build"))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "CPU-ERROR:" in done.stdout and "install" in done.stdout and "C++" in done.stdout
    assert done.stderr.count("impl='auto' uses 'reference' because 'cpu' is unavailable") == 1


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc not installed: the CUDA compile check of the kernel headers needs it")
def test_headers_compile_with_nvcc(tmp_path):
    """The torch-free kernel headers compile as CUDA (__host__ __device__) code."""
    done = subprocess.run(
        ["nvcc", "-std=c++17", "-c", "-I", str(REPO / "csrc" / "include"), str(REPO / "csrc" / "tests" /
         "headers_check.cu"), "-o", str(tmp_path / "headers_check.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", ["surrogates", "kl_estimators"])
def test_the_op_benchmarks_run(cpu_ext, script: str, capsys, benchmark_script) -> None:
    """benchmarks/surrogates.py and benchmarks/kl_estimators.py at a tiny size: every case of the
    script has a row in its table."""
    module = benchmark_script(script)
    threads = torch.get_num_threads()
    try:
        args = ["--shape", "3x37", "--rounds", "2", "--threads", "1", "--no-write"]
        assert module.main(args + (["--op"] if script == "kl_estimators" else [])) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out.split("x base")[-1]
    rows = [line for line in table.splitlines() if line.startswith("policy_loss fwd (op)")]
    if script == "surrogates":  # 7 surrogates with row advantages and with per-token ones, 2 dtypes
        assert len(rows) == 2 * 2 * 7
        assert {line.split()[3] for line in rows} == set(module.SURROGATES)
    else:  # 8 estimators and verl's dro, 2 dtypes
        assert len(rows) == 2 * (len(module.ESTIMATORS) + 1)

"""The Triton backend against the float64 reference.

Every test runs in two lanes (the ``lane`` fixture): ``interpreter`` (CPU tensors through
``TRITON_INTERPRET=1``, which tests/conftest.py sets on machines without CUDA; small sizes because
the interpreter runs Python per block) and ``gpu`` (the same checks at larger sizes on CUDA,
skipped without a device). Tolerances: float32 outputs within a relative error of 1e-5 of the
float64 oracle (relative to the oracle's largest magnitude), or within 4x the error of the
same-dtype reference where that is larger (bf16 gradients, cancelling loss sums).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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
    sequence_log_ratio,
    set_data_checks,
)
from iama_kernels._dispatch import Call
from iama_kernels._triton_backend import MAX_GROUP_SIZE, check_triton, interpreter_enabled
from iama_kernels.testing import (
    assert_matches_reference,
    random_rewards,
    reference_grad_pair,
    reference_pair,
    saturated_sapo_inputs,
)

# The interpreter indexes with 0-d arrays (a NumPy deprecation inside triton, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

REL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
GS = [2, 3, 8, 13, 16, 64]


@dataclass(frozen=True)
class Lane:
    device: torch.device
    groups: int  # groups per batch in the group-level tests (a multiple of 4: every reward kind)
    tokens: int  # tokens per row in the token-level tests


@pytest.fixture(params=[pytest.param("interpreter", marks=pytest.mark.interpreter),
                        pytest.param("gpu", marks=pytest.mark.gpu)])
def lane(request: pytest.FixtureRequest) -> Lane:
    pytest.importorskip("triton")
    if request.param == "interpreter":
        if not interpreter_enabled():
            pytest.skip("TRITON_INTERPRET is not set (machines with CUDA run the gpu lane)")
        return Lane(torch.device("cpu"), groups=8, tokens=24)
    return Lane(torch.device("cuda"), groups=256, tokens=777)


def _n_values(G: int) -> list[int]:
    """Every n for small groups; a sample (the edges and the middle) for larger ones."""
    if G <= 8:
        return list(range(1, G + 1))
    return sorted({1, 2, 3, G // 2, G - 1, G})


def _rewards(lane: Lane, G: int, seed: int, m: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return random_rewards(lane.groups, G, generator=g, m=m).to(lane.device)


def _close(out: torch.Tensor, oracle: torch.Tensor, same: torch.Tensor | None = None,
           name: str = "output") -> None:
    assert out.device == oracle.device
    assert_matches_reference(out.detach().cpu(), oracle.detach().cpu(),
                             None if same is None else same.detach().cpu(), rel=REL, name=name)


# ------------------------------------------------------------------------------------------------
# first_variation and group_values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
@pytest.mark.parametrize(("G", "n"), [(G, n) for G in GS for n in _n_values(G)])
def test_best_of_n_matches_reference(lane: Lane, G: int, n: int, estimator: str) -> None:
    r = _rewards(lane, G, seed=100 * G + n)
    tr = BestOfN(n)
    out = first_variation(r, tr, estimator=estimator, impl="triton")
    assert out.dtype == torch.float32 and out.shape == r.shape
    oracle, _ = reference_pair(first_variation, r, tr, estimator=estimator)
    _close(out, oracle, name=f"first_variation G={G} n={n} {estimator}")
    values = group_values(r, tr, estimator=estimator, impl="triton")
    oracle_v, _ = reference_pair(group_values, r, tr, estimator=estimator)
    _close(values, oracle_v, name=f"group_values G={G} n={n} {estimator}")


@pytest.mark.parametrize("transform", [Mean(), SoftBestOfN(0.2), SoftBestOfN(3.0)], ids=repr)
@pytest.mark.parametrize("G", GS)
def test_mean_and_soft_match_reference(lane: Lane, G: int, transform: object) -> None:
    r = _rewards(lane, G, seed=G)
    out = first_variation(r, transform, impl="triton")
    oracle, _ = reference_pair(first_variation, r, transform)
    _close(out, oracle, name=f"first_variation G={G} {transform!r}")
    values = group_values(r, transform, impl="triton")
    oracle_v, _ = reference_pair(group_values, r, transform)
    _close(values, oracle_v, name=f"group_values G={G} {transform!r}")


def test_half_rewards_and_leading_dims(lane: Lane) -> None:
    """bf16 rewards are read and converted in the kernel; any leading shape is accepted."""
    r = _rewards(lane, 8, seed=3).to(torch.bfloat16).reshape(2, -1, 8)
    out = first_variation(r, BestOfN(3), estimator="unbiased", impl="triton")
    oracle, _ = reference_pair(first_variation, r, BestOfN(3), estimator="unbiased")
    assert out.dtype == torch.float32 and out.shape == r.shape
    _close(out, oracle)


@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
@pytest.mark.parametrize("transform", [BestOfN(2), BestOfN(5), SoftBestOfN(0.5), Mean()], ids=repr)
@pytest.mark.parametrize("G", [5, 13])
def test_ties_are_bit_identical_across_permutations(
    lane: Lane, G: int, transform: object, estimator: str
) -> None:
    r = _rewards(lane, G, seed=7 * G)  # kinds: pooled ties, grid ties, binary, constant
    base = first_variation(r, transform, estimator=estimator, impl="triton")
    adv = group_advantages(r, transform, estimator=estimator, impl="triton").advantages
    g = torch.Generator().manual_seed(G)
    for _ in range(3):
        perm = torch.randperm(G, generator=g).to(lane.device)
        out = first_variation(r[:, perm], transform, estimator=estimator, impl="triton")
        assert torch.equal(out, base[:, perm])
        out = group_advantages(r[:, perm], transform, estimator=estimator, impl="triton").advantages
        assert torch.equal(out, adv[:, perm])
    # Within a group, equal rewards give equal results, bit for bit.
    same = r[:, :, None] == r[:, None, :]
    for res in (base, adv):
        assert torch.equal(torch.where(same, res[:, :, None], 0), torch.where(same, res[:, None, :], 0))
    # Constant groups (kind 3) are exactly zero.
    assert torch.equal(base[3::4], torch.zeros_like(base[3::4]))
    assert torch.equal(adv[3::4], torch.zeros_like(adv[3::4]))


# ------------------------------------------------------------------------------------------------
# group_advantages
# ------------------------------------------------------------------------------------------------

OBJECTIVES = {
    "single": Objective([Criterion("r", BestOfN(3))], WeightedSum([0.5])),
    "wsum": Objective([Criterion("a", BestOfN(4)), Criterion("b", SoftBestOfN(0.5))],
                      WeightedSum([0.3, 0.7])),
    "min": Objective([Criterion("a", BestOfN(2)), Criterion("b", Mean()), Criterion("c", BestOfN(3))],
                     Min()),
    "smoothmin": Objective([Criterion("a", BestOfN(3)), Criterion("b", BestOfN(2))],
                           SmoothMin([1.0, 2.0], 3.0)),
}


def _adv_fields(out: object, oracle: object, name: str) -> None:
    for field in ("advantages", "shaped", "values", "criterion_weights"):
        _close(getattr(out, field), getattr(oracle, field), name=f"{name}: {field}")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize(("G", "estimator"), [(3, "plugin"), (8, "unbiased"), (16, "plugin")])
def test_group_advantages_matches_reference(
    lane: Lane, G: int, estimator: str, objective: str, scale: str
) -> None:
    obj = OBJECTIVES[objective]
    r = _rewards(lane, G, seed=G, m=len(obj))
    out = group_advantages(r, obj, estimator=estimator, scale=scale, impl="triton")
    oracle, _ = reference_pair(group_advantages, r, obj, estimator=estimator, scale=scale)
    _adv_fields(out, oracle, f"G={G} {objective} {scale}")


@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
@pytest.mark.parametrize("G", [5, 16])
def test_group_advantages_with_valid_mask(lane: Lane, G: int, estimator: str, scale: str) -> None:
    obj = OBJECTIVES["wsum"]  # BestOfN(4): unbiased needs >= 4 valid samples per group
    r = _rewards(lane, G, seed=G + 1, m=2)
    g = torch.Generator().manual_seed(G)
    valid = torch.rand(r.shape[:2], generator=g) < 0.7
    valid[valid.sum(-1) < 4] = True
    valid[0] = False  # a group with no valid sample
    valid[1, :4] = True
    valid[1, 4:] = False  # exactly n valid samples
    valid = valid.to(lane.device)
    r = torch.where(valid[..., None], r, torch.full_like(r, float("nan")))  # never read
    out = group_advantages(r, obj, estimator=estimator, scale=scale, valid=valid, impl="triton")
    oracle, _ = reference_pair(group_advantages, r, obj, estimator=estimator, scale=scale, valid=valid)
    _adv_fields(out, oracle, f"G={G} valid {estimator} {scale}")
    assert torch.equal(out.advantages[~valid], torch.zeros_like(out.advantages[~valid]))


@pytest.mark.parametrize(("G", "estimator"), [(17, "unbiased"), (40, "plugin"), (MAX_GROUP_SIZE, "plugin")])
def test_pairwise_strips_match_reference(lane: Lane, G: int, estimator: str) -> None:
    """Groups wider than one 16-row strip of the pairwise tiles (``_group_block`` sums strip by
    strip): strips cut through tied runs and the last strip is partly or wholly past G; with a
    valid mask, bit-identical under a permutation of the samples (one criterion), and fused."""
    obj = OBJECTIVES["wsum"]
    r = _rewards(lane, G, seed=G + 2, m=2)  # no valid mask in the fused call: every sample counts
    g = torch.Generator().manual_seed(G)
    valid = (torch.rand(r.shape[:2], generator=g) < 0.8).to(lane.device)
    valid[:, :4] = True  # BestOfN(4), unbiased: at least 4 valid samples
    out = group_advantages(r, obj, estimator=estimator, valid=valid, impl="triton")
    oracle, _ = reference_pair(group_advantages, r, obj, estimator=estimator, valid=valid)
    _adv_fields(out, oracle, f"G={G} strips {estimator}")
    one = OBJECTIVES["single"]  # one criterion: invariant to the last bit (module doc)
    base = group_advantages(r[..., :1], one, estimator=estimator, valid=valid, impl="triton")
    perm = torch.randperm(G, generator=g).to(lane.device)
    again = group_advantages(r[:, perm, :1], one, estimator=estimator, valid=valid[:, perm],
                             impl="triton")
    assert torch.equal(again.advantages, base.advantages[:, perm])
    B = 2 if lane.device.type == "cpu" else 16  # the interpreter streams rows in Python
    tokens = _token_inputs(lane, B * G, torch.float32, seed=G)
    fused = nonlinear_grpo_loss(*tokens, r[:B], obj, estimator=estimator, impl="triton")
    oracle_f, _ = reference_pair(nonlinear_grpo_loss, *tokens, r[:B], obj, estimator=estimator)
    for field in ("loss", "advantages", "values"):
        _close(getattr(fused, field), getattr(oracle_f, field), name=f"G={G} fused: {field}")


def test_group_advantages_with_given_weights(lane: Lane) -> None:
    obj = OBJECTIVES["min"]
    r = _rewards(lane, 8, seed=5, m=3)
    w = torch.tensor([0.2, 0.5, 0.3], device=lane.device)
    out = group_advantages(r, obj, criterion_weights=w, impl="triton")
    oracle, _ = reference_pair(group_advantages, r, obj, criterion_weights=w)
    _adv_fields(out, oracle, "given weights")


# ------------------------------------------------------------------------------------------------
# policy_loss
# ------------------------------------------------------------------------------------------------


def _token_inputs(lane: Lane, S: int, dtype: torch.dtype, seed: int, float_mask: bool = False):
    g = torch.Generator().manual_seed(seed)
    T = lane.tokens
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    keep = torch.rand(S, T, generator=g) < 0.8
    keep[1] = False  # an empty row
    keep[2, T // 2:] = False  # a short row
    # Padding holds NaN and inf: it must never reach the arithmetic.
    logp = torch.where(keep, logp, torch.tensor(float("nan"), dtype=torch.float64))
    old = torch.where(keep, old, torch.tensor(float("inf"), dtype=torch.float64))
    mask = keep
    if float_mask:
        weights = torch.randint(1, 4, (S, T), generator=g).to(torch.float32) / 2
        mask = torch.where(keep, weights, 0.0)
    cast = [t.to(dtype).to(lane.device) for t in (logp, old, ref)]
    return (*cast, mask.to(lane.device))


def _loss_fields(out: object, oracle: object, same: object, name: str) -> None:
    for field in ("loss", "kl", "clip_fraction", "ratio_mean", "log_ratio_mean", "dual_clip_fraction",
                  "clip_high_fraction"):
        _close(getattr(out, field), getattr(oracle, field), getattr(same, field), name=f"{name}: {field}")
    if oracle.sequence_log_ratio is None:
        assert out.sequence_log_ratio is None, name
    else:  # GSPO's per-row log-ratios
        _close(out.sequence_log_ratio, oracle.sequence_log_ratio, same.sequence_log_ratio,
               name=f"{name}: sequence_log_ratio")
    assert torch.isfinite(out.loss)


def _triton_loss_against_reference(logp, old, ref, adv, mask, kw: dict, name: str):
    """policy_loss(impl="triton"): loss, metrics and gradient against the float64 reference;
    returns the Triton output, the float64 oracle and the gradient."""
    x = logp.detach().clone().requires_grad_(True)
    out = policy_loss(x, old, ref, adv, mask, impl="triton", **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    (oracle, grad64), (same, grad_same) = reference_grad_pair(policy_loss, logp, old, ref, adv, mask, **kw)
    _loss_fields(out, oracle, same, name)
    _close(grad, grad64, grad_same, name=f"{name}: grad")
    return out, oracle, grad


@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sequence_log_ratio_matches_reference(lane: Lane, dtype: torch.dtype, mask_kind: str) -> None:
    """sequence_log_ratio(impl="triton"): rows of two token blocks (the second ragged), NaN padding,
    an empty row, weighted and integer masks, every clamp; the support exactly."""
    from iama_kernels.policy_loss.sequence_log_ratio_triton import sequence_log_ratio_triton

    S, T = (7, 1100) if lane.device.type == "cpu" else (300, 4100)
    g = torch.Generator().manual_seed(61)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(S, T, generator=g, dtype=torch.float64) * torch.linspace(0.01, 12, S)[:, None]
    keep = torch.rand(S, T, generator=g) < 0.8
    keep[1] = False
    mask = {"bool": keep, "int64": keep.long() * 3, "float": keep.float() * 0.5}[mask_kind].to(lane.device)
    logp = torch.where(keep, logp, torch.nan).to(dtype).to(lane.device)
    old = old.to(dtype).to(lane.device)
    for reduce in ("sum", "mean"):
        for clamp in (None, (-20.0, 20.0), (-1.0, None), (None, 0.5)):
            got = sequence_log_ratio(logp, old, mask, reduce=reduce, clamp=clamp, impl="triton")
            want = sequence_log_ratio(logp, old, mask, reduce=reduce, clamp=clamp, impl="reference")
            assert got.dtype == torch.float32 and float(got[1]) == 0.0
            _close(got, want.to(got.device), name=f"sequence_log_ratio {reduce} {clamp}")
    _, support = sequence_log_ratio_triton(logp, old, mask, None, None)
    assert torch.equal(support.cpu(), keep.sum(-1).float())
    mixed = sequence_log_ratio(logp, old.float(), mask, impl="triton")  # old in another dtype
    _close(mixed, sequence_log_ratio(logp, old.float(), mask, impl="reference").to(mixed.device))


def test_sequence_log_ratio_strides_and_nan(lane: Lane) -> None:
    """Row and token strides (a transposed copy, every other column), a NaN at a counted token
    (its row NaN, the others not), and the automatic choice on CUDA."""
    g = torch.Generator().manual_seed(62)
    logp = -torch.rand(5, 70, generator=g)
    old = logp + 0.3 * torch.randn(5, 70, generator=g)
    mask = torch.rand(5, 70, generator=g) < 0.7
    wide = torch.full((5, 140), float("nan"))
    wide[:, ::2] = logp
    want = sequence_log_ratio(logp.double(), old.double(), mask, impl="reference")
    for lp, m in ((wide[:, ::2], mask), (logp.t().contiguous().t(), mask.t().contiguous().t())):
        got = sequence_log_ratio(lp.to(lane.device), old.to(lane.device), m.to(lane.device), impl="triton")
        _close(got, want.to(got.device))
    bad = logp.clone()
    bad[3, int(mask[3].nonzero()[0, 0])] = float("nan")
    got = sequence_log_ratio(bad.to(lane.device), old.to(lane.device), mask.to(lane.device), impl="triton")
    assert torch.isnan(got[3]) and torch.isfinite(got[[0, 1, 2, 4]]).all()
    if lane.device.type == "cuda":
        auto = sequence_log_ratio(logp.cuda(), old.cuda(), mask.cuda())
        _close(auto, want.cuda())


@pytest.mark.parametrize(("has_old", "has_ref"), [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
def test_policy_loss_matches_reference(
    lane: Lane, loss_type: str, dtype: torch.dtype, has_old: bool, has_ref: bool
) -> None:
    S = 6 if lane.device.type == "cpu" else 300
    logp, old, ref, mask = _token_inputs(lane, S, dtype, seed=S + has_old + 2 * has_ref)
    old = old if has_old else None
    ref = ref if has_ref else None
    adv = torch.randn(S, generator=torch.Generator().manual_seed(1)).to(lane.device)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.04 if has_ref else 0.0, "loss_type": loss_type,
          "max_completion_length": lane.tokens + 5 if loss_type == "dr_grpo" else None}
    _, _, grad = _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                                f"{loss_type} {dtype} old={has_old} ref={has_ref}")
    assert grad.dtype == dtype and grad.shape == logp.shape
    assert torch.equal(grad[~mask.bool()], torch.zeros_like(grad[~mask.bool()]))


@pytest.mark.parametrize("has_old", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", ["grpo", "token"])
def test_policy_loss_ratio_weighted_kl(lane: Lane, loss_type: str, dtype: torch.dtype, has_old: bool) -> None:
    """kl_weight="ratio" (TRL's bias-corrected KL: rho * k3, gradient beta rho (logp - ref))."""
    S = 6 if lane.device.type == "cpu" else 300
    logp, old, ref, mask = _token_inputs(lane, S, dtype, seed=50 + has_old)
    old = old if has_old else None
    adv = torch.randn(S, generator=torch.Generator().manual_seed(2)).to(lane.device)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.1, "loss_type": loss_type, "kl_weight": "ratio"}
    out, _, _ = _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                               f"ratio kl {loss_type} {dtype} old={has_old}")
    plain = policy_loss(logp, old, ref, adv, mask, impl="triton", **dict(kw, kl_weight="none"))
    if has_old:
        assert not torch.equal(out.kl, plain.kl)


@pytest.mark.parametrize(("has_ref", "kl_weight"), [(False, "none"), (True, "ratio")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
def test_policy_loss_dual_clip(lane: Lane, loss_type: str, dtype: torch.dtype, has_ref: bool,
                               kl_weight: str) -> None:
    """dual_clip (verl's clip_ratio_c): rows with negative advantages hold the surrogate at c A
    for ratios above c; loss, gradient and all six metrics against the reference."""
    S = 6 if lane.device.type == "cpu" else 300
    logp, old, ref, mask = _token_inputs(lane, S, dtype, seed=70 + has_ref)
    ref = ref if has_ref else None
    adv = torch.randn(S, generator=torch.Generator().manual_seed(3))
    adv[::2] = -adv[::2].abs()
    adv = adv.to(lane.device)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.05 if has_ref else 0.0, "loss_type": loss_type,
          "kl_weight": kl_weight, "dual_clip": 1.2}
    out, oracle, _ = _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                                    f"dual clip {loss_type} {dtype} ref={has_ref}")
    assert float(oracle.dual_clip_fraction) > 0.02
    plain = policy_loss(logp, old, ref, adv, mask, impl="triton", **dict(kw, dual_clip=None))
    assert float(plain.dual_clip_fraction) == 0.0 and not torch.equal(out.loss, plain.loss)


@pytest.mark.parametrize(("kl_weight", "dual_clip"), [("none", None), ("ratio", 1.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", ["grpo", "token"])
def test_policy_loss_token_advantages(lane: Lane, loss_type: str, dtype: torch.dtype, kl_weight: str,
                                      dual_clip: float | None) -> None:
    """[S, T] advantages (TOKEN_ADV): NaN under the mask is never read into the arithmetic."""
    S = 6 if lane.device.type == "cpu" else 300
    logp, old, ref, mask = _token_inputs(lane, S, dtype, seed=80)
    adv = torch.randn(S, lane.tokens, generator=torch.Generator().manual_seed(4)).to(lane.device)
    adv = torch.where(mask.bool(), adv, torch.tensor(float("nan"), device=lane.device))
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.05, "loss_type": loss_type, "kl_weight": kl_weight,
          "dual_clip": dual_clip}
    _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                   f"token adv {loss_type} {dtype} {kl_weight}")


def _shifted_inputs(lane: Lane, dtype: torch.dtype, advantages: str, seed: int, adv_seed: int):
    """Token inputs whose rows are shifted so that their mean log-ratios fall on both sides of the
    clip range, with row advantages of both signs (every other one negative) or per-token ones."""
    S = 6 if lane.device.type == "cpu" else 300
    logp, old, ref, mask = _token_inputs(lane, S, dtype, seed=seed)
    g = torch.Generator().manual_seed(adv_seed)
    shift = torch.linspace(-0.5, 0.5, S).unsqueeze(1).to(lane.device)
    logp = (logp.double() + shift.double()).to(dtype)
    if advantages == "token":
        adv = torch.randn(S, lane.tokens, generator=g)
    else:
        adv = torch.randn(S, generator=g)
        adv[::2] = -adv[::2].abs()
    return logp, old, ref, mask, adv.to(lane.device)


@pytest.mark.parametrize(("advantages", "kl_weight", "dual_clip"),
                         [("row", "none", None), ("row", "ratio", 1.2), ("token", "none", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", ["grpo", "token"])
def test_policy_loss_sequence_ratio(lane: Lane, loss_type: str, dtype: torch.dtype, advantages: str,
                                    kl_weight: str, dual_clip: float | None) -> None:
    """ratio_level="sequence" (GSPO; SEQ_RATIO): the row's mean log-ratio from a second pre-pass
    (holes, NaN padding, an empty and a short row), then the row streamed without old_logp."""
    logp, old, ref, mask, adv = _shifted_inputs(lane, dtype, advantages, seed=90, adv_seed=6)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.05, "loss_type": loss_type, "kl_weight": kl_weight,
          "dual_clip": dual_clip, "ratio_level": "sequence"}
    out, oracle, _ = _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                                    f"sequence {loss_type} {dtype} {advantages}")
    token = policy_loss(logp, old, ref, adv, mask, impl="triton", **dict(kw, ratio_level="token"))
    assert float(oracle.clip_fraction) > 0.02 and not torch.equal(out.ratio_mean, token.ratio_mean)


@pytest.mark.parametrize(("surrogate", "advantages", "ratio_level", "kl_weight"),
                         [("cispo", "row", "token", "none"), ("cispo", "token", "sequence", "ratio"),
                          ("sapo", "row", "sequence", "none"), ("sapo", "token", "token", "ratio")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_surrogates(lane: Lane, dtype: torch.dtype, surrogate: str, advantages: str,
                                ratio_level: str, kl_weight: str) -> None:
    """SURROGATE=1 (CISPO) and 2 (SAPO) against the reference: holes, NaN padding, an empty row,
    ratios off the clip range, advantages of both signs (and zero) or per token."""
    logp, old, ref, mask, adv = _shifted_inputs(lane, dtype, advantages, seed=95, adv_seed=8)
    if advantages == "row":
        adv[1] = 0.0
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.05, "loss_type": "grpo", "kl_weight": kl_weight,
          "ratio_level": ratio_level, "surrogate": surrogate, "tau_pos": 1.2, "tau_neg": 0.8}
    out, oracle, _ = _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                                    f"{surrogate} {dtype} {advantages} {ratio_level}")
    if surrogate == "cispo":
        assert float(oracle.clip_fraction) > 0.02 and float(oracle.clip_high_fraction) > 0.0
    else:
        assert float(out.clip_fraction) == 0.0 and float(out.clip_high_fraction) == 0.0
    clip = policy_loss(logp, old, ref, adv, mask, impl="triton", **dict(kw, surrogate="clip"))
    assert not torch.equal(out.loss, clip.loss)


@pytest.mark.parametrize(("advantages", "kl_weight", "has_old"),
                         [("row", "none", True), ("token", "ratio", True), ("row", "none", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_vespo(lane: Lane, dtype: torch.dtype, advantages: str, kl_weight: str,
                           has_old: bool) -> None:
    """SURROGATE=3 (VESPO) against the reference: the pre-pass's clamped log-ratio sum (holes, NaN
    padding, an empty and a short row), each row's two gamma weights, advantages of both signs
    (and zero) or per token; without old_logp every weight is 1."""
    _, _, _, _, adv = _shifted_inputs(lane, torch.float64, advantages, seed=98, adv_seed=10)
    logp, old, ref, mask = _token_inputs(lane, adv.shape[0], torch.float64, seed=98)
    # Token log-ratios small enough that the rows' sums spread over about [-2, 2]
    scale = 2.0 / lane.tokens ** 0.5
    old = (logp + (old - logp) * scale + torch.linspace(-1, 1, logp.shape[0], dtype=torch.float64,
                                                        device=lane.device).unsqueeze(1) / lane.tokens)
    logp, old, ref = (t.to(dtype) for t in (logp, old, ref))
    if advantages == "row":
        adv[1] = 0.0
    kw = {"beta": 0.05, "loss_type": "token", "kl_weight": kl_weight, "surrogate": "vespo",
          "vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 3.0, "vespo_lambda_neg": 1.2}
    out, oracle, _ = _triton_loss_against_reference(logp, old if has_old else None, ref, adv, mask, kw,
                                                    f"vespo {dtype} {advantages} old={has_old}")
    assert float(out.clip_fraction) == 0.0 and float(out.clip_high_fraction) == 0.0
    log_w = oracle.sequence_log_ratio
    if has_old:
        assert float(log_w.min()) < -0.3 and float(log_w.max()) > 0.3
        cispo = policy_loss(logp, old, ref, adv, mask, impl="triton",
                            **dict(kw, surrogate="cispo", eps_low=0.0, eps_high=0.0))
        assert not torch.allclose(out.loss, cispo.loss, rtol=1e-3)
    else:
        assert log_w.eq(0).all() and out.sequence_log_ratio.eq(0).all()


@pytest.mark.parametrize(("surrogate", "advantages", "dual_clip"),
                         [("dppo_tv", "row", 1.3), ("dppo_kl", "token", None), ("dppo_kl", "row", 1.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_dppo(lane: Lane, dtype: torch.dtype, surrogate: str, advantages: str,
                          dual_clip: float | None) -> None:
    """SURROGATE=4 and 5 (DPPO's total-variation and binary-KL trust regions, the weight cap under
    DUAL_CLIP) against the reference: holes, NaN padding, an empty row, both signs of A."""
    logp, old, ref, mask, adv = _shifted_inputs(lane, dtype, advantages, seed=99, adv_seed=11)
    # probabilities below 1 (the binary KL's log needs 1 - p > 0); old's inf padding kept
    logp = logp.clamp(max=-0.01)
    old = torch.where(torch.isfinite(old), old.clamp(max=-0.01), old)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.05, "loss_type": "token", "kl_weight": "ratio",
          "surrogate": surrogate, "dual_clip": dual_clip}
    _, oracle, _ = _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                                    f"{surrogate} {dtype} {advantages}")
    assert float(oracle.clip_fraction) > 0.005  # tokens outside the trust region
    assert (float(oracle.dual_clip_fraction) > 0.02) == (dual_clip is not None)


@pytest.mark.parametrize(("advantages", "kl_weight", "has_old"),
                         [("row", "none", True), ("token", "ratio", True), ("token", "none", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_gmpo(lane: Lane, dtype: torch.dtype, advantages: str, kl_weight: str,
                          has_old: bool) -> None:
    """SURROGATE=6 (GMPO: the pre-pass's mean clipped log-ratio and mean advantage, every token's
    surrogate the row's objective) against the reference: holes, NaN padding, an empty row, both
    signs of A; without old_logp nothing is clipped."""
    logp, old, ref, mask, adv = _shifted_inputs(lane, dtype, advantages, seed=101, adv_seed=12)
    kw = {"eps_low": 0.3, "eps_high": 0.4, "beta": 0.05, "loss_type": "grpo", "kl_weight": kl_weight,
          "surrogate": "gmpo"}
    out, oracle, _ = _triton_loss_against_reference(logp, old if has_old else None, ref, adv, mask, kw,
                                                    f"gmpo {dtype} {advantages} old={has_old}")
    torch.testing.assert_close(out.sequence_log_ratio.double(), oracle.sequence_log_ratio, rtol=1e-4,
                               atol=1e-5)
    assert (float(oracle.clip_fraction) > 0.02) == has_old


@pytest.mark.parametrize("kl_estimator", ["k2", "k1", "abs", "k3+", "abs+"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_kl_estimators(lane: Lane, dtype: torch.dtype, kl_estimator: str) -> None:
    """KL_FORM (k2, k1, |x|, straight-through k3 and |x|) against the reference: holes, NaN padding,
    an empty row, per-token advantages; "k3+" has k3's loss and k2's gradient."""
    logp, old, ref, mask, adv = _shifted_inputs(lane, dtype, "token", seed=103, adv_seed=13)
    kw = {"beta": 0.5, "loss_type": "token", "kl_estimator": kl_estimator}
    out, oracle, grad = _triton_loss_against_reference(logp, old, ref, adv, mask, kw,
                                                       f"kl {kl_estimator} {dtype}")
    assert float(oracle.kl) > 1e-3
    if kl_estimator == "k3+":
        _, _, grad_k2 = _triton_loss_against_reference(logp, old, ref, adv, mask, dict(kw, kl_estimator="k2"),
                                                        f"kl k2 {dtype}")
        k3 = policy_loss(logp, old, ref, adv, mask, impl="triton", **dict(kw, kl_estimator="k3"))
        assert torch.equal(grad, grad_k2) and torch.equal(out.loss, k3.loss)


@pytest.mark.parametrize(("surrogate", "advantages"), [("clip", "row"), ("clip", "token"), ("cispo", "row")])
def test_policy_loss_row_stats(lane: Lane, surrogate: str, advantages: str) -> None:
    """ROW_STATS: each row's mask total, clipped and clipped-above weights (holes, an empty and a
    short row), against the reference; off, the same loss and gradient and no per-row result."""
    logp, old, ref, mask, adv = _shifted_inputs(lane, torch.float32, advantages, seed=97, adv_seed=9)
    kw = {"beta": 0.05, "surrogate": surrogate, "dual_clip": 1.3 if surrogate == "clip" else None}
    x = logp.detach().clone().requires_grad_(True)
    out = policy_loss(x, old, ref, adv, mask, impl="triton", row_stats=True, **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    want = policy_loss(logp.double(), old.double(), ref.double(), adv.double(), mask, impl="reference",
                       row_stats=True, **kw)
    torch.testing.assert_close(out.row_clip_weights.double(), want.row_clip_weights, rtol=1e-5, atol=1e-5)
    assert float(want.row_clip_weights[:, 1].sum()) > 1
    x2 = logp.detach().clone().requires_grad_(True)
    plain = policy_loss(x2, old, ref, adv, mask, impl="triton", **kw)
    (grad2,) = torch.autograd.grad(plain.loss, x2)
    assert plain.row_clip_weights is None and torch.equal(plain.loss, out.loss) and torch.equal(grad2, grad)


def test_policy_loss_sapo_saturated_gate(lane: Lane) -> None:
    """The saturated gate's derivative is 0 (not 0 * inf), as the reference's."""
    logp, old, adv, mask = saturated_sapo_inputs(lane.device)
    for tau in (1.0, 100.0):
        kw = {"surrogate": "sapo", "tau_pos": tau, "tau_neg": tau}
        x = logp.clone().requires_grad_(True)
        out = policy_loss(x, old, None, adv, mask, impl="triton", **kw)
        (grad,) = torch.autograd.grad(out.loss, x)
        y = logp.clone().requires_grad_(True)
        want = policy_loss(y, old, None, adv, mask, impl="reference", **kw)
        (want_grad,) = torch.autograd.grad(want.loss, y)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and grad[0, :4].eq(0).all()
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_policy_loss_sequence_ratio_without_old(lane: Lane) -> None:
    """ratio_level="sequence" without old_logp: every ratio 1 (SEQ_RATIO is not compiled in) and
    every l_i 0, as at the token level; and through the fused kernel."""
    S = 6 if lane.device.type == "cpu" else 300
    logp, _, ref, mask = _token_inputs(lane, S, torch.float32, seed=91)
    adv = torch.randn(S, generator=torch.Generator().manual_seed(7)).to(lane.device)
    kw = {"beta": 0.05, "loss_type": "grpo"}
    seq = policy_loss(logp, None, ref, adv, mask, impl="triton", ratio_level="sequence", **kw)
    tok = policy_loss(logp, None, ref, adv, mask, impl="triton", **kw)
    assert all(torch.equal(a, b) for a, b in zip(seq[:7], tok[:7], strict=True))
    assert torch.equal(seq.sequence_log_ratio, torch.zeros(S, device=lane.device))
    rewards = random_rewards(S // 2, 2, generator=torch.Generator().manual_seed(8)).to(lane.device)
    fused = nonlinear_grpo_loss(logp, None, ref, mask, rewards, BestOfN(2), impl="triton",
                                ratio_level="sequence", **kw)
    assert torch.equal(fused.sequence_log_ratio, torch.zeros(S, device=lane.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_extents_on_aligned_rows(lane: Lane, dtype: torch.dtype) -> None:
    """Rows of a multiple of 16 tokens (on a GPU: the specialisation with 16-byte loads bounded by
    each row's extent, rounded up to 16 tokens). Extents end at every edge of that rounding: on
    the first token, on either side of a 16-token boundary, on the last token; holes before the
    extent and the padding after it hold NaN and inf."""
    T = 48 if lane.device.type == "cpu" else 1024
    ends = [0, 1, 15, 16, 17, 31, 32, 33, T - 17, T - 16, T - 1, T]
    S = len(ends)
    g = torch.Generator().manual_seed(21)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    keep = (torch.arange(T)[None, :] < torch.tensor(ends)[:, None]) & (torch.rand(S, T, generator=g) < 0.9)
    for s, end in enumerate(ends):
        if end:
            keep[s, end - 1] = True  # the extent ends exactly there
    logp = torch.where(keep, logp, float("nan"))
    old = torch.where(keep, old, float("inf"))
    ref = torch.where(keep, ref, float("-inf"))
    logp, old, ref = (x.to(dtype).to(lane.device) for x in (logp, old, ref))
    mask = keep.to(lane.device)
    adv = torch.randn(S, generator=g).to(lane.device)
    for loss_type in ("grpo", "token"):
        kw = {"beta": 0.05, "loss_type": loss_type}
        x = logp.detach().clone().requires_grad_(True)
        out = policy_loss(x, old, ref, adv, mask, impl="triton", **kw)
        (grad,) = torch.autograd.grad(out.loss, x)
        (oracle, grad64), (same, grad_same) = reference_grad_pair(policy_loss, logp, old, ref, adv, mask,
                                                                  **kw)
        _loss_fields(out, oracle, same, f"extents {loss_type} {dtype}")
        _close(grad, grad64, grad_same, name=f"extents {loss_type} {dtype}: grad")
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


def test_policy_loss_float_mask_and_strides(lane: Lane) -> None:
    """Floating token weights; transposed (non-contiguous) log-probs; strided advantages."""
    S = 5 if lane.device.type == "cpu" else 200
    logp, old, ref, mask = _token_inputs(lane, S, torch.float32, seed=11, float_mask=True)
    logp_t = logp.t().contiguous().t()  # same values, column-major strides
    adv = torch.randn(2 * S, generator=torch.Generator().manual_seed(2)).to(lane.device)[::2]
    kw = {"beta": 0.1, "loss_type": "token"}
    x = logp_t.detach().clone().requires_grad_(True)
    out = policy_loss(x, old, ref, adv, mask, impl="triton", **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    (oracle, grad64), (same, grad_same) = reference_grad_pair(policy_loss, logp, old, ref, adv, mask, **kw)
    _loss_fields(out, oracle, same, "float mask")
    _close(grad, grad64, grad_same, name="float mask: grad")


def test_backward_scales_with_grad_output(lane: Lane) -> None:
    """``d (c * loss) = c * d loss`` for every loss type (token applies its scale in backward)."""
    logp, old, ref, mask = _token_inputs(lane, 4, torch.float32, seed=3)
    adv = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(lane.device)
    for loss_type in ("grpo", "token", "dr_grpo"):
        grads = []
        for c in (1.0, -2.5):
            x = logp.detach().clone().requires_grad_(True)
            out = policy_loss(x, old, ref, adv, mask, beta=0.1, loss_type=loss_type, impl="triton")
            (c * out.loss).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[1], -2.5 * grads[0], rtol=1e-6, atol=0)


def _check_tail_rows(device: torch.device, S: int, T: int, tail: int) -> None:
    """The gradient of the last ``tail`` rows of an ``[S, T]`` call equals that of a call on
    those rows alone (grpo weights carry ``1/S``, hence the rescaling)."""
    g = torch.Generator(device=device).manual_seed(0)
    logp = torch.full((S, T), -1.0, device=device)
    logp[-tail:] = -3 * torch.rand(tail, T, generator=g, device=device)
    ref = torch.full((S, T), -1.2, device=device)
    ref[-tail:] = logp[-tail:] + 0.3 * torch.randn(tail, T, generator=g, device=device)
    mask = torch.ones(S, T, dtype=torch.bool, device=device)
    mask[-tail:] = torch.rand(tail, T, generator=g, device=device) < 0.7
    adv = torch.randn(S, generator=g, device=device)
    x = logp.requires_grad_(True)
    (grad,) = torch.autograd.grad(policy_loss(x, None, ref, adv, mask, beta=0.1, impl="triton").loss, x)
    grad_tail = grad[-tail:] * S
    del grad  # the full-size gradient (x is logp itself)
    part = logp[-tail:].detach().clone().requires_grad_(True)
    out = policy_loss(part, None, ref[-tail:], adv[-tail:], mask[-tail:], beta=0.1, impl="triton")
    (grad_part,) = torch.autograd.grad(out.loss, part)
    torch.testing.assert_close(grad_tail, grad_part * tail, rtol=1e-6, atol=0)


def test_tail_rows_of_a_large_call(lane: Lane) -> None:
    """Rows whose offsets pass 2**31 elements (row bases are 64-bit in the kernels): on a GPU a
    call of 2**31 + 2**19 float32 tokens (about 36 GB at peak); in the interpreter the
    same check at a toy size."""
    if lane.device.type == "cpu":
        _check_tail_rows(lane.device, S=20, T=24, tail=4)
    else:
        T = 32768
        _check_tail_rows(lane.device, S=2**31 // T + 16, T=T, tail=16)


def test_no_grad_path(lane: Lane) -> None:
    """Without autograd the gradient is not written; the loss is the same."""
    logp, old, ref, mask = _token_inputs(lane, 4, torch.float32, seed=4)
    adv = torch.randn(4, generator=torch.Generator().manual_seed(4)).to(lane.device)
    with torch.no_grad():
        a = policy_loss(logp, old, ref, adv, mask, beta=0.1, impl="triton")
    b = policy_loss(logp.clone().requires_grad_(True), old, ref, adv, mask, beta=0.1, impl="triton")
    assert torch.equal(a.loss, b.loss.detach()) and not a.loss.requires_grad


# ------------------------------------------------------------------------------------------------
# nonlinear_grpo_loss (the fused op)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("objective", ["single", "wsum"])
@pytest.mark.parametrize("G", GS)
def test_nonlinear_grpo_matches_reference(lane: Lane, G: int, objective: str, scale: str) -> None:
    obj = OBJECTIVES[objective]
    B = 4 if lane.device.type == "cpu" else 64
    estimator = "unbiased" if G % 2 and obj.max_n() <= G else "plugin"
    loss_type = ("grpo", "token", "dr_grpo")[GS.index(G) % 3]
    dtype = {3: torch.bfloat16, 16: torch.bfloat16, 13: torch.float16}.get(G, torch.float32)
    g = torch.Generator().manual_seed(G)
    rewards = random_rewards(B, G, generator=g, m=len(obj)).to(lane.device)
    logp, old, ref, mask = _token_inputs(lane, B * G, dtype, seed=G)
    kw = {"estimator": estimator, "scale": scale, "beta": 0.05, "loss_type": loss_type,
          "eps_low": 0.2, "eps_high": 0.3}
    x = logp.detach().clone().requires_grad_(True)
    out = nonlinear_grpo_loss(x, old, ref, mask, rewards, obj, impl="triton", **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    (oracle, grad64), (same, grad_same) = reference_grad_pair(
        nonlinear_grpo_loss, logp, old, ref, mask, rewards, obj, **kw)
    name = f"G={G} {objective} {scale} {estimator} {loss_type} {dtype}"
    _loss_fields(out, oracle, same, name)
    for field in ("advantages", "values", "criterion_weights"):
        _close(getattr(out, field), getattr(oracle, field), name=f"{name}: {field}")
    assert grad.dtype == dtype
    _close(grad, grad64, grad_same, name=f"{name}: grad")


FUSED_TOKEN_OPTIONS = {  # objective, seed, options; and the metric that must show the option acting
    "ratio-kl": ("smoothmin", 12, {"beta": 0.1, "loss_type": "grpo", "kl_weight": "ratio"}, None),
    "dual-clip": ("wsum", 13, {"beta": 0.05, "loss_type": "token", "dual_clip": 1.2}, "dual_clip_fraction"),
    "sequence-ratio": ("wsum", 14, {"beta": 0.05, "loss_type": "grpo", "ratio_level": "sequence"},
                       "clip_fraction"),
    "cispo": ("wsum", 15, {"beta": 0.05, "loss_type": "token", "surrogate": "cispo", "eps_low": 1.0,
                           "eps_high": 0.1}, "clip_high_fraction"),
    "sapo": ("smoothmin", 16, {"beta": 0.05, "loss_type": "grpo", "surrogate": "sapo", "tau_neg": 1.5},
             None),
    "vespo": ("wsum", 17, {"beta": 0.05, "loss_type": "token", "surrogate": "vespo", "vespo_k_pos": 1.5,
                           "vespo_lambda_pos": 2.5, "vespo_lambda_neg": 1.2}, None),
    "dppo": ("wsum", 18, {"beta": 0.05, "loss_type": "token", "surrogate": "dppo_kl", "dual_clip": 1.3},
             "dual_clip_fraction"),
    "gmpo": ("wsum", 19, {"beta": 0.05, "surrogate": "gmpo", "eps_low": 0.3, "eps_high": 0.3},
             "clip_fraction"),
    "k2": ("wsum", 20, {"beta": 0.3, "loss_type": "token", "surrogate": "cispo", "kl_estimator": "k2"}, None),
}


@pytest.mark.parametrize("scale", ["group", "batch"])  # batch: the launch that runs the token kernel
@pytest.mark.parametrize("option", list(FUSED_TOKEN_OPTIONS))
def test_nonlinear_grpo_token_options(lane: Lane, scale: str, option: str) -> None:
    """kl_weight="ratio", dual_clip, ratio_level="sequence", the CISPO, SAPO, VESPO, DPPO and
    GMPO surrogates and the k2 KL estimator in the fused kernel (and in the batch-scale path)
    against the reference."""
    objective, seed, options, acting = FUSED_TOKEN_OPTIONS[option]
    obj = OBJECTIVES[objective]
    G = 8
    B = 4 if lane.device.type == "cpu" else 64
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(seed), m=len(obj)).to(lane.device)
    logp, old, ref, mask = _token_inputs(lane, B * G, torch.float32, seed=seed)
    kw = {"scale": scale, **options}
    x = logp.detach().clone().requires_grad_(True)
    out = nonlinear_grpo_loss(x, old, ref, mask, rewards, obj, impl="triton", **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    (oracle, grad64), (same, grad_same) = reference_grad_pair(
        nonlinear_grpo_loss, logp, old, ref, mask, rewards, obj, **kw)
    if acting is not None:
        assert float(getattr(oracle, acting)) > 0.02
    _loss_fields(out, oracle, same, f"{option} {scale}")
    _close(grad, grad64, grad_same, name=f"{option} {scale}: grad")


def test_nonlinear_grpo_equals_separate_ops(lane: Lane) -> None:
    """The fused op gives the advantages of group_advantages and the loss of policy_loss on them."""
    obj = OBJECTIVES["smoothmin"]
    G, B = 8, 4
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(9), m=2).to(lane.device)
    logp, old, ref, mask = _token_inputs(lane, B * G, torch.float32, seed=9)
    fused = nonlinear_grpo_loss(logp, old, ref, mask, rewards, obj, beta=0.1, impl="triton")
    adv = group_advantages(rewards, obj, impl="triton")
    sep = policy_loss(logp, old, ref, adv.advantages.reshape(-1), mask, beta=0.1, impl="triton")
    # Same arithmetic, but different kernels (warp layouts, so reduction orders) on a GPU.
    torch.testing.assert_close(fused.advantages, adv.advantages, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.values, adv.values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.loss, sep.loss, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Dispatch, registration, compile
# ------------------------------------------------------------------------------------------------


def test_auto_never_picks_the_interpreter() -> None:
    call = Call("first_variation", torch.device("cpu"), False, {"G": 4, "dtype": torch.float32})
    assert "impl='triton'" in (check_triton(call) or "")
    explicit = Call("first_variation", torch.device("cpu"), True, {"G": 4, "dtype": torch.float32})
    assert (check_triton(explicit) is None) == interpreter_enabled()


def test_refusals_name_the_reason(lane: Lane) -> None:
    r = torch.randn(2, MAX_GROUP_SIZE + 1, device=lane.device)
    with pytest.raises(ValueError, match=f"G={MAX_GROUP_SIZE + 1}"):
        first_variation(r, BestOfN(2), impl="triton")
    with pytest.raises(ValueError, match="float64"):
        group_advantages(torch.randn(2, 4, dtype=torch.float64, device=lane.device), BestOfN(2),
                         impl="triton")
    # A mask whose rows span 2**31 elements (a strided view of an untouched 2 GiB buffer).
    wide = torch.empty(2**31 + 64, dtype=torch.uint8, device=lane.device)
    wide = wide.as_strided((2, 3), (1, 2**30 + 1))
    wide.fill_(1)
    logp = torch.zeros(2, 3, device=lane.device)
    with pytest.raises(ValueError, match="spans 2147483650 elements"):
        policy_loss(logp, None, None, torch.zeros(2, device=lane.device), wide, impl="triton")


def test_gpu_auto_uses_triton(lane: Lane) -> None:
    if lane.device.type != "cuda":
        pytest.skip("auto picks triton only for CUDA tensors")
    call = Call("policy_loss", lane.device, False, {"dtype": torch.float32, "shape": (2, 3)})
    assert check_triton(call) is None


def test_launch_device_is_the_tensors_device() -> None:
    """Triton launches on the current CUDA device, so the ops make their tensors' device current;
    building the guard touches no GPU."""
    from iama_kernels._device import launch_device

    guard = launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_op_launches_on_its_tensors_device(lane: Lane, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each custom op enters the device guard of its tensors' device before it launches."""
    from iama_kernels._device import launch_device
    from iama_kernels.advantages import triton as advantages_triton
    from iama_kernels.nonlinear_grpo import triton as nonlinear_triton
    from iama_kernels.policy_loss import triton as policy_triton

    entered: list[torch.device] = []

    @contextlib.contextmanager
    def recording(device: torch.device) -> Iterator[None]:
        entered.append(device)
        with launch_device(device):
            yield

    for module in (advantages_triton, nonlinear_triton, policy_triton):
        monkeypatch.setattr(module, "launch_device", recording)
    obj = OBJECTIVES["smoothmin"]  # a lambda that needs a values pass first
    rewards = random_rewards(2, 4, generator=torch.Generator().manual_seed(3), m=2).to(lane.device)
    valid = torch.rand(2, 4, generator=torch.Generator().manual_seed(4)).to(lane.device) < 0.7
    logp, old, ref, mask = _token_inputs(lane, 8, torch.float32, seed=3)
    adv = torch.randn(8, device=lane.device)
    calls = {
        "first_variation": lambda: first_variation(rewards[..., 0], BestOfN(2), impl="triton"),
        "group_values": lambda: group_values(rewards[..., 0], BestOfN(2), impl="triton"),
        "group_advantages": lambda: group_advantages(rewards, obj, valid=valid, impl="triton"),
        "policy_loss": lambda: policy_loss(logp, old, ref, adv, mask, impl="triton"),
        "nonlinear_grpo_loss": lambda: nonlinear_grpo_loss(logp, old, ref, mask, rewards, obj,
                                                           impl="triton"),
        "nonlinear_grpo_loss, batch scale": lambda: nonlinear_grpo_loss(
            logp, old, ref, mask, rewards, obj, scale="batch", impl="triton"),
    }
    for name, call in calls.items():
        entered.clear()
        call()
        assert entered, f"{name}: launched without the device guard"
        assert all(d == logp.device for d in entered), f"{name}: {entered}"


def test_tensors_on_a_device_that_is_not_current(lane: Lane) -> None:
    """With cuda:0 current, tensors on cuda:1 give what they give on cuda:0 (same card model:
    the same bits), and cuda:0 stays current."""
    if lane.device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    obj = OBJECTIVES["smoothmin"]
    rewards = random_rewards(16, 8, generator=torch.Generator().manual_seed(5), m=2)
    inputs = _token_inputs(Lane(torch.device("cpu"), 16, lane.tokens), 128, torch.float32, seed=5)
    results = []
    with torch.cuda.device(0):
        for dev in ("cuda:0", "cuda:1"):
            logp, old, ref, mask = (t.to(dev) for t in inputs)
            x = logp.requires_grad_(True)
            out = nonlinear_grpo_loss(x, old, ref, mask, rewards.to(dev), obj, beta=0.1, impl="triton")
            (grad,) = torch.autograd.grad(out.loss, x)
            results.append((out.loss.cpu(), out.advantages.cpu(), grad.cpu()))
        assert torch.cuda.current_device() == 0
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_ops_capture_in_a_cuda_graph_without_data_checks(lane: Lane) -> None:
    """With the data checks off, the Triton path makes no host sync and no host-to-device copy
    after its first call (kernels compiled, weight tables and lambda constants cached): forward
    and backward of every op can be captured in a CUDA graph, and a replay gives the eager
    results bit for bit. SmoothMin needs a values pass and lambda computed on the device."""
    if lane.device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    obj = OBJECTIVES["smoothmin"]
    G, B = 8, 16
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(6), m=2).to(lane.device)
    logp, old, ref, mask = _token_inputs(lane, B * G, torch.float32, seed=6)
    x = logp.detach().clone().requires_grad_(True)

    def step() -> tuple[torch.Tensor, ...]:
        fused = nonlinear_grpo_loss(x, old, ref, mask, rewards, obj, beta=0.1, impl="triton")
        adv = group_advantages(rewards, obj, scale="batch", impl="triton").advantages
        sep = policy_loss(x, old, ref, adv.reshape(-1), mask, beta=0.1, impl="triton")
        grads = torch.autograd.grad(fused.loss + sep.loss, x)
        return fused.loss, fused.advantages, adv, sep.loss, *grads

    set_data_checks(False)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            expected = [t.clone() for t in step()]  # warm-up: compiles, fills the caches
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    finally:
        set_data_checks(True)
    for name, a, b in zip(("loss", "advantages", "batch advantages", "policy loss", "grad"),
                          captured, expected, strict=True):
        assert torch.equal(a, b), name


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_import_does_not_import_triton() -> None:
    """``import iama_kernels`` works without triton and loads no kernel module."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import iama_kernels\n"
        "kernels = [m for m in sys.modules if m.startswith('iama_kernels') and m.endswith('.triton')]\n"
        "assert not kernels, kernels\n"
        "print('ok')\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_missing_triton_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from iama_kernels import BestOfN, first_variation\n"
        "try:\n"
        "    first_variation(torch.randn(2, 4), BestOfN(2), impl='triton')\n"
        "except ValueError as e:\n"
        "    assert 'install' in str(e) and 'triton' in str(e), e\n"
        "    print('ok')\n"
    )
    proc = _run_python(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_custom_ops_pass_opcheck(lane: Lane) -> None:
    from iama_kernels.advantages.triton import _group_advantages_op
    from iama_kernels.nonlinear_grpo.triton import _nonlinear_grpo_op
    from iama_kernels.policy_loss.sequence_log_ratio_triton import _sequence_log_ratio_op
    from iama_kernels.policy_loss.triton import _policy_loss_op

    dev = lane.device
    logp, old, ref, mask = _token_inputs(lane, 4, torch.float32, seed=1)
    logp = torch.where(mask, logp, 0.0).requires_grad_(True)  # opcheck compares gradients
    adv = torch.randn(4, device=dev)
    rewards = torch.randn(2, 2, 1, device=dev)
    lam = torch.ones(1, device=dev)
    torch.library.opcheck(_policy_loss_op, (logp, old, ref, adv, mask, 0.2, 0.2, 0.1, "grpo", 0, True))
    torch.library.opcheck(_policy_loss_op, (logp, old, ref, adv, mask, 0.2, 0.2, 0.1, "token", 0, True,
                                            2, None, True))  # k2
    torch.library.opcheck(_nonlinear_grpo_op, (logp, old, ref, mask, rewards, lam, [2], [1.0], "plugin",
                                               1e-4, 1, 0.2, 0.2, 0.1, "token", 0, True))
    torch.library.opcheck(_nonlinear_grpo_op, (logp, old, ref, mask, rewards, lam, [2], [1.0], "plugin",
                                               1e-4, 1, 0.2, 0.2, 0.1, "grpo", 0, True, 0, None, True))
    torch.library.opcheck(_policy_loss_op, (logp, old, ref, adv, mask, 1.0, 4.0, 0.1, "token", 0, True,
                                            1, None, False, "cispo", 1.0, 1.05, True))  # TRL's ratio k3
    torch.library.opcheck(_nonlinear_grpo_op, (logp, old, ref, mask, rewards, lam, [2], [1.0], "plugin",
                                               1e-4, 1, 0.2, 0.2, 0.1, "grpo", 0, True, 8, None, True,
                                               "sapo", 1.0, 1.5))  # k3+
    torch.library.opcheck(_group_advantages_op, (rewards, None, lam, [-1], [0.5], "plugin", 1e-4, 1, False))
    torch.library.opcheck(_sequence_log_ratio_op, (logp.detach(), old, mask, -1.0, None))


def test_torch_compile_traces_around_the_ops(lane: Lane) -> None:
    """fullgraph tracing around the custom ops, their fake functions and autograd formulas:
    ``aot_eager`` on the interpreter (bit-identical), Inductor on a GPU (which generates its own
    Triton code around the ops and may order the backward's scalar products differently)."""
    logp, old, ref, mask = _token_inputs(lane, 4, torch.float32, seed=2)
    adv = torch.randn(4, device=lane.device)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 2 * policy_loss(x, old, ref, adv, mask, beta=0.1, loss_type="token",
                               impl="triton").loss

    x1 = logp.detach().clone().requires_grad_(True)
    x2 = logp.detach().clone().requires_grad_(True)
    backend = "inductor" if lane.device.type == "cuda" else "aot_eager"
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    loss1 = compiled(x1)
    loss1.backward()
    loss2 = f(x2)
    loss2.backward()
    if backend == "aot_eager":
        assert torch.equal(loss1, loss2) and torch.equal(x1.grad, x2.grad)
    else:
        torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=0)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=0)


@pytest.mark.interpreter
def test_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/gpu/run_gpu.py --smoke runs end to end (interpreter on CPU, tiny sizes)."""
    if torch.cuda.is_available():
        pytest.skip("the smoke run is for machines without CUDA; run_device.sh runs the real one")
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1", OUT=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/run_gpu.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=480, cwd=ROOT)  # about a minute here: every row in the interpreter
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "gpu_bench.csv").exists() and (tmp_path / "gpu_bench.jsonl").exists()
    assert "fused" in proc.stdout
    checks = [line for line in proc.stdout.splitlines() if line.startswith("check N=")]
    # One token size in the smoke run: 3 fused cases (float32 G=8, G=16, bfloat16) + 6 losses + the
    # 2 covariance selections + the 2 rollout corrections.
    assert len(checks) == 13 and all(line.endswith("(ok)") for line in checks), checks


def test_kernels_compile_for_sm90() -> None:
    """Triton's real compiler (not the interpreter) builds every kernel for an H100, no GPU needed."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/_triton_aot.py")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")

"""policy_loss(kl_estimator=...): the KL term's estimators k3, k2, k1, |x| and their
straight-through forms (the value of one, k2's gradient).

Oracles: the plain-loop :func:`iama_kernels.testing.policy_loss_by_loops` (each estimator's
derivative written out by hand) for the float64 reference, the reference for the C++ backend in
every dtype, and exact identities between the estimators (``"k3+"`` has k3's loss and k2's
gradient, bit for bit, on every backend).
"""

from __future__ import annotations

import pytest
import torch

from iama_kernels import BestOfN, nonlinear_grpo_loss, policy_loss
from iama_kernels._checks import KL_ESTIMATORS
from iama_kernels.testing import (
    assert_matches_reference,
    fused_and_separate,
    policy_loss_by_loops,
    ragged_rows,
    random_rewards,
)
from iama_kernels.testing import policy_loss_and_grad as _run

FIELDS = ("loss", "kl", "clip_fraction", "ratio_mean", "log_ratio_mean", "dual_clip_fraction",
          "clip_high_fraction")
PLAIN = ("k3", "k2", "k1", "abs")


def _inputs(S: int = 10, T: int = 13, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """``logp - ref`` of both signs, large enough that the estimators differ (|x| up to ~2), with a
    few exact zeros (where |x|'s derivative is 0); mixed-sign advantages; ragged masks."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3 - 0.01
    old = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref = logp + 0.8 * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref[:, ::5] = logp[:, ::5]  # x = 0 exactly
    adv, mask = ragged_rows(g, S, T)
    cast = {k: v.to(dtype) for k, v in (("logp", logp), ("old_logp", old), ("ref_logp", ref))}
    return {**cast, "advantages": adv.to(dtype), "mask": mask}


@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize(("loss_type", "surrogate", "advantages"), [
    ("grpo", "clip", "row"), ("token", "cispo", "token"), ("dr_grpo", "gmpo", "row"),
    ("token", "clip", "token"),
])
def test_reference_against_loops(kl_estimator: str, loss_type: str, surrogate: str, advantages: str) -> None:
    inp = _inputs(seed=len(kl_estimator) + len(loss_type))
    if advantages == "token":
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64)
    inp["mask"] = inp["mask"] * torch.rand(inp["mask"].shape, generator=torch.Generator().manual_seed(5),
                                           dtype=torch.float64).add(0.25)  # fractional weights
    kw = {"eps_low": 0.2, "eps_high": 0.3, "beta": 0.3, "loss_type": loss_type, "kl_estimator": kl_estimator,
          "surrogate": surrogate}
    out, grad = _run(inp, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], **kw)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(grad, want.grad, rtol=1e-12, atol=1e-14)
    assert float(out.kl) != 0.0


def test_estimators_differ_and_straight_through_is_exact() -> None:
    """The four values differ; each "+" form has its estimator's loss and metrics and k2's
    gradient exactly (the policy term is the same, so any difference is the KL term's)."""
    inp = _inputs(seed=11)
    runs = {est: _run(inp, beta=0.5, kl_estimator=est) for est in KL_ESTIMATORS}
    kls = [float(runs[est][0].kl) for est in PLAIN]
    assert len(set(kls)) == 4
    for est in ("k3", "k1", "abs"):
        out, grad = runs[est + "+"]
        for name in FIELDS:
            assert torch.equal(getattr(out, name), getattr(runs[est][0], name)), (est, name)
        torch.testing.assert_close(grad, runs["k2"][1], rtol=1e-14, atol=1e-16)
        assert not torch.allclose(grad, runs[est][1])


def test_k2_gradient_is_the_log_ratio_to_the_reference() -> None:
    """With beta = 1 and no policy term (A = 0 everywhere, no ratio), k2's gradient is
    ``w_t (logp - ref)``: "token" weights are 1 / (number of tokens)."""
    inp = _inputs(seed=12)
    inp["advantages"] = torch.zeros_like(inp["advantages"])
    out, grad = _run(dict(inp, old_logp=None), beta=1.0, loss_type="token", kl_estimator="k2")
    keep = inp["mask"]
    want = torch.where(keep, inp["logp"] - inp["ref_logp"], 0.0) / keep.sum()
    torch.testing.assert_close(grad, want, rtol=1e-14, atol=1e-17)
    x = (inp["logp"] - inp["ref_logp"])[keep]
    torch.testing.assert_close(out.kl, 0.5 * (x * x).mean(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_cpu_matches_reference(cpu_ext, dtype: torch.dtype, kl_estimator: str) -> None:
    """The C++ rows that read the estimator at run time (byte and int64 masks, row and per-token
    advantages with NaN under the mask, a strided logp, the clipped and CISPO surrogates) against
    the float64 reference."""
    S, T = 9, 131
    inp = _inputs(S, T, seed=42, dtype=dtype)
    noise = torch.randn(S, T, generator=torch.Generator().manual_seed(6)).to(dtype)
    token_adv = torch.where(inp["mask"], noise, torch.nan)
    wide = torch.randn(S, 2 * T, generator=torch.Generator().manual_seed(7)).to(dtype)
    wide[:, ::2] = inp["logp"]
    strided = wide[:, ::2]
    rel = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for loss_type, a, mask, logp, surrogate in (
            ("grpo", inp["advantages"], inp["mask"], inp["logp"], "clip"),
            ("token", inp["advantages"], inp["mask"].long(), strided, "cispo"),
            ("dr_grpo", token_adv, inp["mask"], inp["logp"], "clip"),
            ("token", token_adv, inp["mask"].float(), strided, "cispo")):
        case = dict(inp, mask=mask, advantages=a, logp=logp)
        kw = {"beta": 0.3, "loss_type": loss_type, "kl_estimator": kl_estimator, "surrogate": surrogate}
        out, grad = _run(case, impl="cpu", **kw)
        case64 = {k: v.double() if v.is_floating_point() and k != "mask" else v for k, v in case.items()}
        want, want_grad = _run(case64, **kw)
        for name in FIELDS:
            torch.testing.assert_close(getattr(out, name).double(), getattr(want, name), rtol=rel,
                                       atol=rel * 1e-2, msg=f"{loss_type} {name}")
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        half = dtype in (torch.bfloat16, torch.float16)
        assert_matches_reference(grad, want_grad, rel=2e-2 if half else rel)


def test_cpu_straight_through_is_exact(cpu_ext) -> None:
    """On the C++ rows too: "k3+" is k3's loss and k2's gradient bit for bit (float32, the
    AVX-512 hand row for plain k3 where the CPU has one, the run-time rows for the others)."""
    inp = _inputs(S=7, T=300, seed=13, dtype=torch.float32)
    k3, g_k3 = _run(inp, impl="cpu", beta=0.4, kl_estimator="k3")
    k3p, g_k3p = _run(inp, impl="cpu", beta=0.4, kl_estimator="k3+")
    _, g_k2 = _run(inp, impl="cpu", beta=0.4, kl_estimator="k2")
    assert torch.equal(g_k3p, g_k2) and not torch.equal(g_k3p, g_k3)
    torch.testing.assert_close(k3p.loss, k3.loss, rtol=1e-6, atol=0)  # (hand row vs templated sums)
    torch.testing.assert_close(k3p.kl, k3.kl, rtol=1e-6, atol=0)


def test_cpu_other_estimators_stay_finite_where_k3_overflows(cpu_ext) -> None:
    """ref - logp = 100 overflows k3's exp in float32 (k3 = inf, as in the reference); the other
    estimators never see that inf: finite loss and gradient, equal to the reference's."""
    inp = _inputs(S=3, T=40, seed=14, dtype=torch.float32)
    inp["ref_logp"][1, :7] = inp["logp"][1, :7] + 100.0
    inp["mask"] = torch.ones(3, 40, dtype=torch.bool)
    out, _ = _run(inp, impl="cpu", beta=0.1, kl_estimator="k3")
    assert torch.isinf(out.loss)
    for est in ("k2", "k1", "abs", "k1+", "abs+"):
        out, grad = _run(inp, impl="cpu", beta=0.1, kl_estimator=est)
        want, want_grad = _run({k: v.double() if v.is_floating_point() else v for k, v in inp.items()},
                               beta=0.1, kl_estimator=est)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), est
        torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=0)
        assert_matches_reference(grad, want_grad, rel=1e-5)


def test_masked_values_are_never_read(cpu_ext) -> None:
    inp = _inputs(seed=60, dtype=torch.float32)
    off = ~inp["mask"]
    dirty = dict(inp, logp=torch.where(off, torch.nan, inp["logp"]),
                 ref_logp=torch.where(off, -torch.inf, inp["ref_logp"]))
    for est in ("k2", "abs", "k3+"):
        for impl in ("cpu", "reference"):
            out, grad = _run(inp, impl=impl, beta=0.1, kl_estimator=est)
            out_d, grad_d = _run(dirty, impl=impl, beta=0.1, kl_estimator=est)
            for name in FIELDS:
                assert torch.equal(getattr(out, name), getattr(out_d, name)), (est, impl, name)
            assert torch.equal(grad, grad_d)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_nonlinear_grpo_loss_takes_the_estimator(impl: str, request: pytest.FixtureRequest) -> None:
    if impl == "cpu":
        request.getfixturevalue("cpu_ext")
    B, G, T = 3, 4, 9
    inp = _inputs(S=B * G, T=T, seed=70, dtype=torch.float32)
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(1))
    for est in ("k2", "abs+"):
        kw = {"beta": 0.2, "kl_estimator": est}
        fused, sep = fused_and_separate(inp, rewards, BestOfN(2), impl, **kw)
        assert torch.equal(fused.loss, sep.loss) and torch.equal(fused.kl, sep.kl)


@pytest.mark.parametrize(("kw", "match"), [
    ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
    ({"kl_estimator": "k2+"}, "kl_estimator must be one of"),
    ({"kl_estimator": "k2", "kl_weight": "ratio"}, "kl_weight='ratio' .* takes kl_estimator='k3'"),
    ({"kl_weight": "k2"}, "kl_weight must be one of"),
])
def test_bad_options_name_the_argument(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _run(_inputs(S=4, T=5, seed=80), beta=0.1, **kw)
    with pytest.raises(ValueError, match=match):
        inp = _inputs(S=4, T=5, seed=80)
        nonlinear_grpo_loss(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["mask"], torch.randn(2, 2),
                            BestOfN(2), beta=0.1, **kw)


@pytest.mark.parametrize("code", [-1, 5, 9, 10, 16])
def test_op_checks_its_kl_form(cpu_ext, code: int) -> None:
    """The op refuses codes that are no estimator (5-7), k2 or the ratio k3 with the straight-through
    flag (10, 9), and anything past it."""
    inp = _inputs(S=4, T=5, seed=80, dtype=torch.float32)
    base = (inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"])
    with pytest.raises(ValueError, match="kl_form must be an iama::KlForm code"):
        torch.ops.iama.policy_loss_fwd(*base, 0.2, 0.2, 0.1, "token", None, code)
    out = torch.ops.iama.policy_loss_fwd(*base, 0.2, 0.2, 0.1, "token", None, 2)
    want = policy_loss(*base, beta=0.1, loss_type="token", kl_estimator="k2", impl="reference")
    torch.testing.assert_close(out[0], want.loss)

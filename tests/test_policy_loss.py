"""policy_loss: the clipped-ratio + k3-KL surrogate against SPEC section 5 computed by hand.

The oracle is :func:`iama_kernels.testing.policy_loss_by_loops` (plain Python float64 loops,
closed-form gradient, TRL's clip_fraction); gradients are also checked with
``torch.autograd.gradcheck`` away from the clip boundaries.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iama_kernels import policy_loss
from iama_kernels.testing import policy_loss_by_loops

EPS32 = torch.finfo(torch.float32).eps
LOSS_TYPES = ("grpo", "token", "dr_grpo")


def _inputs(S: int = 6, T: int = 9, *, dtype: torch.dtype = torch.float64, seed: int = 0,
            spread: float = 0.3) -> dict[str, torch.Tensor]:
    """Random per-token inputs: ratios on both sides of the clip range, mixed-sign advantages,
    ragged masks with one empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(S, T, generator=g, dtype=torch.float64)
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    lengths = torch.randint(1, T + 1, (S,), generator=g)
    if S > 1:
        lengths[1] = 0  # an empty row
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return {"logp": logp.to(dtype), "old_logp": old.to(dtype), "ref_logp": ref.to(dtype),
            "advantages": adv.to(dtype), "mask": mask}


def _run(inp: dict[str, torch.Tensor], **kw: object):
    """The reference's outputs (with the per-row clip weights, which the loop oracle also gives)
    and its gradient."""
    logp = inp["logp"].clone().requires_grad_(True)
    kw.setdefault("row_stats", True)
    out = policy_loss(logp, inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"],
                      impl="reference", **kw)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out, grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.2), (0.2, 0.28), (0.0, 0.0)])
def test_against_hand_computation(loss_type: str, beta: float, eps_low: float, eps_high: float) -> None:
    inp = _inputs(seed=int(beta * 100) + len(loss_type))
    kw = {"eps_low": eps_low, "eps_high": eps_high, "beta": beta, "loss_type": loss_type}
    out, grad = _run(inp, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], **kw)
    assert 0 < float(want.clip_fraction) < 1  # both branches are exercised
    for name in ("loss", "kl", "clip_fraction", "ratio_mean"):
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=0, atol=1e-13)
        assert getattr(out, name).dtype == torch.float64 and getattr(out, name).shape == ()
    torch.testing.assert_close(grad, want.grad, rtol=0, atol=1e-13)
    for name in ("kl", "clip_fraction", "ratio_mean"):
        assert not getattr(out, name).requires_grad


def test_aggregations_by_hand_on_a_tiny_case() -> None:
    # Two sequences, ratio 1 everywhere (old_logp None), no KL: the token loss is -A.
    logp = torch.zeros(2, 4, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    loss = {t: float(policy_loss(logp, None, None, adv, mask, loss_type=t, impl="reference").loss)
            for t in LOSS_TYPES}
    assert loss["grpo"] == pytest.approx(-(1.0 + -2.0) / 2, abs=1e-15)  # mean of row means
    assert loss["token"] == pytest.approx(-(3 * 1.0 - 2.0) / 4, abs=1e-15)  # over the 4 tokens
    assert loss["dr_grpo"] == pytest.approx(-(3 * 1.0 - 2.0) / (2 * 4), abs=1e-15)  # S * T
    dr6 = policy_loss(logp, None, None, adv, mask, loss_type="dr_grpo", max_completion_length=6,
                      impl="reference")
    assert float(dr6.loss) == pytest.approx(-(3 * 1.0 - 2.0) / (2 * 6), abs=1e-15)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_away_from_clip_boundaries(loss_type: str) -> None:
    inp = _inputs(S=4, T=5, seed=3)
    old = inp["old_logp"]
    # Move every ratio at least 0.02 away from 1 - eps and 1 + eps, where the loss has a kink.
    rho = torch.exp(inp["logp"] - old)
    for edge in (0.8, 1.2):
        near = (rho - edge).abs() < 0.02
        old = torch.where(near, old + 0.05, old)
    rho = torch.exp(inp["logp"] - old)
    assert bool(((rho - 0.8).abs() > 0.01).all() and ((rho - 1.2).abs() > 0.01).all())

    def f(logp: torch.Tensor) -> torch.Tensor:
        return policy_loss(logp, old, inp["ref_logp"], inp["advantages"], inp["mask"], beta=0.1,
                           loss_type=loss_type, impl="reference").loss

    assert torch.autograd.gradcheck(f, (inp["logp"].clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


def test_gradient_closed_form_of_spec() -> None:
    inp = _inputs(S=5, T=8, seed=4)
    beta, el, eh = 0.07, 0.2, 0.28
    out, grad = _run(inp, beta=beta, eps_low=el, eps_high=eh, loss_type="token")
    m = inp["mask"].double()
    rho = torch.exp(inp["logp"] - inp["old_logp"])
    A = inp["advantages"].unsqueeze(-1)
    clipped = ((rho < 1 - el) & (A < 0)) | ((rho > 1 + eh) & (A > 0))
    d = inp["ref_logp"] - inp["logp"]
    per_token = -torch.where(clipped, 0.0, rho * A) + beta * (1 - torch.exp(d))
    torch.testing.assert_close(grad, per_token * m / m.sum(), rtol=0, atol=1e-14)
    torch.testing.assert_close(out.clip_fraction, (clipped.double() * m).sum() / m.sum(), rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_rows_and_all_empty_mask(loss_type: str) -> None:
    inp = _inputs(seed=5)
    out, grad = _run(inp, beta=0.1, loss_type=loss_type)
    assert bool(torch.isfinite(grad).all()) and bool((grad[1] == 0).all())
    if loss_type == "grpo":
        # The empty row counts as a sequence contributing 0: removing it rescales by S / (S - 1).
        keep = [i for i in range(inp["mask"].shape[0]) if i != 1]
        sub = {k: v[keep] for k, v in inp.items()}
        out_sub, _ = _run(sub, beta=0.1, loss_type="grpo")
        S = inp["mask"].shape[0]
        torch.testing.assert_close(out.loss, out_sub.loss * (S - 1) / S, rtol=1e-14, atol=0)
    empty = dict(inp, mask=torch.zeros_like(inp["mask"]))
    out, grad = _run(empty, beta=0.1, loss_type=loss_type)
    assert out.sequence_log_ratio is None  # per-token ratios
    for t in out[:7]:  # the scalars
        assert float(t.detach()) == 0.0
    assert bool((grad == 0).all())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_nan_and_inf_do_not_leak(loss_type: str) -> None:
    inp = _inputs(seed=6)
    out, grad = _run(inp, beta=0.1, loss_type=loss_type)
    off = ~inp["mask"]
    dirty = dict(inp)
    for i, key in enumerate(("logp", "old_logp", "ref_logp")):
        bad = torch.tensor([float("nan"), float("inf"), -float("inf")][i], dtype=torch.float64)
        dirty[key] = torch.where(off, bad, inp[key])
    out_d, grad_d = _run(dirty, beta=0.1, loss_type=loss_type)
    for a, b in zip(out[:7], out_d[:7], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grad, grad_d)
    assert bool((grad_d[off] == 0).all())


def test_old_logp_none_means_ratio_one() -> None:
    inp = _inputs(seed=7)
    for loss_type in LOSS_TYPES:
        none = dict(inp, old_logp=None)
        same = dict(inp, old_logp=inp["logp"].clone())
        out_n, grad_n = _run(none, beta=0.05, loss_type=loss_type)
        out_s, grad_s = _run(same, beta=0.05, loss_type=loss_type)
        assert float(out_n.ratio_mean) == 1.0 and float(out_n.clip_fraction) == 0.0
        for a, b in zip(out_n, out_s, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
        torch.testing.assert_close(grad_n, grad_s, rtol=0, atol=1e-15)
        want = policy_loss_by_loops(inp["logp"], None, inp["ref_logp"], inp["advantages"], inp["mask"],
                                    beta=0.05, loss_type=loss_type)
        torch.testing.assert_close(grad_n, want.grad, rtol=0, atol=1e-14)


def test_metrics_definitions() -> None:
    inp = _inputs(seed=8, spread=0.5)
    el, eh = 0.1, 0.3
    out, _ = _run(inp, eps_low=el, eps_high=eh)
    m = inp["mask"]
    rho = torch.exp(inp["logp"] - inp["old_logp"])[m]
    A = inp["advantages"].unsqueeze(-1).expand_as(inp["logp"])[m]
    low, high = (rho < 1 - el) & (A < 0), (rho > 1 + eh) & (A > 0)  # TRL's definitions
    assert float(out.clip_fraction) == pytest.approx(float((low | high).double().mean()), abs=1e-15)
    assert float(out.clip_high_fraction) == pytest.approx(float(high.double().mean()), abs=1e-15)
    assert 0 < float(out.clip_high_fraction) < float(out.clip_fraction)  # both sides occur
    assert float(out.ratio_mean) == pytest.approx(float(rho.mean()), abs=1e-14)
    d = (inp["ref_logp"] - inp["logp"])[m]
    assert float(out.kl) == pytest.approx(float((torch.exp(d) - d - 1).mean()), abs=1e-14)
    # Without ref_logp the kl metric is 0; with beta = 0 it is still reported.
    no_ref, _ = _run(dict(inp, ref_logp=None))
    assert float(no_ref.kl) == 0.0


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8, torch.float32, torch.float64])
def test_mask_dtypes(mask_dtype: torch.dtype) -> None:
    inp = _inputs(seed=9)
    ref_out, ref_grad = _run(inp, beta=0.1)
    out, grad = _run(dict(inp, mask=inp["mask"].to(mask_dtype)), beta=0.1)
    for a, b in zip(out, ref_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-15)


def test_float_mask_weights_tokens() -> None:
    inp = _inputs(seed=10)
    g = torch.Generator().manual_seed(0)
    weights = inp["mask"].double() * (1 + torch.rand(inp["mask"].shape, generator=g, dtype=torch.float64))
    for loss_type in LOSS_TYPES:
        out, grad = _run(dict(inp, mask=weights), beta=0.1, loss_type=loss_type)
        want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"], weights,
                                    beta=0.1, loss_type=loss_type)
        torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=1e-13)
        torch.testing.assert_close(grad, want.grad, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_against_float64(dtype: torch.dtype) -> None:
    inp = _inputs(S=16, T=33, dtype=dtype, seed=11)
    out, grad = _run(inp, beta=0.04, loss_type="grpo")
    assert out.loss.dtype == torch.float32 and grad.dtype == dtype
    inp64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    out64, grad64 = _run(inp64, beta=0.04, loss_type="grpo")
    # Same inputs (rounded to dtype) computed in float64: the float32 arithmetic error only.
    # Measured: |loss error| <= 0.04 * eps32 * 2 max|A| (float32 accumulation of ~500 tokens).
    scale = float(inp64["advantages"].abs().max()) * 2
    assert abs(float(out.loss.detach()) - float(out64.loss.detach())) <= 8 * EPS32 * scale
    # The gradient is returned in the input dtype: one rounding to it on top of float32 arithmetic.
    gtol = 64 * EPS32 * float(grad64.abs().max()) + 2 * float(grad64.abs().max()) * (
        torch.finfo(dtype).eps if dtype != torch.float32 else 0.0)
    assert float((grad.double() - grad64).abs().max()) <= gtol
    assert math.isfinite(float(out.kl)) and math.isfinite(float(out.ratio_mean))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 10_000), st.sampled_from(LOSS_TYPES),
       st.sampled_from([0.0, 0.1]), st.sampled_from([torch.float32, torch.float64]))
def test_property_against_loops(S: int, T: int, seed: int, loss_type: str, beta: float,
                                dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    inp = _inputs(S=S, T=T, seed=seed, dtype=dtype)
    inp["mask"] = torch.rand(S, T, generator=g) < 0.7  # any pattern, empty rows included
    out, grad = _run(inp, beta=beta, loss_type=loss_type, eps_low=0.15, eps_high=0.25)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"],
                                beta=beta, loss_type=loss_type, eps_low=0.15, eps_high=0.25)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.loss.detach().double(), want.loss, rtol=0, atol=tol)
    torch.testing.assert_close(grad.double(), want.grad, rtol=0, atol=tol)
    for name in ("kl", "clip_fraction", "ratio_mean"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(want, name), rtol=0, atol=tol)


# --- kl_weight="ratio": TRL's bias-corrected KL, rho * k3 ---------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [True, False])
def test_ratio_weighted_kl_against_hand_computation(loss_type: str, with_old: bool) -> None:
    """Loss, metrics and the closed-form gradient ``beta rho (logp - ref)`` of the KL term."""
    inp = _inputs(seed=31 + len(loss_type))
    if not with_old:
        inp = dict(inp, old_logp=None)  # ratio 1, but its derivative still weights the KL
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.1, "loss_type": loss_type, "kl_weight": "ratio"}
    out, grad = _run(inp, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], **kw)
    for name in ("loss", "kl", "clip_fraction", "ratio_mean"):
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=0, atol=1e-13)
    torch.testing.assert_close(grad, want.grad, rtol=0, atol=1e-13)
    plain, plain_grad = _run(inp, **dict(kw, kl_weight="none"))
    assert (grad - plain_grad).abs().max() > 1e-3  # the weighting changes the gradient
    if with_old:
        assert abs(float(out.kl) - float(plain.kl)) > 1e-4  # and the kl metric
    else:
        torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=1e-15)  # rho = 1: same value


def test_ratio_weighted_kl_matches_autograd_of_the_formula() -> None:
    """Independently of the oracle: autograd of sum_w (beta rho k3 - surrogate) in float64."""
    inp = _inputs(seed=40)
    out, grad = _run(inp, beta=0.3, kl_weight="ratio", loss_type="token")
    logp = inp["logp"].clone().requires_grad_(True)
    m = inp["mask"].double()
    rho = torch.exp(logp - inp["old_logp"])
    d = inp["ref_logp"] - logp
    A = inp["advantages"].unsqueeze(1)
    surrogate = torch.where(rho * A <= rho.clamp(0.8, 1.2) * A, rho * A, (rho.clamp(0.8, 1.2) * A).detach())
    loss = ((0.3 * rho * (torch.exp(d) - d - 1) - surrogate) * m).sum() / m.sum()
    (want,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-13)


def test_kl_weight_is_checked() -> None:
    inp = _inputs()
    with pytest.raises(ValueError, match=r"kl_weight must be one of \('none', 'ratio'\)"):
        _run(inp, beta=0.1, kl_weight="rho")


# --- dual_clip: dual-clip PPO (verl's clip_ratio_c) ----------------------------------------------


def _dual_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Ratios spread wide enough that some exceed c = 1.5 on rows with negative advantages."""
    inp = _inputs(S=8, T=11, seed=seed, spread=0.8)
    inp["advantages"][2:5] = -inp["advantages"][2:5].abs() - 0.1
    return inp


def _assert_equals_loops(inp: dict[str, torch.Tensor], out: object, grad: torch.Tensor,
                         advantages: torch.Tensor | None = None, **kw: object) -> None:
    """Every output and the gradient equal the loop oracle's to 1e-13 (float64)."""
    adv = inp["advantages"] if advantages is None else advantages
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], adv, inp["mask"], **kw)
    for name in want._fields:
        if name == "sequence_log_ratio" and want.sequence_log_ratio is None:
            assert out.sequence_log_ratio is None
        elif name != "grad":
            torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=0, atol=1e-13)
    torch.testing.assert_close(grad, want.grad, rtol=0, atol=1e-13)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(("beta", "kl_weight"), [(0.0, "none"), (0.05, "none"), (0.05, "ratio")])
def test_dual_clip_against_loops(loss_type: str, beta: float, kl_weight: str) -> None:
    inp = _dual_inputs(seed=60 + len(loss_type))
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": beta, "loss_type": loss_type, "kl_weight": kl_weight,
          "dual_clip": 1.5}
    out, grad = _run(inp, **kw)
    _assert_equals_loops(inp, out, grad, **kw)
    assert float(out.dual_clip_fraction) > 0.05  # the case exercises the dual clip
    plain, plain_grad = _run(inp, **dict(kw, dual_clip=None))
    assert float(plain.dual_clip_fraction) == 0.0
    assert (grad - plain_grad).abs().max() > 1e-3 and float(out.loss.detach()) != float(plain.loss.detach())
    # The dual clip changes neither the ordinary clip metric nor the ratio metrics.
    for name in ("clip_fraction", "ratio_mean", "log_ratio_mean", "kl"):
        assert float(getattr(out, name)) == float(getattr(plain, name)), name


def test_dual_clip_matches_verl_formula() -> None:
    """Independently of the oracle: autograd of verl's vanilla PPO loss (max/min form, token-mean),
    and its metrics pg_clipfrac, pg_clipfrac_lower and ppo_kl."""
    inp = _dual_inputs(seed=70)
    el, eh, c = 0.2, 0.28, 1.5
    out, grad = _run(inp, eps_low=el, eps_high=eh, dual_clip=c, loss_type="token")
    logp = inp["logp"].clone().requires_grad_(True)
    m = inp["mask"]
    A = inp["advantages"].unsqueeze(1).expand_as(logp)
    ratio = torch.exp(logp - inp["old_logp"])
    loss1 = -A * ratio
    loss2 = -A * ratio.clamp(1 - el, 1 + eh)
    clip1 = torch.maximum(loss1, loss2)
    loss3 = -A * c
    per_token = torch.where(A < 0, torch.minimum(loss3, clip1), clip1)
    loss = per_token[m].sum() / m.sum()
    (want,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-13)
    assert float(out.clip_fraction) == pytest.approx(float((loss2 > loss1)[m].double().mean()), abs=1e-15)
    lower = (clip1 > loss3) & (A < 0)
    assert float(out.dual_clip_fraction) == pytest.approx(float(lower[m].double().mean()), abs=1e-15)
    ppo_kl = (inp["old_logp"] - inp["logp"])[m].mean()
    assert float(-out.log_ratio_mean) == pytest.approx(float(ppo_kl), abs=1e-14)


def test_log_ratio_mean_without_old_is_zero() -> None:
    out, _ = _run(dict(_inputs(seed=71), old_logp=None), dual_clip=2.0)
    assert float(out.log_ratio_mean) == 0.0 and float(out.dual_clip_fraction) == 0.0


@pytest.mark.parametrize(("value", "error"), [
    (1.0, ValueError), (0.5, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
    ("3", TypeError), (True, TypeError)])
def test_dual_clip_is_checked(value: object, error: type) -> None:
    with pytest.raises(error, match="dual_clip must be"):
        _run(_inputs(), dual_clip=value)


# --- per-token advantages [S, T] (PPO's, e.g. GAE's) -----------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(("beta", "kl_weight", "dual_clip"), [(0.0, "none", None), (0.05, "ratio", 1.5)])
def test_token_advantages_against_loops(loss_type: str, beta: float, kl_weight: str,
                                        dual_clip: float | None) -> None:
    inp = _dual_inputs(seed=80 + len(loss_type))
    g = torch.Generator().manual_seed(1)
    token_adv = torch.randn(inp["logp"].shape, generator=g, dtype=torch.float64)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": beta, "loss_type": loss_type, "kl_weight": kl_weight,
          "dual_clip": dual_clip}
    # Under mask 0 the advantages are padding: NaN there must not leak.
    padded = torch.where(inp["mask"], token_adv, torch.tensor(float("nan"), dtype=torch.float64))
    out, grad = _run(dict(inp, advantages=padded), **kw)
    _assert_equals_loops(inp, out, grad, token_adv, **kw)
    if dual_clip is not None:
        assert float(out.dual_clip_fraction) > 0.05


def test_row_advantages_broadcast_over_tokens_are_the_row_path() -> None:
    inp = _dual_inputs(seed=90)
    kw = {"beta": 0.05, "loss_type": "grpo", "dual_clip": 2.0}
    row, row_grad = _run(inp, **kw)
    per_token = inp["advantages"].unsqueeze(1).expand_as(inp["logp"])  # a stride-0 view
    tok, tok_grad = _run(dict(inp, advantages=per_token), **kw)
    for a, b in zip(tok, row, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    torch.testing.assert_close(tok_grad, row_grad, rtol=0, atol=1e-15)


def test_token_advantages_are_checked() -> None:
    inp = _inputs()
    with pytest.raises(ValueError, match=r"advantages must have shape \[S\] = \[6\] or the shape of logp"):
        _run(dict(inp, advantages=torch.zeros(6, 3, dtype=torch.float64)))
    adv = torch.zeros(inp["logp"].shape, dtype=torch.float64)
    row, col = (int(i) for i in inp["mask"].nonzero()[3])
    adv[row, col] = float("inf")
    with pytest.raises(ValueError, match=rf"finite, got inf at \(sequence, token\) \({row}, {col}\)"):
        _run(dict(inp, advantages=adv))


# --- ratio_level="sequence": GSPO's sequence ratio ---------------------------------------------------


def _gspo_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Rows whose mean log-ratio falls on both sides of the clip range (and past c = 1.5 where
    A < 0), ragged masks with an empty row."""
    inp = _inputs(S=10, T=13, seed=seed, spread=0.4)
    shift = torch.linspace(-0.6, 0.6, 10, dtype=torch.float64).unsqueeze(1)
    inp["logp"] = inp["logp"] + shift  # row i's mean log-ratio moves by shift[i]
    inp["advantages"][::3] = -inp["advantages"][::3].abs() - 0.1
    return inp


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(("beta", "kl_weight", "dual_clip"), [(0.0, "none", None), (0.05, "none", 1.5),
                                                              (0.05, "ratio", None)])
@pytest.mark.parametrize("advantages", ["row", "token"])
@pytest.mark.parametrize("weights", [False, True])
def test_sequence_ratio_against_loops(loss_type: str, beta: float, kl_weight: str, dual_clip: float | None,
                                      advantages: str, weights: bool) -> None:
    inp = _gspo_inputs(seed=100 + len(loss_type))
    if advantages == "token":
        g = torch.Generator().manual_seed(7)
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=g, dtype=torch.float64)
    if weights:  # token weights: the sequence ratio is the mean over the row's support
        g = torch.Generator().manual_seed(8)
        inp["mask"] = inp["mask"] * torch.rand(inp["mask"].shape, generator=g, dtype=torch.float64).add(0.5)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": beta, "loss_type": loss_type, "kl_weight": kl_weight,
          "dual_clip": dual_clip, "ratio_level": "sequence"}
    out, grad = _run(inp, **kw)
    _assert_equals_loops(inp, out, grad, **kw)
    assert 0.03 < float(out.clip_fraction) < 0.9  # whole rows clipped, others not
    keep = inp["mask"] != 0
    lr = torch.where(keep, inp["logp"] - inp["old_logp"], 0.0)
    torch.testing.assert_close(out.sequence_log_ratio, lr.sum(-1) / keep.sum(-1).clamp(min=1),
                               rtol=0, atol=1e-15)
    token, token_grad = _run(inp, **dict(kw, ratio_level="token"))
    assert (grad - token_grad).abs().max() > 1e-3
    assert float(out.ratio_mean) != float(token.ratio_mean)
    # The mask-weighted mean of each token's (row) log-ratio: the token mean of logp - old for 0/1
    # masks; with weights it differs.
    if not weights:
        assert float(out.log_ratio_mean) == pytest.approx(float(token.log_ratio_mean), abs=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sequence_ratio_is_the_gspo_sequence_objective(loss_type: str) -> None:
    """Independently of the oracle: autograd of GSPO's sequence-level objective as TRL writes it
    (``s_i = exp(masked mean of logp - old)``, not detached, one loss per sequence, aggregated by
    loss type) gives the same loss and gradient for 0/1 masks."""
    inp = _gspo_inputs(seed=110)
    el, eh = 0.2, 0.28
    out, grad = _run(inp, eps_low=el, eps_high=eh, loss_type=loss_type, max_completion_length=20,
                     ratio_level="sequence")
    logp = inp["logp"].clone().requires_grad_(True)
    m = inp["mask"].double()
    A = inp["advantages"].unsqueeze(1)
    s = torch.exp(((logp - inp["old_logp"]) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1))
    per_seq = -torch.min(s * A, s.clamp(1 - el, 1 + eh) * A)  # [S, 1], broadcast over the tokens
    if loss_type == "grpo":
        loss = ((per_seq * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "token":
        loss = (per_seq * m).sum() / m.sum().clamp(min=1)
    else:
        loss = (per_seq * m).sum() / (m.shape[0] * 20)
    (want,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-14)


def test_sequence_ratio_is_verls_gspo_token_loss() -> None:
    """verl's "gspo" loss: per-token advantages and GSPO-token's ratio
    ``exp(sg[mean log-ratio] + logp - sg[logp])``, token-mean; and its pg_clipfrac and ppo_kl."""
    inp = _gspo_inputs(seed=120)
    g = torch.Generator().manual_seed(9)
    A = torch.randn(inp["logp"].shape, generator=g, dtype=torch.float64)
    el, eh = 0.2, 0.28
    out, grad = _run(dict(inp, advantages=A), eps_low=el, eps_high=eh, loss_type="token",
                     ratio_level="sequence")
    logp = inp["logp"].clone().requires_grad_(True)
    m = inp["mask"]
    lr = logp - inp["old_logp"]
    seq = (lr * m).sum(-1) / m.sum(-1).clamp(min=1)
    ratio = torch.exp(logp - logp.detach() + seq.detach().unsqueeze(-1))
    loss1, loss2 = -A * ratio, -A * ratio.clamp(1 - el, 1 + eh)
    loss = torch.maximum(loss1, loss2)[m].sum() / m.sum()
    (want,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-14)
    assert float(out.clip_fraction) == pytest.approx(float((loss2 > loss1)[m].double().mean()), abs=1e-15)
    assert float(-out.log_ratio_mean) == pytest.approx(float(-lr.detach()[m].mean()), abs=1e-14)


def test_sequence_ratio_ignores_masked_values_and_needs_old_logp_to_matter() -> None:
    inp = _gspo_inputs(seed=130)
    kw = {"beta": 0.1, "ratio_level": "sequence"}
    out, grad = _run(inp, **kw)
    off = ~inp["mask"]
    dirty = dict(inp, logp=torch.where(off, torch.nan, inp["logp"]),
                 old_logp=torch.where(off, torch.inf, inp["old_logp"]))
    out_d, grad_d = _run(dirty, **kw)
    for a, b in zip(out, out_d, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grad, grad_d)
    # Without old_logp every ratio is 1 at either level.
    seq, seq_grad = _run(dict(inp, old_logp=None), **kw)
    tok, tok_grad = _run(dict(inp, old_logp=None), beta=0.1)
    assert all(torch.equal(a, b) for a, b in zip(seq[:7], tok[:7], strict=True))
    assert torch.equal(seq_grad, tok_grad) and tok.sequence_log_ratio is None
    assert torch.equal(seq.sequence_log_ratio, torch.zeros(inp["logp"].shape[0], dtype=torch.float64))


def test_ratio_level_is_checked() -> None:
    with pytest.raises(ValueError, match=r"ratio_level must be one of \('token', 'sequence'\), got 'seq'"):
        _run(_inputs(), ratio_level="seq")

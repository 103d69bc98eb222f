"""policy_loss(surrogate="gmpo"): GMPO's geometric mean of the sign-aware clipped token ratios.

Oracles: the plain-loop :func:`iama_kernels.testing.policy_loss_by_loops` (its gradient written
out by hand), GMPO's row objective written here from its definition (Zhao et al., 2025, eq. 3:
``-Abar exp(mean clipped log-ratio)`` per sequence, the mean over sequences), and verl's own
``geo_mean`` loss (``tests/test_integrations_verl_loss.py``).
"""

from __future__ import annotations

import pytest
import torch

from iama_kernels import BestOfN, policy_loss
from iama_kernels.testing import (
    assert_matches_reference,
    fused_and_separate,
    policy_loss_and_grad,
    policy_loss_by_loops,
    ragged_rows,
    random_rewards,
)

FIELDS = ("loss", "kl", "clip_fraction", "ratio_mean", "log_ratio_mean", "dual_clip_fraction",
          "clip_high_fraction")


def _inputs(S: int = 10, T: int = 13, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """Log-ratios that cross both log-space bounds (+-0.4), mixed-sign advantages with a zero,
    ragged masks with an empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3 - 0.01
    old = logp + 0.6 * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(S, T, generator=g, dtype=torch.float64)
    adv, mask = ragged_rows(g, S, T)
    cast = {k: v.to(dtype) for k, v in (("logp", logp), ("old_logp", old), ("ref_logp", ref))}
    return {**cast, "advantages": adv.to(dtype), "mask": mask}


def _run(inp: dict, impl: str = "reference", **kw: object):
    return policy_loss_and_grad(inp, impl, surrogate="gmpo", **kw)


def _gmpo_by_definition(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        eps_low: float, eps_high: float) -> torch.Tensor:
    """The mean over sequences of ``-Abar exp(mean_t sgn(A) min(sgn(A) lr, sgn(A) clip(lr)))``,
    row by row, with autograd into ``logp``."""
    rows = []
    for s in range(logp.shape[0]):
        keep = mask[s]
        if not bool(keep.any()):
            rows.append(logp.new_zeros(()))
            continue
        lr = (logp[s] - old[s])[keep]
        a = adv[s] if adv.dim() == 1 else adv[s][keep]
        sgn = torch.sign(a)
        term = sgn * torch.minimum(sgn * lr, sgn * lr.clamp(-eps_low, eps_high))
        abar = a if adv.dim() == 1 else a.mean()
        rows.append(-abar * torch.exp(term.mean()))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("advantages", ["row", "token"])
@pytest.mark.parametrize("eps", [(0.4, 0.4), (1.5, 0.1)])
def test_loss_and_gradient_are_gmpos_objective(advantages: str, eps: tuple[float, float]) -> None:
    """loss_type="grpo" without KL is GMPO's objective itself (eps_low above 1 allowed: its
    bounds are on the log-ratio)."""
    inp = _inputs(seed=1)
    if advantages == "token":
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(4),
                                        dtype=torch.float64)
    out, grad = _run(inp, eps_low=eps[0], eps_high=eps[1])
    x = inp["logp"].clone().requires_grad_(True)
    want = _gmpo_by_definition(x, inp["old_logp"], inp["advantages"], inp["mask"], *eps)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(out.loss, want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert float(out.clip_fraction) > 0.05 and grad.abs().max() > 0.01


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("kl_weight", ["none", "ratio"])
@pytest.mark.parametrize("advantages", ["row", "token"])
def test_against_loops(loss_type: str, kl_weight: str, advantages: str) -> None:
    inp = _inputs(seed=len(loss_type) + len(kl_weight))
    if advantages == "token":
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64)
    # fractional weights: the row means are mask-weighted
    inp["mask"] = inp["mask"] * torch.rand(inp["mask"].shape, generator=torch.Generator().manual_seed(5),
                                           dtype=torch.float64).add(0.25)
    kw = {"eps_low": 0.3, "eps_high": 0.4, "beta": 0.05, "loss_type": loss_type, "kl_weight": kl_weight}
    out, grad = _run(inp, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], surrogate="gmpo", **kw)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(out.sequence_log_ratio, want.sequence_log_ratio, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want.grad, rtol=1e-12, atol=1e-14)
    assert 0.05 < float(out.clip_fraction) < 0.7
    assert 0.0 < float(out.clip_high_fraction) < float(out.clip_fraction)  # clipped on both sides


def test_on_policy_it_is_the_mean_advantage_gradient() -> None:
    """Without old_logp every log-ratio is 0: nothing is clipped, every ratio is 1 and a row's
    gradient is ``-A w_t / L`` per token of a row with ``A != 0``: the clipped surrogate's."""
    inp = dict(_inputs(seed=40), old_logp=None)
    out, grad = _run(inp, beta=0.05)
    _, clip_grad = _run_clip(inp, beta=0.05)
    torch.testing.assert_close(grad, clip_grad, rtol=1e-14, atol=1e-16)
    assert float(out.clip_fraction) == 0.0 and float(out.ratio_mean) == 1.0


def _run_clip(inp: dict, **kw: object):
    logp = inp["logp"].clone().requires_grad_(True)
    out = policy_loss(logp, inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"], **kw)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out, grad


def test_masked_values_are_never_read() -> None:
    inp = _inputs(seed=60)
    off = ~inp["mask"]
    token_adv = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
    for adv, dirty_adv in ((inp["advantages"], inp["advantages"]),
                           (token_adv, torch.where(off, torch.nan, token_adv))):
        out, grad = _run(dict(inp, advantages=adv), beta=0.1)
        dirty = dict(inp, logp=torch.where(off, torch.nan, inp["logp"]),
                     old_logp=torch.where(off, torch.inf, inp["old_logp"]),
                     ref_logp=torch.where(off, -torch.inf, inp["ref_logp"]), advantages=dirty_adv)
        out_d, grad_d = _run(dirty, beta=0.1)
        for name in FIELDS:
            assert torch.equal(getattr(out, name), getattr(out_d, name)), name
        assert torch.equal(grad, grad_d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_cpu_matches_reference(cpu_ext, dtype: torch.dtype, mask_kind: str) -> None:
    """The C++ templated row and its pre-pass (every mask kind, half types, row and per-token
    advantages with NaN under the mask, the ratio KL, a non-contiguous logp) against the float64
    reference."""
    S, T = 9, 131
    inp = _inputs(S, T, seed=42, dtype=dtype)
    mask = inp["mask"]
    if mask_kind == "int64":
        mask = mask.long()
    elif mask_kind == "float":
        mask = mask * torch.rand(S, T, generator=torch.Generator().manual_seed(2)).add(0.5)
    noise = torch.randn(S, T, generator=torch.Generator().manual_seed(6)).to(dtype)
    token_adv = torch.where(mask != 0, noise, torch.nan)
    wide = torch.randn(S, 2 * T, generator=torch.Generator().manual_seed(7)).to(dtype)
    wide[:, ::2] = inp["logp"]
    strided = wide[:, ::2]  # a row stride of 2 T, a token stride of 2
    rel = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for loss_type, a, kl_weight, logp in (("grpo", inp["advantages"], "none", inp["logp"]),
                                          ("token", inp["advantages"], "ratio", strided),
                                          ("dr_grpo", token_adv, "none", inp["logp"]),
                                          ("grpo", token_adv, "ratio", strided)):
        case = dict(inp, mask=mask, advantages=a, logp=logp)
        kw = {"beta": 0.05, "loss_type": loss_type, "kl_weight": kl_weight, "eps_low": 0.3, "eps_high": 0.4}
        out, grad = _run(case, impl="cpu", **kw)
        case64 = {k: v.double() if v.is_floating_point() and k != "mask" else v for k, v in case.items()}
        want, want_grad = _run(case64, **kw)
        for name in FIELDS:
            torch.testing.assert_close(getattr(out, name).double(), getattr(want, name), rtol=rel,
                                       atol=rel * 1e-2, msg=f"{loss_type} {name}")
        torch.testing.assert_close(out.sequence_log_ratio.double(), want.sequence_log_ratio, rtol=rel,
                                   atol=rel * 1e-2)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        half = dtype in (torch.bfloat16, torch.float16)
        assert_matches_reference(grad, want_grad, rel=2e-2 if half else rel)
        assert float(want.clip_fraction) > 0.05


def test_cpu_nan_token_makes_its_row_nan(cpu_ext) -> None:
    """A NaN log-prob under the mask is not clipped away: its row's objective and loss are NaN,
    and so is the gradient of each of the row's tokens that is not clipped (a clipped one's is 0),
    as in the reference; the other rows keep theirs."""
    inp = _inputs(S=4, T=70, seed=8, dtype=torch.float32)
    inp["mask"] = torch.ones(4, 70, dtype=torch.bool)
    inp["logp"][2, 5] = torch.nan
    out, grad = _run(inp, impl="cpu")
    want, want_grad = _run(inp)
    assert torch.isnan(out.loss) and torch.isnan(want.loss)
    assert torch.equal(torch.isnan(grad), torch.isnan(want_grad))
    assert torch.isnan(grad[2]).sum() > 10 and torch.isfinite(grad[[0, 1, 3]]).all()


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_nonlinear_grpo_loss_takes_gmpo(impl: str, request: pytest.FixtureRequest) -> None:
    """The one-pass op with GMPO is policy_loss's GMPO on its non-linear advantages."""
    if impl == "cpu":
        request.getfixturevalue("cpu_ext")
    B, G, T = 3, 4, 9
    inp = _inputs(S=B * G, T=T, seed=70, dtype=torch.float32)
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(1))
    kw = {"beta": 0.05, "surrogate": "gmpo", "eps_low": 0.4, "eps_high": 0.4}
    fused, sep = fused_and_separate(inp, rewards, BestOfN(2), impl, **kw)
    assert torch.equal(fused.loss, sep.loss) and torch.equal(fused.clip_fraction, sep.clip_fraction)
    assert torch.equal(fused.sequence_log_ratio, sep.sequence_log_ratio)


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"ratio_level": "sequence"}, ValueError, "surrogate='gmpo' takes token-level ratios"),
    ({"dual_clip": 1.5}, ValueError, "dual_clip applies to surrogate='clip'"),
    ({"eps_low": -0.1}, ValueError, "eps_low must be finite and >= 0"),
    ({"eps_high": float("inf")}, ValueError, "eps_high must be finite and >= 0"),
])
def test_bad_options_name_the_argument(kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _run(_inputs(S=4, T=5, seed=80), **kw)


def test_op_checks_its_own_options(cpu_ext) -> None:
    inp = _inputs(S=4, T=5, seed=80, dtype=torch.float32)
    base = (inp["logp"], inp["old_logp"], None, inp["advantages"], inp["mask"])
    with pytest.raises(ValueError, match="surrogate='gmpo' takes token-level ratios"):
        torch.ops.iama.policy_loss_fwd(*base, 0.2, 0.2, 0.0, "token", None, False, None, True, "gmpo")
    with pytest.raises(ValueError, match="eps_low must be finite and >= 0 with surrogate='gmpo'"):
        torch.ops.iama.policy_loss_fwd(*base, float("inf"), 0.2, 0.0, "token", None, False, None, False,
                                       "gmpo")
    out = torch.ops.iama.policy_loss_fwd(*base, 1.5, 0.2, 0.0, "token", None, False, None, False, "gmpo")
    want = policy_loss(inp["logp"], inp["old_logp"], None, inp["advantages"], inp["mask"], eps_low=1.5,
                       loss_type="token", surrogate="gmpo", impl="reference")
    torch.testing.assert_close(out[0], want.loss)

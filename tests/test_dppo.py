"""policy_loss(surrogate="dppo_tv" / "dppo_kl"): DPPO's trust-region masks on a truncated weight.

Oracles: the plain-loop :func:`iama_kernels.testing.policy_loss_by_loops`, and verl 0.9's own
``dppo_tv``/``dppo_kl`` losses (``tests/test_integrations_verl_loss.py``).
"""

from __future__ import annotations

import pytest
import torch

from iama_kernels import BestOfN
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
SURROGATES = ("dppo_tv", "dppo_kl")


def _inputs(S: int = 10, T: int = 13, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict:
    """Token probabilities between 0.2 and 1 whose changes cross both trust-region bounds,
    mixed-sign advantages with a zero, ragged masks with an empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 1.5 - 0.01
    old = (logp + 0.5 * torch.randn(S, T, generator=g, dtype=torch.float64)).clamp(max=-0.01)
    ref = logp + 0.5 * torch.randn(S, T, generator=g, dtype=torch.float64)
    adv, mask = ragged_rows(g, S, T)
    cast = {k: v.to(dtype) for k, v in (("logp", logp), ("old_logp", old), ("ref_logp", ref))}
    return {**cast, "advantages": adv.to(dtype), "mask": mask}


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("dual_clip", [None, 1.3])
@pytest.mark.parametrize("advantages", ["row", "token"])
def test_against_loops(surrogate: str, loss_type: str, dual_clip: float | None, advantages: str) -> None:
    inp = _inputs(seed=len(loss_type) + (dual_clip is not None))
    if advantages == "token":
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.05, "loss_type": loss_type, "kl_weight": "ratio",
          "dual_clip": dual_clip, "surrogate": surrogate}
    out, grad = _run(inp, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], **kw)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=1e-12, atol=1e-14, msg=name)
    torch.testing.assert_close(grad, want.grad, rtol=1e-12, atol=1e-14)
    assert 0.01 < float(out.clip_fraction) < 0.6  # tokens outside the trust region, and inside
    assert (float(out.dual_clip_fraction) > 0.05) == (dual_clip is not None)  # truncated weights


def test_on_policy_it_is_reinforce() -> None:
    """Without old_logp every token is inside the trust region with weight 1: the gradient is
    PPO's ``-A`` on-policy one."""
    inp = dict(_inputs(seed=40), old_logp=None)
    _, clip_grad = _run(inp, beta=0.05)
    for surrogate in SURROGATES:
        out, grad = _run(inp, beta=0.05, surrogate=surrogate, dual_clip=1.5)
        torch.testing.assert_close(grad, clip_grad, rtol=1e-14, atol=1e-16)
        assert float(out.clip_fraction) == 0.0 and float(out.dual_clip_fraction) == 0.0


def test_the_two_regions_differ() -> None:
    inp = _inputs(seed=41)
    tv, tv_grad = _run(inp, surrogate="dppo_tv")
    kl, kl_grad = _run(inp, surrogate="dppo_kl")
    assert not torch.equal(tv_grad, kl_grad) and float(tv.clip_fraction) != float(kl.clip_fraction)
    wide, _ = _run(inp, surrogate="dppo_tv", eps_low=1.0, eps_high=1.0)  # nothing outside
    assert float(wide.clip_fraction) == 0.0


@pytest.mark.parametrize("surrogate", SURROGATES)
def test_masked_values_are_never_read(surrogate: str) -> None:
    inp = _inputs(seed=60)
    off = ~inp["mask"]
    out, grad = _run(inp, beta=0.1, surrogate=surrogate, dual_clip=1.5)
    dirty = dict(inp, logp=torch.where(off, torch.nan, inp["logp"]),
                 old_logp=torch.where(off, torch.inf, inp["old_logp"]),
                 ref_logp=torch.where(off, -torch.inf, inp["ref_logp"]))
    out_d, grad_d = _run(dirty, beta=0.1, surrogate=surrogate, dual_clip=1.5)
    for name in FIELDS:
        assert torch.equal(getattr(out, name), getattr(out_d, name)), name
    assert torch.equal(grad, grad_d)


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_cpu_matches_reference(cpu_ext, surrogate: str, dtype: torch.dtype, mask_kind: str) -> None:
    """The C++ templated row (every mask kind, half types, row and per-token advantages with NaN
    under the mask, the weight cap, the ratio KL) against the float64 reference."""
    S, T = 9, 131
    inp = _inputs(S, T, seed=42, dtype=dtype)
    mask = inp["mask"]
    if mask_kind == "int64":
        mask = mask.long()
    elif mask_kind == "float":
        mask = mask * torch.rand(S, T, generator=torch.Generator().manual_seed(2)).add(0.5)
    noise = torch.randn(S, T, generator=torch.Generator().manual_seed(6)).to(dtype)
    token_adv = torch.where(mask != 0, noise, torch.nan)
    rel = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2}[dtype]
    for loss_type, a, kl_weight, dual_clip in (("grpo", inp["advantages"], "none", None),
                                               ("token", inp["advantages"], "ratio", 1.3),
                                               ("dr_grpo", token_adv, "none", 1.3),
                                               ("token", token_adv, "ratio", None)):
        case = dict(inp, mask=mask, advantages=a)
        kw = {"beta": 0.05, "loss_type": loss_type, "kl_weight": kl_weight, "dual_clip": dual_clip,
              "surrogate": surrogate, "eps_low": 0.2, "eps_high": 0.28}
        out, grad = _run(case, impl="cpu", **kw)
        case64 = {k: v.double() if v.is_floating_point() and k != "mask" else v for k, v in case.items()}
        want, want_grad = _run(case64, **kw)
        for name in FIELDS:
            torch.testing.assert_close(getattr(out, name).double(), getattr(want, name), rtol=rel,
                                       atol=rel * 1e-2)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert_matches_reference(grad, want_grad, rel=rel if dtype != torch.bfloat16 else 2e-2)
        assert float(want.clip_fraction) > 0.02


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_nonlinear_grpo_loss_takes_dppo(impl: str, request: pytest.FixtureRequest) -> None:
    """The one-pass op with DPPO is policy_loss's DPPO on its non-linear advantages."""
    if impl == "cpu":
        request.getfixturevalue("cpu_ext")
    B, G, T = 3, 4, 9
    inp = _inputs(S=B * G, T=T, seed=70, dtype=torch.float32)
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(1))
    for surrogate in SURROGATES:
        kw = {"beta": 0.05, "surrogate": surrogate, "dual_clip": 1.3, "loss_type": "token"}
        fused, sep = fused_and_separate(inp, rewards, BestOfN(2), impl, **kw)
        assert torch.equal(fused.loss, sep.loss) and torch.equal(fused.clip_fraction, sep.clip_fraction)


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"ratio_level": "sequence"}, ValueError, "surrogate='dppo_tv' takes token-level ratios"),
    ({"dual_clip": 1.0}, ValueError, "dual_clip must be a finite float > 1"),
    ({"eps_low": 1.5}, ValueError, r"eps_low must be in \[0, 1\]"),
])
def test_bad_options_name_the_argument(kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _run(_inputs(S=4, T=5, seed=80), surrogate="dppo_tv", **kw)


def test_op_checks_its_own_options(cpu_ext) -> None:
    inp = _inputs(S=4, T=5, seed=80, dtype=torch.float32)
    base = (inp["logp"], inp["old_logp"], None, inp["advantages"], inp["mask"], 0.2, 0.2, 0.0, "token", None,
            False, 1.5)
    with pytest.raises(ValueError, match="surrogate='dppo_kl' takes token-level ratios"):
        torch.ops.iama.policy_loss_fwd(*base, True, "dppo_kl")

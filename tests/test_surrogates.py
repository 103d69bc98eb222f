"""policy_loss(surrogate=...): CISPO's clipped importance weight and SAPO's soft gate.

Oracles: the plain-loop :func:`iama_kernels.testing.policy_loss_by_loops` (closed-form gradients),
and autograd of each method's objective written out from its paper as TRL and verl state it
(CISPO: MiniMax-M1, arXiv 2506.13585; SAPO: arXiv 2511.20347).
"""

from __future__ import annotations

import pytest
import torch

from iama_kernels import BestOfN, nonlinear_grpo_loss, policy_loss
from iama_kernels.testing import policy_loss_and_grad as _run
from iama_kernels.testing import policy_loss_by_loops, ragged_rows, random_rewards, saturated_sapo_inputs

LOSS_TYPES = ("grpo", "token", "dr_grpo")
FIELDS = ("loss", "kl", "clip_fraction", "ratio_mean", "log_ratio_mean", "dual_clip_fraction",
          "clip_high_fraction")


def _inputs(S: int = 10, T: int = 13, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ratios on both sides of [0.8, 1.28] (rows shifted), mixed-sign advantages with zeros,
    ragged masks with an empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(S, T, generator=g, dtype=torch.float64)
    logp = logp + torch.linspace(-0.6, 0.6, S, dtype=torch.float64).unsqueeze(1)
    ref = logp + 0.5 * torch.randn(S, T, generator=g, dtype=torch.float64)
    adv, mask = ragged_rows(g, S, T)
    return {"logp": logp, "old_logp": old, "ref_logp": ref, "advantages": adv, "mask": mask}


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize(("beta", "kl_weight"), [(0.0, "none"), (0.05, "none"), (0.05, "ratio")])
@pytest.mark.parametrize("advantages", ["row", "token"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_against_loops(surrogate: str, loss_type: str, beta: float, kl_weight: str, advantages: str,
                       ratio_level: str) -> None:
    inp = _inputs(seed=len(loss_type) + int(beta * 100))
    if advantages == "token":
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": beta, "loss_type": loss_type, "kl_weight": kl_weight,
          "ratio_level": ratio_level, "surrogate": surrogate, "tau_pos": 1.3, "tau_neg": 0.7}
    out, grad = _run(inp, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], **kw)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=1e-12, atol=1e-14,
                                   msg=name)
    torch.testing.assert_close(grad, want.grad, rtol=1e-12, atol=1e-14)
    if surrogate == "cispo":
        assert 0.05 < float(out.clip_fraction) < 0.95  # clipped weights and unclipped ones
    else:
        assert float(out.clip_fraction) == 0.0 and float(out.clip_high_fraction) == 0.0
    assert float(out.dual_clip_fraction) == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "token"])
def test_cispo_is_trls_and_verls_cispo(loss_type: str) -> None:
    """Autograd of CISPO's objective ``-sg[clip(rho)] A logp`` with TRL's bound (``clamp(max=
    eps_max)``: ``eps_low=1``, ``eps_high=eps_max - 1``) and with verl's (``[1 - el, 1 + eh]``);
    TRL's ``cispo_clip_ratio`` is ``clip_high_fraction`` and verl's ``pg_clipfrac``
    ``clip_fraction``."""
    inp = _inputs(seed=20)
    m = inp["mask"]
    md = m.double()
    A = inp["advantages"].unsqueeze(1)
    for lo, hi, kw in ((0.0, 1.5, {"eps_low": 1.0, "eps_high": 0.5}),
                       (0.8, 1.28, {"eps_low": 0.2, "eps_high": 0.28})):
        out, grad = _run(inp, loss_type=loss_type, surrogate="cispo", **kw)
        logp = inp["logp"].clone().requires_grad_(True)
        ratio = torch.exp(logp - inp["old_logp"])
        per_token = -ratio.clamp(lo, hi).detach() * A * logp
        if loss_type == "grpo":
            loss = ((per_token * md).sum(-1) / md.sum(-1).clamp(min=1)).mean()
        else:
            loss = (per_token * md).sum() / md.sum()
        (want,) = torch.autograd.grad(loss, logp)
        torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(grad, want, rtol=1e-13, atol=1e-14)
        r = ratio.detach()
        assert float(out.clip_high_fraction) == pytest.approx(
            float(((r > hi) & (A > 0))[m].double().mean()), abs=1e-15)
        assert float(out.clip_fraction) == pytest.approx(
            float((r != r.clamp(lo, hi))[m].double().mean()), abs=1e-15)
        assert float(out.clip_fraction) > 0.05


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_sapo_is_the_soft_gate_objective(ratio_level: str) -> None:
    """Autograd of SAPO's ``-(4 / tau) sigmoid(tau (rho - 1)) A``, ``tau`` by the sign of A, with
    per-token advantages (verl's form) and sequence ratios as GSPO-token's, token-mean."""
    inp = _inputs(seed=30)
    A = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    A[2] = 0.0
    out, grad = _run(dict(inp, advantages=A), loss_type="token", surrogate="sapo", tau_pos=1.0,
                     tau_neg=1.05, ratio_level=ratio_level)
    logp = inp["logp"].clone().requires_grad_(True)
    m = inp["mask"]
    if ratio_level == "sequence":
        seq = ((logp - inp["old_logp"]) * m).sum(-1) / m.sum(-1).clamp(min=1)
        ratio = torch.exp(seq.detach().unsqueeze(1) + logp - logp.detach())
    else:
        ratio = torch.exp(logp - inp["old_logp"])
    f64 = torch.float64  # the temperatures in A's dtype, as verl builds them
    tau = torch.where(A > 0, torch.tensor(1.0, dtype=f64), torch.tensor(1.05, dtype=f64))
    gates = torch.sigmoid(tau * (ratio - 1)) * (4 / tau)
    loss = (-gates * A)[m].sum() / m.sum()
    (want,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(grad, want, rtol=1e-13, atol=1e-14)


def test_on_policy_the_surrogates_share_the_gradient() -> None:
    """At ratio 1 (no old_logp) CISPO's and SAPO's gradients are PPO's ``-A`` per token; off
    policy CISPO keeps a gradient where PPO's clip zeroes it, and SAPO's fades smoothly."""
    inp = _inputs(seed=40)
    on = dict(inp, old_logp=None)
    _, clip_grad = _run(on, beta=0.05)
    for surrogate in ("cispo", "sapo"):
        _, grad = _run(on, beta=0.05, surrogate=surrogate)
        torch.testing.assert_close(grad, clip_grad, rtol=1e-14, atol=1e-16)
    _, clip_grad = _run(inp)
    _, cispo_grad = _run(inp, surrogate="cispo")
    m = inp["mask"]
    zeroed = m & (clip_grad == 0) & (inp["advantages"].unsqueeze(1) != 0)
    assert zeroed.any() and (cispo_grad[zeroed] != 0).all()
    _, sapo_grad = _run(inp, surrogate="sapo")
    assert (sapo_grad[zeroed] != 0).all()


def test_sapo_temperatures_act_by_the_sign_of_the_advantage() -> None:
    inp = _inputs(seed=50)
    _, base = _run(inp, surrogate="sapo")
    _, pos = _run(inp, surrogate="sapo", tau_pos=2.0)
    _, neg = _run(inp, surrogate="sapo", tau_neg=2.0)
    A = inp["advantages"]
    assert torch.equal(pos[A <= 0], base[A <= 0]) and not torch.equal(pos[A > 0], base[A > 0])
    assert torch.equal(neg[A > 0], base[A > 0]) and not torch.equal(neg[A < 0], base[A < 0])
    # Unused by the other surrogates.
    clip, _ = _run(inp, tau_pos=3.0, tau_neg=0.5)
    assert torch.equal(clip.loss, _run(inp)[0].loss)


def test_sapo_saturated_gate_has_a_zero_gradient() -> None:
    """Where SAPO's gate saturates (an infinite ratio, or tau (rho - 1) past the exp range) its
    derivative is 0; autograd's s (1 - s) rho would be 0 * inf = NaN there."""
    logp, old, adv, mask = saturated_sapo_inputs()
    for tau in (1.0, 100.0):
        x = logp.clone().requires_grad_(True)
        out = policy_loss(x, old, None, adv, mask, surrogate="sapo", tau_pos=tau, tau_neg=tau,
                          impl="reference")
        (grad,) = torch.autograd.grad(out.loss, x)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert grad[0, :4].eq(0).all() and grad[0, 4:].ne(0).all()
        if tau == 100.0:
            assert grad[1, :4].eq(0).all()


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
def test_masked_values_are_never_read(surrogate: str) -> None:
    inp = _inputs(seed=60)
    off = ~inp["mask"]
    out, grad = _run(inp, beta=0.1, surrogate=surrogate)
    dirty = dict(inp, logp=torch.where(off, torch.nan, inp["logp"]),
                 old_logp=torch.where(off, torch.inf, inp["old_logp"]),
                 ref_logp=torch.where(off, -torch.inf, inp["ref_logp"]))
    out_d, grad_d = _run(dirty, beta=0.1, surrogate=surrogate)
    for name in FIELDS:
        assert torch.equal(getattr(out, name), getattr(out_d, name)), name
    assert torch.equal(grad, grad_d)


@pytest.mark.parametrize("surrogate", ["cispo", "sapo"])
def test_nonlinear_grpo_loss_passes_the_surrogate(surrogate: str) -> None:
    """The one-pass op's loss is policy_loss's on its advantages, with the surrogate's options."""
    B, G, T = 3, 4, 9
    inp = _inputs(S=B * G, T=T, seed=70)
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(1)).double()
    kw = {"beta": 0.05, "surrogate": surrogate, "tau_pos": 1.2, "eps_low": 1.0, "eps_high": 0.3}
    fused = nonlinear_grpo_loss(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["mask"], rewards,
                                BestOfN(2), impl="reference", **kw)
    sep = policy_loss(inp["logp"], inp["old_logp"], inp["ref_logp"], fused.advantages.reshape(-1),
                      inp["mask"], impl="reference", **kw)
    clip = policy_loss(inp["logp"], inp["old_logp"], inp["ref_logp"], fused.advantages.reshape(-1),
                       inp["mask"], impl="reference", beta=0.05)
    assert torch.equal(fused.loss, sep.loss) and not torch.equal(fused.loss, clip.loss)
    assert torch.equal(fused.clip_fraction, sep.clip_fraction)


@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo"])
@pytest.mark.parametrize("advantages", ["row", "token"])
def test_row_stats_are_the_rows_behind_the_fractions(surrogate: str, advantages: str) -> None:
    """row_stats=True: each row's mask total, clipped and clipped-above weights, as the loops count
    them; they sum to the fractions; off, None and nothing else changes."""
    inp = _inputs(seed=90)
    if advantages == "token":
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(5),
                                        dtype=torch.float64)
    inp["mask"] = inp["mask"] * torch.rand(inp["mask"].shape, generator=torch.Generator().manual_seed(6),
                                           dtype=torch.float64).add(0.5)  # weights
    kw = {"beta": 0.05, "surrogate": surrogate, "dual_clip": 1.5 if surrogate == "clip" else None}
    out, grad = _run(inp, row_stats=True, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], **kw)
    torch.testing.assert_close(out.row_clip_weights, want.row_clip_weights, rtol=1e-13, atol=1e-15)
    rows = out.row_clip_weights
    assert rows.shape == (10, 3) and rows[1].eq(0).all()  # the empty row
    total = rows.sum(0)
    torch.testing.assert_close(total[1] / total[0], out.clip_fraction, rtol=1e-13, atol=0)
    torch.testing.assert_close(total[2] / total[0], out.clip_high_fraction, rtol=1e-13, atol=0)
    if surrogate != "sapo":
        assert rows[:, 1].gt(0).sum() >= 2
    plain, plain_grad = _run(inp, **kw)
    assert plain.row_clip_weights is None and torch.equal(plain_grad, grad)
    assert all(torch.equal(a, b) for a, b in zip(plain[:7], out[:7], strict=True))
    with pytest.raises(TypeError, match="row_stats must be a bool, got int"):
        _run(inp, row_stats=1)


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"surrogate": "ppo"}, ValueError,
     r"surrogate must be one of \('clip', 'cispo', 'sapo', 'vespo', 'dppo_tv', 'dppo_kl', 'gmpo'\), "
     "got 'ppo'"),
    ({"surrogate": None}, ValueError, "surrogate must be one of"),
    ({"surrogate": "sapo", "tau_pos": 0.0}, ValueError, "tau_pos must be finite and > 0"),
    ({"surrogate": "sapo", "tau_neg": float("inf")}, ValueError, "tau_neg must be finite and > 0"),
    ({"tau_neg": -1.0}, ValueError, "tau_neg"),  # checked whatever the surrogate
    ({"surrogate": "sapo", "tau_pos": "1"}, TypeError, "tau_pos must be a float"),
    ({"surrogate": "cispo", "dual_clip": 3.0}, ValueError,
     r"dual_clip applies to surrogate='clip' \(and DPPO's weight cap\) only, got surrogate='cispo'"),
    ({"surrogate": "sapo", "dual_clip": 3.0}, ValueError, "dual_clip applies to surrogate='clip'"),
])
@pytest.mark.parametrize("op", ["policy_loss", "nonlinear_grpo_loss"])
def test_bad_options_name_the_argument(op: str, kw: dict, error: type, match: str) -> None:
    inp = _inputs(S=4, T=5, seed=80)
    with pytest.raises(error, match=match):
        if op == "policy_loss":
            _run(inp, **kw)
        else:
            nonlinear_grpo_loss(inp["logp"], inp["old_logp"], None, inp["mask"],
                                random_rewards(2, 2, generator=torch.Generator().manual_seed(0)),
                                BestOfN(1), impl="reference", **kw)

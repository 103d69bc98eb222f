"""policy_loss(surrogate="vespo"): VESPO's gamma weight of each sequence's ratio times REINFORCE.

Oracles: the plain-loop :func:`iama_kernels.testing.policy_loss_by_loops`, and autograd of the
objective as TRL 1.16 writes it (``GRPOTrainer.get_gamma_weights``: ``phi(w) = exp(lambda +
k log w - lambda w)`` of the sequence ratio, detached, times ``-A logp``), written out here.
"""

from __future__ import annotations

import math

import pytest
import torch

from iama_kernels import BestOfN, nonlinear_grpo_loss, policy_loss, vespo_phi
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
# (k_pos, lambda_pos, k_neg, lambda_neg), not TRL's defaults so that a swapped pair shows
VESPO = {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 3.0, "vespo_lambda_neg": 1.2}


def _inputs(S: int = 10, T: int = 13, seed: int = 0, dtype: torch.dtype = torch.float64,
            spread: float = 0.25) -> dict[str, torch.Tensor]:
    """Sequence log-ratios across about [-2, 2] (phi from near 0 to above 1), mixed-sign
    advantages with a zero, ragged masks with an empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(S, T, generator=g, dtype=torch.float64)
    old = old + torch.linspace(-2.4, 2.4, S, dtype=torch.float64).unsqueeze(1) / T  # rows apart
    ref = logp + 0.5 * torch.randn(S, T, generator=g, dtype=torch.float64)
    adv, mask = ragged_rows(g, S, T)
    cast = {k: v.to(dtype) for k, v in (("logp", logp), ("old_logp", old), ("ref_logp", ref))}
    return {**cast, "advantages": adv.to(dtype), "mask": mask}


def _run(inp: dict, impl: str = "reference", **kw: object):
    return policy_loss_and_grad(inp, impl, surrogate="vespo", **kw)


def _trl_phi(logp: torch.Tensor, old: torch.Tensor, A: torch.Tensor, mask: torch.Tensor,
             k_pos: float, lam_pos: float, k_neg: float, lam_neg: float) -> torch.Tensor:
    """TRL's get_gamma_weights, restated (advantages [S, 1] or [S, T])."""
    lower = math.log(1e-8)
    seq = (torch.clamp(logp - old, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    log_w = seq.clamp(lower, 20.0)
    nonneg = A >= 0
    f64 = {"dtype": torch.float64}  # TRL's are float32 tensors: the pairs exactly here
    k = torch.where(nonneg, torch.tensor(k_pos, **f64), torch.tensor(k_neg, **f64))
    lam = torch.where(nonneg, torch.tensor(lam_pos, **f64), torch.tensor(lam_neg, **f64)).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize(("beta", "kl_weight"), [(0.0, "none"), (0.05, "none"), (0.05, "ratio")])
@pytest.mark.parametrize("advantages", ["row", "token"])
def test_against_loops(loss_type: str, beta: float, kl_weight: str, advantages: str) -> None:
    inp = _inputs(seed=len(loss_type) + int(beta * 100))
    if advantages == "token":
        inp["advantages"] = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64)
    kw = {"beta": beta, "loss_type": loss_type, "kl_weight": kl_weight, **VESPO}
    out, grad = _run(inp, **kw)
    want = policy_loss_by_loops(inp["logp"], inp["old_logp"], inp["ref_logp"], inp["advantages"],
                                inp["mask"], surrogate="vespo", **kw)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), rtol=1e-12, atol=1e-14,
                                   msg=name)
    torch.testing.assert_close(grad, want.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.sequence_log_ratio, want.sequence_log_ratio, rtol=1e-13, atol=1e-15)
    assert float(out.clip_fraction) == 0.0 and float(out.clip_high_fraction) == 0.0
    log_w = out.sequence_log_ratio[inp["mask"].any(-1)]
    assert float(log_w.min()) < -0.5 and float(log_w.max()) > 0.5  # weights well away from 1


@pytest.mark.parametrize("advantages", ["row", "token"])
def test_is_trls_vespo_objective(advantages: str) -> None:
    """Autograd of TRL's ``-sg[phi] A logp`` (DAPO's token sum over the tokens)."""
    inp = _inputs(seed=20)
    A = inp["advantages"].unsqueeze(1)
    if advantages == "token":
        A = torch.randn(inp["logp"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        A[2] = 0.0
    md = inp["mask"].double()
    logp = inp["logp"].clone().requires_grad_(True)
    phi = _trl_phi(logp.detach(), inp["old_logp"], A, md, *VESPO.values())
    loss = (-phi * A * logp * md).sum() / md.sum()
    (want,) = torch.autograd.grad(loss, logp)
    out, grad = _run(dict(inp, advantages=A if advantages == "token" else inp["advantages"]),
                     loss_type="token", **VESPO)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want, rtol=1e-13, atol=1e-15)
    assert float(phi.min()) < 0.5 and float(phi.max()) > 1.0


def test_weight_pairs_act_by_the_sign_of_the_advantage() -> None:
    """``(k_pos, lambda_pos)`` weigh the advantages >= 0 (zero included), the ``_neg`` pair the
    others; without old_logp every weight is phi(1) = 1 and the loss is CISPO's on-policy one."""
    inp = _inputs(seed=30)
    A = inp["advantages"]
    _, base = _run(inp, **VESPO)
    _, pos = _run(inp, **dict(VESPO, vespo_k_pos=0.5))
    _, neg = _run(inp, **dict(VESPO, vespo_lambda_neg=4.0))
    assert torch.equal(pos[A < 0], base[A < 0]) and not torch.equal(pos[A > 0], base[A > 0])
    assert torch.equal(neg[A >= 0], base[A >= 0]) and not torch.equal(neg[A < 0], base[A < 0])
    on = dict(inp, old_logp=None)
    out, grad = _run(on, beta=0.05, **VESPO)
    logp = on["logp"].clone().requires_grad_(True)
    cispo = policy_loss(logp, None, on["ref_logp"], A, on["mask"], beta=0.05, surrogate="cispo",
                        impl="reference")
    (cispo_grad,) = torch.autograd.grad(cispo.loss, logp)
    torch.testing.assert_close(grad, cispo_grad, rtol=1e-14, atol=1e-16)
    assert out.sequence_log_ratio.eq(0).all()


def test_vespo_phi_is_trls_weight() -> None:
    """The public helper: TRL's weight from a log weight, by the sign of each advantage."""
    log_w = torch.tensor([[-30.0], [-1.0], [0.0], [0.7], [20.0]], dtype=torch.float64)
    A = torch.tensor([[1.0], [-1.0], [0.0], [-2.0], [1.0]], dtype=torch.float64)
    got = vespo_phi(log_w, A, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
    k = torch.tensor([[2.0], [3.0], [2.0], [3.0], [2.0]], dtype=torch.float64)
    lam = torch.tensor([[3.0], [2.0], [3.0], [2.0], [3.0]], dtype=torch.float64)
    want = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert float(got[2]) == 1.0  # phi(1) = 1
    # k log w overflows: a non-finite weight is 0, as TRL's nan_to_num makes it
    big = vespo_phi(torch.tensor([20.0]), torch.tensor([1.0]), k_pos=1e9, lambda_pos=1e-4)
    assert big.tolist() == [0.0]
    with pytest.raises(ValueError, match="lambda_pos must be a finite float > 0"):
        vespo_phi(log_w, A, lambda_pos=0.0)


def test_masked_values_are_never_read() -> None:
    inp = _inputs(seed=60)
    off = ~inp["mask"]
    out, grad = _run(inp, beta=0.1)
    dirty = dict(inp, logp=torch.where(off, torch.nan, inp["logp"]),
                 old_logp=torch.where(off, torch.inf, inp["old_logp"]),
                 ref_logp=torch.where(off, -torch.inf, inp["ref_logp"]))
    out_d, grad_d = _run(dirty, beta=0.1)
    for name in FIELDS:
        assert torch.equal(getattr(out, name), getattr(out_d, name)), name
    assert torch.equal(grad, grad_d) and torch.equal(out.sequence_log_ratio, out_d.sequence_log_ratio)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "int64", "float"])
def test_cpu_matches_reference(cpu_ext, dtype: torch.dtype, mask_kind: str) -> None:
    """The C++ pre-pass and templated row (every mask kind, half types, row and per-token
    advantages with NaN under the mask, the ratio KL) against the float64 reference."""
    S, T = 9, 131
    inp = _inputs(S, T, seed=40, dtype=dtype, spread=0.12)
    mask = inp["mask"]
    if mask_kind == "int64":
        mask = mask.long()
    elif mask_kind == "float":
        mask = mask * torch.rand(S, T, generator=torch.Generator().manual_seed(2)).add(0.5)
    noise = torch.randn(S, T, generator=torch.Generator().manual_seed(6)).to(dtype)
    token_adv = torch.where(mask != 0, noise, torch.nan)
    rel = 1e-5 if dtype != torch.bfloat16 else 1e-2
    if dtype == torch.float64:  # the C++ k3 avoids exp(d) - d - 1's cancellation: 1.2e-10 apart
        rel = 1e-9
    for loss_type, a, kl_weight, beta in (("grpo", inp["advantages"], "none", 0.0),
                                          ("token", inp["advantages"], "ratio", 0.05),
                                          ("dr_grpo", token_adv, "none", 0.05),
                                          ("token", token_adv, "ratio", 0.05)):
        case = dict(inp, mask=mask, advantages=a)
        kw = {"beta": beta, "loss_type": loss_type, "kl_weight": kl_weight, **VESPO}
        out, grad = _run(case, impl="cpu", **kw)
        case64 = {k: v.double() if v.is_floating_point() and k != "mask" else v for k, v in case.items()}
        want, want_grad = _run(case64, **kw)
        for name in FIELDS:
            torch.testing.assert_close(getattr(out, name).double(), getattr(want, name), rtol=rel,
                                       atol=rel * 1e-2)
        torch.testing.assert_close(out.sequence_log_ratio.double(), want.sequence_log_ratio,
                                   rtol=rel, atol=rel)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert_matches_reference(grad, want_grad, rel=rel if dtype != torch.bfloat16 else 2e-2)
        # the weights matter: CISPO's term with its clip range shut is this without phi
        cispo = policy_loss(case["logp"], case["old_logp"], case["ref_logp"], a, mask, impl="cpu",
                            surrogate="cispo", eps_low=0.0, eps_high=0.0, beta=beta, loss_type=loss_type,
                            kl_weight=kl_weight)
        assert not torch.allclose(cispo.loss.double(), out.loss.double(), rtol=1e-3)


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"vespo_lambda_pos": 0.0}, ValueError, "vespo_lambda_pos must be a finite float > 0, got 0.0"),
    ({"vespo_lambda_neg": -1.0}, ValueError, "vespo_lambda_neg must be a finite float > 0"),
    ({"vespo_k_pos": float("nan")}, ValueError, "vespo_k_pos must be a finite float, got nan"),
    ({"vespo_k_neg": "2"}, TypeError, "vespo_k_neg must be a float, got str"),
    ({"dual_clip": 3.0}, ValueError, r"dual_clip applies to surrogate='clip' .* got surrogate='vespo'"),
    ({"ratio_level": "sequence"}, ValueError, "surrogate='vespo' takes token-level ratios"),
])
def test_bad_options_name_the_argument(kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _run(_inputs(S=4, T=5, seed=80), **kw)


def test_options_are_checked_whatever_the_surrogate() -> None:
    inp = _inputs(S=4, T=5, seed=80)
    with pytest.raises(ValueError, match="vespo_lambda_pos"):
        policy_loss(inp["logp"], inp["old_logp"], None, inp["advantages"], inp["mask"], vespo_lambda_pos=0.0)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_nonlinear_grpo_loss_takes_vespo(impl: str, request: pytest.FixtureRequest) -> None:
    """The one-pass op with VESPO is policy_loss's VESPO on its non-linear advantages (C++: the
    same token pass, so bit for bit); float32 against the float64 reference."""
    if impl == "cpu":
        request.getfixturevalue("cpu_ext")
    B, G, T = 3, 4, 9
    inp = _inputs(S=B * G, T=T, seed=70, dtype=torch.float32)
    rewards = random_rewards(B, G, generator=torch.Generator().manual_seed(1))
    kw = {"beta": 0.05, "surrogate": "vespo", "loss_type": "token", **VESPO}
    fused, sep = fused_and_separate(inp, rewards, BestOfN(2), impl, **kw)
    assert torch.equal(fused.loss, sep.loss) and torch.equal(fused.sequence_log_ratio, sep.sequence_log_ratio)
    cispo = policy_loss(inp["logp"], inp["old_logp"], inp["ref_logp"], fused.advantages.reshape(-1),
                        inp["mask"], impl=impl, **dict(kw, surrogate="cispo", eps_low=0.0, eps_high=0.0))
    assert not torch.allclose(fused.loss, cispo.loss, rtol=1e-3)
    want = nonlinear_grpo_loss(*(inp[k].double() for k in ("logp", "old_logp", "ref_logp")), inp["mask"],
                               rewards.double(), BestOfN(2), impl="reference", **kw)
    torch.testing.assert_close(fused.loss.double(), want.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused.sequence_log_ratio.double(), want.sequence_log_ratio, rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="surrogate='vespo' takes token-level ratios"):
        nonlinear_grpo_loss(inp["logp"], inp["old_logp"], None, inp["mask"], rewards, BestOfN(2),
                            impl=impl, surrogate="vespo", ratio_level="sequence")


def test_op_checks_its_own_options(cpu_ext) -> None:
    inp = _inputs(S=4, T=5, seed=80, dtype=torch.float32)
    op = torch.ops.iama.policy_loss_fwd
    base = (inp["logp"], inp["old_logp"], None, inp["advantages"], inp["mask"], 0.2, 0.2, 0.0, "token", None,
            False, None)
    with pytest.raises(ValueError, match="vespo_lambda_pos/_neg finite and > 0"):
        op(*base, False, "vespo", 1.0, 1.05, False, 2.0, 0.0)
    with pytest.raises(ValueError, match="surrogate='vespo' takes token-level ratios"):
        op(*base, True, "vespo")

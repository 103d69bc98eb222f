"""nonlinear_grpo_loss == group_advantages followed by policy_loss (values and gradients)."""

from __future__ import annotations

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
    group_advantages,
    nonlinear_grpo_loss,
    policy_loss,
)
from iama_kernels.testing import random_rewards, reference_grad_pair, reference_pair

OBJECTIVES = [
    BestOfN(4),
    Objective([Criterion("a", BestOfN(3)), Criterion("b", SoftBestOfN(0.1)), Criterion("c", Mean())], Min()),
    Objective([Criterion("short", BestOfN(2)), Criterion("long", BestOfN(4))], SmoothMin([0.5, 0.5], 2.0)),
]


def _tokens(B: int, G: int, T: int, seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = B * G
    logp = -3 * torch.rand(S, T, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (S,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return {"logp": logp.to(dtype), "old_logp": old.to(dtype), "ref_logp": ref.to(dtype), "mask": mask}


@pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
@pytest.mark.parametrize("estimator", ["plugin", "unbiased"])
@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_equals_composition(objective: object, estimator: str, loss_type: str, scale: str) -> None:
    B, G, T = 3, 5, 7
    m = 1 if not isinstance(objective, Objective) else len(objective)
    tok = _tokens(B, G, T, seed=m)
    rewards = random_rewards(B, G, ties=True, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                             m=None if m == 1 else m)
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.04, "loss_type": loss_type}

    logp1 = tok["logp"].clone().requires_grad_(True)
    fused = nonlinear_grpo_loss(logp1, tok["old_logp"], tok["ref_logp"], tok["mask"], rewards, objective,
                                estimator=estimator, scale=scale, impl="reference", **kw)
    (g1,) = torch.autograd.grad(fused.loss, logp1)

    adv = group_advantages(rewards, objective, estimator=estimator, scale=scale, impl="reference")
    logp2 = tok["logp"].clone().requires_grad_(True)
    two = policy_loss(logp2, tok["old_logp"], tok["ref_logp"], adv.advantages.reshape(-1), tok["mask"],
                      impl="reference", **kw)
    (g2,) = torch.autograd.grad(two.loss, logp2)

    assert torch.equal(fused.loss, two.loss)
    assert torch.equal(g1, g2)
    assert torch.equal(fused.advantages, adv.advantages)
    assert torch.equal(fused.values, adv.values)
    assert torch.equal(fused.criterion_weights, adv.criterion_weights)
    for name in ("kl", "clip_fraction", "ratio_mean"):
        assert torch.equal(getattr(fused, name), getattr(two, name))
    assert fused.loss.requires_grad
    assert fused.sequence_log_ratio is None  # per-token ratios
    assert not any(t.requires_grad for t in fused[1:-1])


def test_criterion_weights_and_optional_inputs() -> None:
    B, G, T = 4, 6, 5
    tok = _tokens(B, G, T, seed=7)
    g = torch.Generator().manual_seed(2)
    rewards = random_rewards(B, G, ties=True, dtype=torch.float64, generator=g, m=2)
    obj = Objective([Criterion("a", BestOfN(3)), Criterion("b", SoftBestOfN(0.5))])
    out = nonlinear_grpo_loss(tok["logp"], None, None, tok["mask"], rewards, obj,
                              criterion_weights=[0.9, 0.1], impl="reference")
    adv = group_advantages(rewards, obj, criterion_weights=[0.9, 0.1], impl="reference")
    ref = policy_loss(tok["logp"], None, None, adv.advantages.reshape(-1), tok["mask"], impl="reference")
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(out.criterion_weights, torch.tensor([0.9, 0.1], dtype=torch.float64))
    assert float(out.ratio_mean) == 1.0 and float(out.kl) == 0.0


def test_float32_against_float64_oracle() -> None:
    B, G, T = 4, 8, 9
    tok = _tokens(B, G, T, seed=3, dtype=torch.float32)
    rewards = random_rewards(B, G, ties=True, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
    (o64, g64), (o32, g32) = reference_grad_pair(
        nonlinear_grpo_loss, tok["logp"], tok["old_logp"], tok["ref_logp"], tok["mask"], rewards, BestOfN(4),
        beta=0.04, wrt=0)
    assert o32.loss.dtype == torch.float32 and o64.loss.dtype == torch.float64
    eps32 = torch.finfo(torch.float32).eps
    # Measured: float32 within ~1e-6 relative; group scaling amplifies advantage errors slightly.
    assert abs(float(o32.loss.detach()) - float(o64.loss.detach())) <= 256 * eps32 * max(
        1.0, float(o64.advantages.abs().max()))
    torch.testing.assert_close(g32.double(), g64, rtol=0, atol=256 * eps32 * float(g64.abs().max()))
    adv64, adv32 = reference_pair(group_advantages, rewards, BestOfN(4))
    torch.testing.assert_close(o32.advantages.double(), adv64.advantages, rtol=0,
                               atol=256 * eps32 * float(adv64.advantages.abs().max()))
    assert torch.equal(o32.advantages, adv32.advantages)


TOKEN_OPTIONS = {
    # TRL's bias-corrected KL; the plain KL must give another kl metric.
    "ratio-kl": ({"beta": 0.1, "loss_type": "token", "kl_weight": "ratio"}, {"kl_weight": "none"}, "kl",
                 {"kl_weight": "rho"}, "kl_weight must be one of"),
    # verl's dual clip; without it, no token is dual-clipped.
    "dual-clip": ({"beta": 0.05, "loss_type": "grpo", "dual_clip": 1.1}, {"dual_clip": None},
                  "dual_clip_fraction", {"dual_clip": 0.9}, "dual_clip must be"),
}


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("option", list(TOKEN_OPTIONS))
def test_token_options_equal_composition(impl: str, scale: str, option: str) -> None:
    """kl_weight and dual_clip in the one-pass op are policy_loss with them on its advantages."""
    options, off, metric, bad, message = TOKEN_OPTIONS[option]
    B, G, T = 3, 5, 7
    tok = _tokens(B, G, T, seed=9, dtype=torch.float32)
    rewards = random_rewards(B, G, m=2, generator=torch.Generator().manual_seed(2))
    objective = OBJECTIVES[2]
    kw = {"eps_low": 0.2, "eps_high": 0.28, **options}
    x = tok["logp"].clone().requires_grad_(True)
    fused = nonlinear_grpo_loss(x, tok["old_logp"], tok["ref_logp"], tok["mask"], rewards, objective,
                                scale=scale, impl=impl, **kw)
    (grad,) = torch.autograd.grad(fused.loss, x)
    adv = group_advantages(rewards.double(), objective, scale=scale, impl="reference")
    (oracle, grad64), _ = reference_grad_pair(policy_loss, tok["logp"], tok["old_logp"], tok["ref_logp"],
                                              adv.advantages.reshape(-1), tok["mask"], **kw)
    for field in ("loss", "kl", "clip_fraction", "ratio_mean", "log_ratio_mean", "dual_clip_fraction",
                  "clip_high_fraction"):
        torch.testing.assert_close(getattr(fused, field).double(), getattr(oracle, field),
                                   rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=2e-5, atol=1e-6)
    plain = nonlinear_grpo_loss(tok["logp"], tok["old_logp"], tok["ref_logp"], tok["mask"], rewards,
                                objective, scale=scale, impl=impl, **dict(kw, **off))
    assert abs(float(getattr(plain, metric)) - float(getattr(fused, metric))) > 1e-3
    with pytest.raises(ValueError, match=message):
        nonlinear_grpo_loss(x, None, None, tok["mask"], rewards, objective, **bad)

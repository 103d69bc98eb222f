"""pytest-benchmark version of benchmarks/run_cpu.py (the same shapes), for comparing runs with
``pytest-benchmark compare``. Not part of the default test run (``testpaths = ["tests"]``):

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from iama_kernels import (
    BestOfN,
    Criterion,
    Objective,
    WeightedSum,
    group_advantages,
    nonlinear_grpo_loss,
    policy_loss,
)

OBJECTIVE = Objective([Criterion("a", BestOfN(4)), Criterion("b", BestOfN(4))], WeightedSum([0.5, 0.5]))


@pytest.fixture(params=["cpu", "reference"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "cpu":
        from iama_kernels import _extension

        try:
            _extension.load()
        except _extension.ExtensionUnavailable as error:
            pytest.skip(f"C++ CPU extension unavailable: {error}")
    return request.param


def _tokens(S: int, T: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(S, T, generator=g) * 2
    old = logp + 0.05 * torch.randn(S, T, generator=g)
    ref = logp + 0.05 * torch.randn(S, T, generator=g)
    return logp, old, ref, torch.rand(S, T, generator=g) < 0.9


def test_group_advantages(benchmark, impl):
    rewards = torch.randn(4096, 16, 2)
    benchmark(lambda: group_advantages(rewards, OBJECTIVE, estimator="unbiased", impl=impl))


def test_policy_loss_fwd_bwd(benchmark, impl):
    logp, old, ref, mask = _tokens(512, 2048)
    adv = torch.randn(512)
    x = logp.clone().requires_grad_(True)

    def step() -> None:
        x.grad = None
        policy_loss(x, old, ref, adv, mask, beta=0.04, impl=impl).loss.backward()

    benchmark(step)


def test_nonlinear_grpo_loss_fwd_bwd(benchmark, impl):
    logp, old, ref, mask = _tokens(512, 2048)
    rewards = torch.randn(32, 16, 2)
    x = logp.clone().requires_grad_(True)

    def step() -> None:
        x.grad = None
        nonlinear_grpo_loss(x, old, ref, mask, rewards, OBJECTIVE, estimator="unbiased", beta=0.04,
                            impl=impl).loss.backward()

    benchmark(step)

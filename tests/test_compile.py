"""One ``torch.compile(fullgraph=True)`` test per public function, for ``impl="cpu"`` (the
``iama`` custom ops, traced through their fake functions and autograd formulas) and
``impl="reference"`` (eager torch ops): the compiled result equals the eager one, and the loss
functions backpropagate through the compiled graph."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iama_kernels import (
    BestOfN,
    Criterion,
    Objective,
    SmoothMin,
    SoftBestOfN,
    first_variation,
    group_advantages,
    group_values,
    nonlinear_grpo_loss,
    policy_loss,
)
from iama_kernels.testing import random_rewards


@pytest.fixture(params=["cpu", "reference"])
def impl(request: pytest.FixtureRequest) -> str:
    """Each test runs for both backends; ``cpu`` is skipped when the extension cannot be built."""
    if request.param == "cpu":
        from iama_kernels import _extension

        try:
            _extension.load()
        except _extension.ExtensionUnavailable as error:
            pytest.skip(f"C++ CPU extension unavailable: {error}")
    torch._dynamo.reset()
    return request.param


OBJECTIVE = Objective([Criterion("a", BestOfN(3)), Criterion("b", SoftBestOfN(0.3))], SmoothMin([1, 1], 2.0))


def _assert_same(compiled: object, eager: object) -> None:
    """Inductor fuses and reorders the float32 torch arithmetic around the ops (the reference, and
    lambda for the C++ path), so results agree to a few float32 ulps of the outputs' scale
    (measured: <= 3e-7 absolute on values of order 1), not bit for bit."""
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    eager = eager if isinstance(eager, tuple) else (eager,)
    for a, b in zip(compiled, eager, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=4e-6 * scale)


def _token_inputs(S: int, T: int) -> tuple[torch.Tensor, ...]:
    logp = -torch.rand(S, T)
    old = logp + 0.2 * torch.randn(S, T)
    ref = logp + 0.2 * torch.randn(S, T)
    mask = torch.rand(S, T) < 0.8
    return logp, old, ref, mask


def test_first_variation_compiles(impl):
    rewards = random_rewards(6, 7)

    def fn(r: torch.Tensor) -> torch.Tensor:
        return first_variation(r, BestOfN(3), estimator="unbiased", impl=impl)

    _assert_same(torch.compile(fn, fullgraph=True)(rewards), fn(rewards))


def test_group_values_compiles(impl):
    rewards = random_rewards(6, 7)

    def fn(r: torch.Tensor) -> torch.Tensor:
        return group_values(r, SoftBestOfN(0.5), impl=impl)

    _assert_same(torch.compile(fn, fullgraph=True)(rewards), fn(rewards))


def test_group_advantages_compiles(impl):
    rewards = random_rewards(6, 7, m=2)
    # The reference's valid-mask path loops over the distinct valid counts (data-dependent), so a
    # valid mask is compiled through the C++ ops only.
    valid = None
    if impl == "cpu":
        valid = torch.rand(6, 7) < 0.8
        valid[:, :3] = True

    def fn(r: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return tuple(group_advantages(r, OBJECTIVE, estimator="unbiased", scale="batch", valid=v, impl=impl))

    _assert_same(torch.compile(fn, fullgraph=True)(rewards, valid), fn(rewards, valid))


@pytest.mark.parametrize(("kl_weight", "ratio_level", "surrogate"),
                         [("none", "token", "clip"), ("ratio", "token", "clip"), ("none", "sequence", "clip"),
                          ("ratio", "token", "cispo"), ("none", "sequence", "sapo"),
                          ("ratio", "token", "vespo")])
def test_policy_loss_compiles_and_backpropagates(impl, kl_weight, ratio_level, surrogate):
    logp, old, ref, mask = _token_inputs(6, 33)
    adv = torch.randn(6)

    def fn(lp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = policy_loss(lp, old, ref, adv, mask, beta=0.04, kl_weight=kl_weight, ratio_level=ratio_level,
                          surrogate=surrogate, tau_neg=1.4, impl=impl)
        return tuple(t for t in out if t is not None)  # sequence_log_ratio: None for token ratios

    results = []
    for f in (torch.compile(fn, fullgraph=True), fn):
        x = logp.clone().requires_grad_(True)
        out = f(x)
        assert len(out) == (8 if ratio_level == "sequence" or surrogate == "vespo" else 7)
        out[0].backward()
        results.append((*[t.detach() for t in out], x.grad))
    _assert_same(results[0], results[1])


def test_nonlinear_grpo_loss_compiles_and_backpropagates(impl):
    B, G, T = 3, 5, 17
    rewards = random_rewards(B, G, m=2)
    logp, old, ref, mask = _token_inputs(B * G, T)

    def fn(lp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = nonlinear_grpo_loss(lp, old, ref, mask, rewards, OBJECTIVE, beta=0.04, impl=impl)
        return tuple(out[:-1])  # sequence_log_ratio: None for token ratios

    results = []
    for f in (torch.compile(fn, fullgraph=True), fn):
        x = logp.clone().requires_grad_(True)
        out = f(x)
        out[0].backward()
        results.append((*[t.detach() for t in out], x.grad))
    _assert_same(results[0], results[1])


def test_constant_marker_matches_torch() -> None:
    """``_extension.unavailable_reason`` is marked for torch.compile without importing dynamo at
    import time; the marker must be the one ``torch.compiler.assume_constant_result`` sets."""
    from iama_kernels import _extension

    def probe() -> None:
        return None

    marked = torch.compiler.assume_constant_result(probe)
    markers = {k: v for k, v in vars(marked).items() if k.startswith("_dynamo")}
    assert markers == {"_dynamo_marked_constant": True}
    assert _extension.unavailable_reason._dynamo_marked_constant is True


def test_first_use_under_compile_in_a_fresh_process() -> None:
    """A process whose first call of the C++ backend is traced by torch.compile(fullgraph=True):
    the extension is loaded at trace time (the constant-marked probe), not through a graph break.
    Also: ``import iama_kernels`` itself imports neither torch._dynamo nor triton."""
    from iama_kernels import _extension

    try:
        _extension.load()  # build here (once) so that the child only loads
    except _extension.ExtensionUnavailable as error:
        pytest.skip(f"C++ CPU extension unavailable: {error}")
    code = (
        "import sys, torch\n"
        "import iama_kernels as ik\n"
        "assert 'torch._dynamo' not in sys.modules and 'triton' not in sys.modules\n"
        "logp = -torch.rand(6, 9); mask = torch.rand(6, 9) < 0.8; adv = torch.randn(6)\n"
        "f = torch.compile(lambda x: ik.policy_loss(x, x.detach(), None, adv, mask, impl='cpu').loss,\n"
        "                  fullgraph=True, backend='aot_eager')\n"
        "x = logp.clone().requires_grad_(True)\n"
        "f(x).backward()\n"
        "y = logp.clone().requires_grad_(True)\n"
        "ik.policy_loss(y, y.detach(), None, adv, mask, impl='cpu').loss.backward()\n"
        "assert torch.equal(x.grad, y.grad)\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

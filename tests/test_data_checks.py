"""set_data_checks: data-dependent validation can be switched off; shape checks cannot."""

from __future__ import annotations

import pytest
import torch

import iama_kernels as ik


@pytest.fixture
def checks_off():
    ik.set_data_checks(False)
    yield
    ik.set_data_checks(True)


def test_nan_rewards_rejected_by_default() -> None:
    with pytest.raises(ValueError, match=r"rewards must be finite.*group 1"):
        ik.group_advantages(torch.tensor([[1.0, 2.0], [0.0, float("nan")]]), ik.Mean(), impl="reference")


def test_data_checks_off_skips_finiteness_but_not_shapes(checks_off: None) -> None:
    rewards = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    out = ik.group_advantages(rewards, ik.Mean(), impl="reference")
    assert torch.isfinite(out.advantages).all()
    bad = torch.tensor([[1.0, float("inf")]])
    ik.group_advantages(bad, ik.Mean(), impl="reference")  # no error: the caller opted out
    logp = torch.zeros(2, 3)
    ik.policy_loss(logp, None, None, torch.tensor([float("nan"), 0.0]), torch.ones(2, 3), impl="reference")
    with pytest.raises(ValueError, match="rewards must have shape"):
        ik.group_advantages(torch.zeros(2), ik.Mean())
    with pytest.raises(ValueError, match="advantages must have shape"):
        ik.policy_loss(logp, None, None, torch.zeros(3), torch.ones(2, 3))


def test_data_checks_restored() -> None:
    ik.set_data_checks(False)
    ik.set_data_checks(True)
    with pytest.raises(ValueError, match="advantages must be finite"):
        ik.policy_loss(torch.zeros(1, 2), None, None, torch.tensor([float("nan")]), torch.ones(1, 2))

"""``iama info``: versions, and every backend of every op checked against the float64 reference."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from iama import cli, info
from iama_kernels import _extension, group_advantages
from iama_kernels._dispatch import Backend
from iama_kernels.advantages import api as advantages_api

# Triton's interpreter (on here without a GPU) warns about numpy scalars in its own code.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _auto_backend() -> str:
    return "cpu" if _extension.unavailable_reason() is None else "reference"


def test_every_backend_that_runs_is_right_on_cpu() -> None:
    outcomes = info.check_device(torch.device("cpu"))
    ops = {o.op for o in outcomes}
    assert ops == {"first_variation", "group_values", "group_advantages", "policy_loss",
                   "policy_loss ratio kl", "policy_loss ppo", "policy_loss gspo", "policy_loss cispo",
                   "policy_loss sapo", "policy_loss vespo", "policy_loss dppo", "policy_loss gmpo",
                   "policy_loss k2+dro", "sequence_log_ratio", "covariance_top_k", "covariance_band",
                   "nonlinear_grpo_loss"}
    by = {(o.op, o.impl): o for o in outcomes}
    for op in ops:
        assert by[(op, "reference")].status == "ok"
        assert by[(op, "cpu")].status == ("ok" if _extension.unavailable_reason() is None else "refused")
        assert by[(op, "auto")].detail == _auto_backend()
        # conftest turns the Triton interpreter on without a GPU: it runs and must be right too
        assert by[(op, "triton")].status in ("ok", "refused")
        triton = by[(op, "triton")]
        assert triton.status != "refused" or "TRITON_INTERPRET" in triton.detail
    assert not [o for o in outcomes if o.status in ("wrong", "error")]


def _replace_cpu_group_advantages(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    backends = [Backend("cpu", lambda call: None, run) if b.name == "cpu" else b
                for b in advantages_api._GROUP_ADVANTAGES_BACKENDS]
    monkeypatch.setattr(advantages_api, "_GROUP_ADVANTAGES_BACKENDS", backends)


def test_a_wrong_backend_is_reported_and_fails_the_command(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    reference = advantages_api._GROUP_ADVANTAGES_BACKENDS[-1].run

    def off_by_a_little(*args: Any) -> Any:
        out = reference(*args)
        return out._replace(advantages=out.advantages + 1e-3)

    _replace_cpu_group_advantages(monkeypatch, off_by_a_little)
    assert cli.main(["info"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS:" in out and "group_advantages cpu on cpu: WRONG: advantages: max abs error" in out
    row = next(line for line in out.splitlines() if line.startswith("group_advantages"))
    assert "WRONG" in row and row.split()[2] == "cpu"  # auto runs the broken backend


def test_a_crashing_backend_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: Any) -> Any:
        raise RuntimeError("kernel fault")

    _replace_cpu_group_advantages(monkeypatch, crash)
    outcomes = {(o.op, o.impl): o for o in info.check_device(torch.device("cpu"))}
    bad = outcomes[("group_advantages", "cpu")]
    assert bad.status == "error" and bad.detail == "RuntimeError: kernel fault"
    assert outcomes[("policy_loss", "cpu")].status != "error"


def test_the_check_says_where_the_extension_comes_from(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    reason = _extension.unavailable_reason()
    expected = (f"C++ extension: loaded from {_extension.build_directory()}" if reason is None
                else "C++ extension: unavailable:")
    assert expected in out and f"torch threads: {torch.get_num_threads()}" in out


def test_no_check_prints_versions_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "iama " in out
    assert "checking" not in out


def test_the_dispatcher_logs_what_auto_runs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    rewards = torch.rand(3, 4)
    with caplog.at_level(logging.DEBUG, logger="iama_kernels"):
        group_advantages(rewards, info._OBJECTIVE.criteria[0].transform)
    assert f"group_advantages on cpu: impl='auto' runs '{_auto_backend()}'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="iama_kernels"):
        group_advantages(rewards, info._OBJECTIVE.criteria[0].transform)
    assert "impl='auto' runs" not in caplog.text

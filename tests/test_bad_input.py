"""The bad-input catalogue: every case raises ValueError or TypeError naming the argument.

Validation runs before dispatch, so these go through ``impl="auto"`` (what users call).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from iama_kernels import (
    BestOfN,
    Criterion,
    Mean,
    Objective,
    SmoothMin,
    SoftBestOfN,
    WeightedSum,
    first_variation,
    group_advantages,
    group_values,
    nonlinear_grpo_loss,
    policy_loss,
)

R = torch.randn(3, 4, dtype=torch.float64)
R3 = torch.randn(3, 4, 2, dtype=torch.float64)
OBJ2 = Objective([Criterion("a", BestOfN(2)), Criterion("b", Mean())])
LOGP = torch.randn(12, 5, dtype=torch.float64)
MASK = torch.ones(12, 5, dtype=torch.bool)
ADV = torch.randn(12, dtype=torch.float64)
INT2 = torch.ones(2, dtype=torch.int64)
SHORT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()  # group 1 has 2 valid samples
INF = float("inf")


def _with(t: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _pl(**kw: object) -> Callable[[], object]:
    args = {"logp": LOGP, "old_logp": LOGP, "ref_logp": LOGP, "advantages": ADV, "mask": MASK}
    args.update(kw)
    return lambda: policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("ref_logp"),
                               args.pop("advantages"), args.pop("mask"), **args)


def _ng(**kw: object) -> Callable[[], object]:
    args = {"logp": LOGP, "old_logp": None, "ref_logp": None, "mask": MASK, "rewards": R,
            "objective": BestOfN(2)}
    args.update(kw)
    return lambda: nonlinear_grpo_loss(args.pop("logp"), args.pop("old_logp"), args.pop("ref_logp"),
                                       args.pop("mask"), args.pop("rewards"), args.pop("objective"), **args)


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # non-finite rewards: the message says which group
    ("nan reward fv", lambda: first_variation(_with(R, (1, 2), float("nan")), BestOfN(2)), ValueError,
     r"rewards.*group 1"),
    ("inf reward gv", lambda: group_values(_with(R, (2, 0), float("inf")), Mean()), ValueError,
     r"rewards.*group 2"),
    ("inf reward ga", lambda: group_advantages(_with(R3, (1, 0, 1), -float("inf")), OBJ2), ValueError,
     r"rewards.*group 1.*criterion 1"),
    ("nan reward ng", _ng(rewards=_with(R, (2, 3), float("nan"))), ValueError, r"rewards.*group 2"),
    # wrong rank / mismatched shapes
    ("scalar rewards", lambda: first_variation(torch.tensor(1.0), Mean()), ValueError, "rewards"),
    ("1-D rewards ga", lambda: group_advantages(R[0], Mean()), ValueError, "rewards"),
    ("4-D rewards ga", lambda: group_advantages(R3.unsqueeze(0), OBJ2), ValueError, "rewards"),
    ("criteria count", lambda: group_advantages(R3, BestOfN(2)), ValueError, "criteria"),
    ("valid shape", lambda: group_advantages(R, Mean(), valid=torch.ones(3, 5, dtype=torch.bool)), ValueError,
     "valid"),
    ("criterion_weights shape", lambda: group_advantages(R3, OBJ2, criterion_weights=[1.0]), ValueError,
     "criterion_weights"),
    ("logp rank", _pl(logp=LOGP[0]), ValueError, "logp"),
    ("old_logp shape", _pl(old_logp=LOGP[:, :4]), ValueError, "old_logp"),
    ("ref_logp shape", _pl(ref_logp=LOGP[:6]), ValueError, "ref_logp"),
    ("mask shape", _pl(mask=MASK[:, :3]), ValueError, "mask"),
    ("advantages shape", _pl(advantages=ADV[:5]), ValueError, "advantages"),
    ("rows vs groups", _ng(rewards=R[:2]), ValueError, "rows"),
    ("ng mask shape", _ng(mask=MASK[:4]), ValueError, "mask"),
    # dtypes
    ("int rewards", lambda: first_variation(torch.ones(2, 3, dtype=torch.int64), Mean()), TypeError,
     "rewards"),
    ("complex rewards", lambda: group_advantages(torch.ones(2, 3, dtype=torch.complex64), Mean()), TypeError,
     "rewards"),
    ("bool rewards", lambda: group_values(torch.ones(2, 3, dtype=torch.bool), Mean()), TypeError, "rewards"),
    ("int logp", _pl(logp=torch.ones(12, 5, dtype=torch.int32)), TypeError, "logp"),
    ("int old_logp", _pl(old_logp=torch.ones(12, 5, dtype=torch.int32)), TypeError, "old_logp"),
    ("int advantages", _pl(advantages=torch.ones(12, dtype=torch.int64)), TypeError, "advantages"),
    ("complex mask", _pl(mask=torch.ones(12, 5, dtype=torch.complex64)), TypeError, "mask"),
    ("float valid", lambda: group_advantages(R, Mean(), valid=torch.ones(3, 4)), TypeError, "valid"),
    ("int criterion_weights", lambda: group_advantages(R3, OBJ2, criterion_weights=INT2), TypeError,
     "criterion_weights"),
    ("list rewards", lambda: first_variation([[1.0, 2.0]], Mean()), TypeError, "rewards"),
    # estimator conditions
    ("G < n unbiased fv", lambda: first_variation(R, BestOfN(5), estimator="unbiased"), ValueError, "G >= n"),
    ("G < n unbiased gv", lambda: group_values(R, BestOfN(5), estimator="unbiased"), ValueError, "G >= n"),
    ("G < n unbiased ga", lambda: group_advantages(R, BestOfN(5), estimator="unbiased"), ValueError,
     "G >= n"),
    ("valid count < n", lambda: group_advantages(R, BestOfN(3), estimator="unbiased", valid=SHORT),
     ValueError, "n=3 valid samples.*group 1"),
    # objective vocabulary
    ("n < 1", lambda: BestOfN(0), ValueError, "n"),
    ("non-integer n", lambda: BestOfN(2.5), TypeError, "n"),
    ("tau = 0", lambda: SoftBestOfN(0.0), ValueError, "tau"),
    ("tau < 0", lambda: SoftBestOfN(-0.1), ValueError, "tau"),
    ("weights all zero", lambda: WeightedSum([0.0, 0.0]), ValueError, "weights"),
    ("weights negative", lambda: SmoothMin([1.0, -1.0], gamma=1.0), ValueError, "weights"),
    ("mismatched aggregate", lambda: Objective([Criterion("a"), Criterion("b")], WeightedSum([1.0])),
     ValueError, "weights"),
    ("duplicate names", lambda: Objective([Criterion("a"), Criterion("a", BestOfN(2))]), ValueError, "names"),
    ("bad transform", lambda: first_variation(R, "best_of_4"), TypeError, "transform"),
    ("objective as transform", lambda: first_variation(R, OBJ2), TypeError, "transform"),
    ("bad objective", lambda: group_advantages(R, 4), TypeError, "objective"),
    # empty groups
    ("G = 0 fv", lambda: first_variation(torch.zeros(3, 0), Mean()), ValueError, "rewards"),
    ("G = 0 ga", lambda: group_advantages(torch.zeros(3, 0), Mean()), ValueError, "rewards"),
    ("B = 0 ga", lambda: group_advantages(torch.zeros(0, 4), Mean()), ValueError, "rewards"),
    # unknown strings
    ("estimator", lambda: first_variation(R, BestOfN(2), estimator="exact"), ValueError, "estimator"),
    ("estimator ga", lambda: group_advantages(R, BestOfN(2), estimator="Plugin"), ValueError, "estimator"),
    ("scale", lambda: group_advantages(R, Mean(), scale="std"), ValueError, "scale"),
    ("loss_type", _pl(loss_type="bnpo"), ValueError, "loss_type"),
    ("loss_type ng", _ng(loss_type="dapo"), ValueError, "loss_type"),
    ("ratio_level", _pl(ratio_level="seq"), ValueError, "ratio_level"),
    ("ratio_level ng", _ng(ratio_level=None), ValueError, "ratio_level"),
    ("impl fv", lambda: first_variation(R, Mean(), impl="fast"), ValueError, "impl"),
    ("impl gv", lambda: group_values(R, Mean(), impl=None), ValueError, "impl"),
    ("impl pl", _pl(impl="gpu"), ValueError, "impl"),
    ("impl ng", _ng(impl="Triton"), ValueError, "impl"),
    # explicit impl that cannot run on CPU tensors: an error, never a silent fallback
    ("cuda on cpu fv", lambda: first_variation(R, BestOfN(2), impl="cuda"), ValueError, "impl='cuda'"),
    ("cuda on cpu gv", lambda: group_values(R, BestOfN(2), impl="cuda"), ValueError, "impl='cuda'"),
    ("cuda on cpu ga", lambda: group_advantages(R, BestOfN(2), impl="cuda"), ValueError, "impl='cuda'"),
    ("cuda on cpu pl", _pl(impl="cuda"), ValueError, "impl='cuda'"),
    ("cuda on cpu ng", _ng(impl="cuda"), ValueError, "impl='cuda'"),
    # scalar arguments
    ("beta without ref", _pl(ref_logp=None, beta=0.1), ValueError, "ref_logp"),
    ("beta negative", _pl(beta=-0.1), ValueError, "beta"),
    ("beta nan", _pl(beta=float("nan")), ValueError, "beta"),
    ("eps_low > 1", _pl(eps_low=1.5), ValueError, "eps_low"),
    ("eps_high negative", _pl(eps_high=-0.2), ValueError, "eps_high"),
    ("eps_low string", _pl(eps_low="0.2"), TypeError, "eps_low"),
    ("max_completion_length", _pl(loss_type="dr_grpo", max_completion_length=0), ValueError,
     "max_completion_length"),
    ("eps negative", lambda: group_advantages(R, Mean(), eps=-1e-4), ValueError, "eps"),
    ("eps inf", lambda: group_advantages(R, Mean(), eps=float("inf")), ValueError, "eps"),
    ("non-finite advantages", _pl(advantages=_with(ADV, (3,), float("nan"))), ValueError, "advantages"),
    ("non-finite criterion_weights", lambda: group_advantages(R3, OBJ2, criterion_weights=[1.0, INF]),
     ValueError, "criterion_weights"),
    ("criterion_weights string", lambda: group_advantages(R3, OBJ2, criterion_weights="ab"), TypeError,
     "criterion_weights"),
    ("valid on another device", lambda: group_advantages(R, Mean(), valid=torch.ones(3, 4, dtype=torch.bool,
                                                                                    device="meta")),
     ValueError, "valid"),
]


@pytest.mark.parametrize(("case", "call", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: str, call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_invalid_rewards_may_hold_nan() -> None:
    # Non-finite rewards of invalid samples are not an error: they are never read.
    r = _with(R, (0, 1), float("nan"))
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[0, 1] = False
    out = group_advantages(r, BestOfN(2), valid=valid)
    assert bool(torch.isfinite(out.advantages).all())


def test_explicit_triton_without_interpreter_is_an_error() -> None:
    """impl="triton" on CPU tensors, in a process where TRITON_INTERPRET is not set: a ValueError
    that names the impl, whether or not a Triton backend is registered."""
    code = (
        "import torch\n"
        "from iama_kernels import BestOfN, first_variation, group_advantages, policy_loss\n"
        "r = torch.randn(3, 4)\n"
        "calls = [lambda: first_variation(r, BestOfN(2), impl='triton'),\n"
        "         lambda: group_advantages(r, BestOfN(2), impl='triton'),\n"
        "         lambda: policy_loss(torch.randn(2, 3), None, None, torch.randn(2),\n"
        "                             torch.ones(2, 3, dtype=torch.bool), impl='triton')]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        assert \"impl='triton'\" in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('impl=triton ran on CPU tensors without the interpreter')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"

"""``iama info``: versions, devices, and a check of every backend of every op on this machine.

Each public op runs once per device and per backend on a small batch that has ties, a constant
group, padding and an empty row (bf16 log-probs are not used: the check is of the backends, not
of the half-precision paths). A backend that refuses says why (as ``impl=`` would); one that runs
is compared with the float64 reference under the test suite's rule (within 8x the float32
reference's own error, or 1e-5 relative). ``auto`` shows the backend it picks. The exit status is
1 when a backend that ran gave a wrong or non-finite result, else 0.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from iama_kernels import (
    BestOfN,
    Criterion,
    Objective,
    SmoothMin,
    SoftBestOfN,
    covariance_band,
    covariance_top_k,
    first_variation,
    group_advantages,
    group_values,
    nonlinear_grpo_loss,
    policy_loss,
    sequence_log_ratio,
)
from iama_kernels.testing import (
    assert_matches_reference,
    max_rel_error,
    random_rewards,
    reference_grad_pair,
    reference_pair,
)

IMPLS = ("reference", "cpu", "triton")
_PACKAGES = ("iama", "torch", "triton", "numpy", "transformers", "trl", "verl", "openrlhf")
_OBJECTIVE = Objective([Criterion("a", BestOfN(3)), Criterion("b", SoftBestOfN(0.5))],
                       SmoothMin([0.5, 0.5], 2.0))


@dataclass
class Outcome:
    op: str
    device: str
    impl: str
    status: str  # "ok", "refused", "wrong", "error"
    detail: str


def versions() -> dict[str, str | None]:
    """Installed versions (``None`` for a package that is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch"] = torch.__version__
    found["cuda"] = torch.version.cuda
    return found


def _inputs(device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    B, G, T = 4, 5, 7  # G odd; group 3 of random_rewards is constant
    rewards = random_rewards(B, G, m=2, generator=g)
    logp = -torch.rand(B * G, T, generator=g) * 3
    old = logp + 0.3 * torch.randn(B * G, T, generator=g)  # ratios far enough from 1 to clip
    ref = logp + 0.2 * torch.randn(B * G, T, generator=g)
    lengths = torch.randint(1, T + 1, (B * G,), generator=g)
    lengths[2] = 0  # an empty row
    mask = torch.arange(T) < lengths.unsqueeze(1)
    advantages = torch.randn(B * G, generator=g)
    token_advantages = torch.randn(B * G, T, generator=g)  # PPO's per-token advantages (GAE's)
    return {k: v.to(device) for k, v in dict(rewards=rewards, logp=logp, old=old, ref=ref, mask=mask,
                                             advantages=advantages,
                                             token_advantages=token_advantages).items()}


def _cases(x: dict[str, Any]) -> dict[str, tuple[Callable[..., Any], tuple, dict, bool]]:
    """op -> (function, args, kwargs, differentiable in logp)."""
    loss_kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05)
    return {
        "first_variation": (first_variation, (x["rewards"][..., 0], BestOfN(3)),
                            {"estimator": "unbiased"}, False),
        "group_values": (group_values, (x["rewards"][..., 1], SoftBestOfN(0.5)), {}, False),
        "group_advantages": (group_advantages, (x["rewards"], _OBJECTIVE), {"estimator": "unbiased"}, False),
        "policy_loss": (policy_loss, (x["logp"], x["old"], x["ref"], x["advantages"], x["mask"]),
                        loss_kw, True),
        "policy_loss ratio kl": (policy_loss, (x["logp"], x["old"], x["ref"], x["advantages"], x["mask"]),
                                 dict(loss_kw, kl_weight="ratio", loss_type="token"), True),
        "policy_loss ppo": (  # per-token advantages (GAE's) and the dual clip, as verl's PPO
            policy_loss, (x["logp"], x["old"], None, x["token_advantages"], x["mask"]),
            dict(loss_kw, beta=0.0, dual_clip=1.3, loss_type="dr_grpo"), True),
        "policy_loss gspo": (  # GSPO's sequence ratio
            policy_loss, (x["logp"], x["old"], x["ref"], x["advantages"], x["mask"]),
            dict(loss_kw, ratio_level="sequence"), True),
        "policy_loss cispo": (  # CISPO's clipped importance weight, TRL's bound [0, 5]
            policy_loss, (x["logp"], x["old"], x["ref"], x["advantages"], x["mask"]),
            dict(loss_kw, eps_low=1.0, eps_high=4.0, surrogate="cispo"), True),
        "policy_loss sapo": (  # SAPO's soft gate
            policy_loss, (x["logp"], x["old"], x["ref"], x["advantages"], x["mask"]),
            dict(loss_kw, surrogate="sapo"), True),
        "policy_loss vespo": (  # VESPO's gamma weight of each sequence's ratio
            policy_loss, (x["logp"], x["old"], x["ref"], x["advantages"], x["mask"]),
            dict(loss_kw, surrogate="vespo", loss_type="token"), True),
        "policy_loss dppo": (  # DPPO's binary-KL trust region with its weight cap, as verl's
            policy_loss, (x["logp"], x["old"], None, x["token_advantages"], x["mask"]),
            dict(loss_kw, beta=0.0, surrogate="dppo_kl", dual_clip=1.3, loss_type="token"), True),
        "policy_loss gmpo": (  # GMPO's geometric mean of the clipped ratios, per-token advantages
            policy_loss, (x["logp"], x["old"], x["ref"], x["token_advantages"], x["mask"]),
            dict(loss_kw, surrogate="gmpo", eps_low=0.4, eps_high=0.4), True),
        "policy_loss k2+dro": (  # verl's DRO: CISPO's weight held at 1, the k2 penalty to old_logp
            policy_loss, (x["logp"], x["old"], x["old"], x["token_advantages"], x["mask"]),
            dict(loss_kw, eps_low=0.0, eps_high=0.0, beta=0.5, surrogate="cispo", kl_estimator="k2",
                 loss_type="dr_grpo"), True),
        "sequence_log_ratio": (  # VESPO's clamped row sums of the token log-ratios, outside the loss
            sequence_log_ratio, (x["logp"], x["old"], x["mask"]), {"clamp": (-20.0, 20.0)}, False),
        "covariance_top_k": (  # KL-Cov's tokens: the largest centred advantage x centred log-prob
            covariance_top_k, (x["token_advantages"], x["logp"], x["mask"], 9), {}, False),
        "covariance_band": (  # Clip-Cov's candidates, PPO's clip test with old_logp
            covariance_band, (x["token_advantages"], x["logp"], x["mask"], 0.05, 2.0),
            {"old_logp": x["old"], "eps_low": 0.2, "eps_high": 0.28}, False),
        "nonlinear_grpo_loss": (nonlinear_grpo_loss, (x["logp"], x["old"], x["ref"], x["mask"], x["rewards"],
                                                      _OBJECTIVE), dict(loss_kw, estimator="unbiased"), True),
    }


def _fields(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {k: v for k, v in out._asdict().items() if isinstance(v, torch.Tensor)}


def _compare(got: Any, oracle: Any, same: Any) -> float:
    """Largest relative error over the outputs; raises AssertionError when one is off."""
    worst = 0.0
    got_f, oracle_f, same_f = _fields(got), _fields(oracle), _fields(same)
    for name, value in got_f.items():
        o = oracle_f[name].detach()
        assert_matches_reference(value.detach().cpu(), o.cpu(), same_f[name].detach().cpu(), factor=8.0,
                                 rel=1e-5, atol=1e-7, name=name)
        worst = max(worst, max_rel_error(value.detach().cpu(), o.cpu()))
    return worst


def _run_one(fn: Callable[..., Any], args: tuple, kwargs: dict, grad: bool, impl: str) -> Any:
    if not grad:
        return fn(*args, **kwargs, impl=impl)
    logp = args[0].detach().clone().requires_grad_(True)
    out = fn(logp, *args[1:], **kwargs, impl=impl)
    (g,) = torch.autograd.grad(out[0], logp)
    return out, g


class _Chosen(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "impl='auto' runs" in message:
            self.names.append(message.rsplit(" ", 1)[-1].strip("'"))


def auto_choice(fn: Callable[..., Any], args: tuple, kwargs: dict) -> str:
    """The backend ``impl="auto"`` runs for this call (from the dispatcher's DEBUG log)."""
    log = logging.getLogger("iama_kernels")
    handler, level = _Chosen(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        with torch.no_grad():
            fn(*args, **kwargs, impl="auto")
    except Exception:  # the choice is logged before the run; the explicit runs report failures
        pass
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return handler.names[0] if handler.names else "?"


def check_device(device: torch.device) -> list[Outcome]:
    """Every op x backend on ``device``, plus the backend ``auto`` picks."""
    cases = _cases(_inputs(device))
    outcomes = []
    for op, (fn, args, kwargs, grad) in cases.items():
        if grad:
            (oracle, g64), (same, g32) = reference_grad_pair(fn, *args, **kwargs)
            oracle, same = (oracle, g64), (same, g32)
        else:
            oracle, same = reference_pair(fn, *args, **kwargs)
        for impl in IMPLS:
            try:
                got = _run_one(fn, args, kwargs, grad, impl)
            except ValueError as error:
                outcomes.append(Outcome(op, device.type, impl, "refused", str(error)))
                continue
            except Exception as error:  # a backend that crashes is what this check is for
                outcomes.append(Outcome(op, device.type, impl, "error", f"{type(error).__name__}: {error}"))
                continue
            try:
                if grad:
                    err = max(_compare(got[0], oracle[0], same[0]), _compare(got[1], oracle[1], same[1]))
                else:
                    err = _compare(got, oracle, same)
            except AssertionError as error:
                outcomes.append(Outcome(op, device.type, impl, "wrong", str(error)))
                continue
            outcomes.append(Outcome(op, device.type, impl, "ok", f"{err:.0e}"))
        outcomes.append(Outcome(op, device.type, "auto", "ok", auto_choice(fn, args, kwargs)))
    return outcomes


def _cell(o: Outcome, width: int) -> str:
    """``auto``: the backend it runs; others: ``ok`` and the largest relative error, or why not."""
    text = {"ok": o.detail if o.impl == "auto" else f"ok {o.detail}", "refused": "refused",
            "wrong": "WRONG", "error": "ERROR"}[o.status]
    return f"{text:<{width}}"


def report(outcomes: list[Outcome]) -> str:
    """A table op x impl per device, then the reasons of refusals and failures, one per line."""
    lines = [f"{'op':<22} {'device':<7} {'auto':<10} " + " ".join(f"{i:<10}" for i in IMPLS),
             f"{'':<22} {'':<7} {'(runs)':<10} " + " ".join(f"{'(rel err)':<10}" for _ in IMPLS)]
    keyed = {(o.op, o.device, o.impl): o for o in outcomes}
    for op, device in dict.fromkeys((o.op, o.device) for o in outcomes):
        cells = [_cell(keyed[(op, device, i)], 10) for i in ("auto", *IMPLS)]
        lines.append(f"{op:<22} {device:<7} " + " ".join(cells))
    # One line per distinct reason: the same refusal of every op is said once.
    notes = dict.fromkeys(
        f"  {o.impl} on {o.device}: " + o.detail.replace(f"impl={o.impl!r} cannot run {o.op}: ", "")
        for o in outcomes if o.status == "refused"
    )
    problems = [f"  {o.op} {o.impl} on {o.device}: {o.status.upper()}: {o.detail}" for o in outcomes
                if o.status in ("wrong", "error")]
    if notes:
        lines += ["", "refused (as an explicit impl= would be):", *notes]
    if problems:
        lines += ["", "PROBLEMS:", *problems]
    return "\n".join(lines)


def _extension_status() -> str:
    """Where the C++ extension was loaded from (building it if needed), or why it cannot be."""
    from iama_kernels import _extension

    reason = _extension.unavailable_reason()
    return f"loaded from {_extension.build_directory()}" if reason is None else f"unavailable: {reason}"


def add_arguments(parser: Any) -> None:
    parser.add_argument("--no-check", action="store_true",
                        help="only versions and devices: do not run the ops (nor build the C++ extension)")


def run(args: Any) -> int:
    found = versions()
    print(" | ".join(f"{k} {v}" for k, v in found.items() if v is not None))
    missing = [k for k, v in found.items() if v is None and k != "cuda"]
    if missing:
        print("not installed: " + ", ".join(missing))
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"CUDA device: {torch.cuda.get_device_name()}")
    else:
        print("no CUDA device")
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "iama"]
    if found["verl"] is not None:
        print(f"verl plugin: {plugins[0] if plugins else 'not declared (iama not installed as a package)'}")
    if args.no_check:
        return 0
    print("checking every backend (the C++ extension is built on first use, about 30 s)...", flush=True)
    print(f"C++ extension: {_extension_status()}; torch threads: {torch.get_num_threads()}")
    outcomes = [o for device in devices for o in check_device(device)]
    print(report(outcomes))
    return 1 if any(o.status in ("wrong", "error") for o in outcomes) else 0

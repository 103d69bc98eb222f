"""OpenRLHF's ``PolicyLoss`` against iama's drop-in (:mod:`iama.integrations.openrlhf`).

Both rows are called as OpenRLHF's PPO actor calls its loss (positional log-probs, old log-probs,
advantages, then ``action_mask``, ``rollout_log_probs`` and the normalisers of OpenRLHF's
``get_loss_batch_info``: ``dp_size`` 1 and the token and sequence counts as 0-dim float32
tensors), on the same float32 micro-batch:
log-probs, old log-probs, rollout log-probs, per-response advantages broadcast over the tokens
(OpenRLHF's are ``[bs, T]``) and a bool action mask. A call is the loss and its backward into the
log-probs; the metrics stay tensors on the device, as OpenRLHF keeps them. Cases: PPO with the
dual clip at both aggregations, PPO with the token-level train/rollout correction (mask mode,
ratio gate), GSPO. The rows take turns call by call in shuffled order; the median of ``--rounds``
each is reported, with GB/s over the bytes the loss must move (log-probs, old log-probs and the
advantages read once, rollout log-probs too with the correction, the mask once, the gradient
written once). Before timing, the losses and gradients are checked equal.

OpenRLHF is installed into ``.venv`` by ``make`` (without its dependencies; its loss module is
loaded alone): ``.venv/bin/python benchmarks/openrlhf_loss.py``. Results go to
``benchmarks/results/openrlhf_loss.jsonl`` (device and versions included); the table is printed
last.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the checkout's own packages first (a copy of this script in another worktree measures that one)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Measurement, interleaved, record_times, report

# name -> PolicyLoss settings (OpenRLHF's constructor arguments)
CASES: dict[str, dict[str, Any]] = {
    "ppo token-mean": {"dual_clip": 3.0, "token_level_loss": True},
    "ppo seq-mean": {"dual_clip": 3.0, "token_level_loss": False},
    "ppo + rollout correction": {"dual_clip": 3.0, "token_level_loss": True, "is_correction_level": "token",
                                 "is_correction_threshold": (0.5, 5.0)},
    "gspo": {"policy_loss_type": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4},
}


def _micro_batch(S: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(S, T, generator=g) * 3
    lengths = torch.randint(T // 4, T + 1, (S,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(1)
    adv = (torch.randn(S, 1, generator=g) * mask).contiguous()
    return {"log_probs": old + 0.3 * torch.randn(S, T, generator=g), "old_log_probs": old,
            "advantages": adv, "action_mask": mask,
            "rollout_log_probs": old + 0.1 * torch.randn(S, T, generator=g),
            # what OpenRLHF's get_loss_batch_info gives on one process
            "batch_num_tokens": mask.sum().to(torch.float32),
            "global_batch_size": (mask.sum(-1) > 0).sum().to(torch.float32)}


def _loss_call(fn: Callable[..., Any], batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    leaf = batch["log_probs"].clone().requires_grad_(True)

    def call() -> torch.Tensor:
        leaf.grad = None
        loss, *_ = fn(leaf, batch["old_log_probs"], batch["advantages"], action_mask=batch["action_mask"],
                      rollout_log_probs=batch["rollout_log_probs"], dp_size=1,
                      batch_num_tokens=batch["batch_num_tokens"],
                      global_batch_size=batch["global_batch_size"])
        loss.backward()
        return leaf.grad

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x1024,256x2048,512x4096", help="comma-separated SxT")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--output", default="openrlhf_loss", help="results file name in benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[Measurement] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from iama.integrations.openrlhf import PolicyLoss, openrlhf_loss_module

        theirs_module = openrlhf_loss_module()
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"--cases: {case!r} is not one of {list(CASES)}")
        settings = CASES[case]
        losses = {"openrlhf": theirs_module.PolicyLoss(**settings), "iama": PolicyLoss(**settings)}
        for shape in args.shapes.split(","):
            S, T = (int(x) for x in shape.split("x"))
            batch = _micro_batch(S, T)
            calls = {name: _loss_call(fn, batch) for name, fn in losses.items()}
            grads = {name: call().clone() for name, call in calls.items()}
            torch.testing.assert_close(grads["iama"], grads["openrlhf"], rtol=1e-4,
                                       atol=1e-6 * float(grads["openrlhf"].abs().max()))
            times = interleaved(calls, args.rounds)
            reads = 4 if "is_correction_level" in settings else 3  # float32 logp, old, A (+ rollout)
            moved = (reads + 1) * S * T * 4 + S * T  # ... and the gradient; the bool mask
            record_times(rows, f"openrlhf {case} (fwd+bwd)", f"S={S} T={T}", times, bytes_moved=moved,
                         extra={"threads": args.threads, "openrlhf": importlib.metadata.version("openrlhf")})
    report(rows, args.output, "openrlhf", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

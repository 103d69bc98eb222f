"""``ik.rollout_correction`` against the same correction in eager PyTorch.

The eager row is the correction as a trainer writes it in PyTorch (OpenRLHF's arithmetic, float32,
detached): the log-ratio, its exp, the gate's statistic (probabilities, their clamps, the binary
KL's two logs), the row means for sequence units, the comparisons, the weights and the two
metrics, about ten ``[S, T]`` passes. The kernel row is ``rollout_correction(..., impl="cpu")``
(one read of the inputs at token level, two at sequence level) and ``impl="reference"`` (float64
PyTorch) runs beside them. Inputs: float32 old and rollout log-probs (the rollout's 0.02 off,
so every gate keeps most tokens), a bool mask over three quarters of each row on average. The
candidates take turns call by call in shuffled order; the median of ``--rounds`` each is
reported, with GB/s over the bytes the correction must move (both log-probs and the mask read
once, the float32 weights written once). Before timing, the kernel's weights are checked
against the eager ones (equal but for tokens within rounding of a bound).

Run: ``.venv/bin/python benchmarks/rollout_correction.py``. Results go to
``benchmarks/results/rollout_correction.jsonl`` (device and versions included); the table is
printed last.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Measurement, interleaved, record_times, report

from iama_kernels import rollout_correction

# name -> rollout_correction's settings
CASES: dict[str, dict[str, Any]] = {
    "token ratio mask": {"level": "token", "gate": "ratio", "mode": "mask", "threshold": (0.5, 5.0)},
    "token ratio clip": {"level": "token", "gate": "ratio", "mode": "clip", "threshold": (0.8, 1.2)},
    "sequence ratio mask": {"level": "sequence", "gate": "ratio", "mode": "mask", "threshold": (0.99, 1.01)},
    "token binary_kl mask": {"level": "token", "gate": "binary_kl", "mode": "mask", "threshold": (0.0, 1e-4)},
    "sequence tv mask": {"level": "sequence", "gate": "tv", "mode": "mask", "threshold": (0.0, 2e-3)},
}
PROB_BOUND = 1e-6


def eager(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, level: str, gate: str, mode: str,
          threshold: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, mean log-ratio, filtered share) in eager PyTorch, OpenRLHF's arithmetic."""
    low, high = threshold
    mf = mask.to(old.dtype)
    log_ratio = old - rollout
    log_ratio_mean = (log_ratio * mf).sum() / mf.sum()
    stat = None
    if gate == "ratio":
        if level == "sequence":
            stat = ((log_ratio * mf).sum(-1) / mf.sum(-1)).exp().unsqueeze(-1)
    else:
        p = rollout.exp().clamp(PROB_BOUND, 1 - PROB_BOUND)
        q = old.exp().clamp(PROB_BOUND, 1 - PROB_BOUND)
        if gate == "tv":
            stat = (p - q).abs()
        else:
            stat = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        if level == "sequence":
            stat = ((stat * mf).sum(-1) / mf.sum(-1)).unsqueeze(-1)
    ratio = log_ratio.exp()
    stat = ratio if stat is None else stat
    if mode == "clip":
        dropped = (stat < low) | (stat > high)
        coef = ratio.clamp(min=low, max=high)
    else:
        dropped = ~((stat >= low) & (stat <= high))
        coef = ratio.masked_fill(dropped, 0.0)
    filtered = dropped.to(old.dtype).mean() if level == "sequence" else (dropped * mf).sum() / mf.sum()
    return coef * mf, log_ratio_mean, filtered


def inputs(S: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(S, T, generator=g) * 0.98 + 0.01)
    rollout = old + 0.02 * torch.randn(S, T, generator=g)
    lengths = torch.randint(T // 2, T + 1, (S,), generator=g)
    return old, rollout, torch.arange(T) < lengths.unsqueeze(1)


def _check(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, settings: dict[str, Any]) -> None:
    """The kernel's weights are the eager ones but for units within rounding of a bound, and for
    the binary-KL tokens whose float32 eager statistic falls below 0 (dropped by a lower bound of
    0; the kernel holds it at 0: docs/math.md section 5)."""
    want = eager(old, rollout, mask, **settings)[0]
    got = rollout_correction(old, rollout, mask, impl="cpu", **settings).weights
    close = torch.isclose(got, want, rtol=1e-5, atol=1e-6)
    if float(close.double().mean()) < 0.99:
        raise AssertionError(f"{settings}: {int((~close).sum())} weights differ from the eager ones")


def _calls(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, settings: dict[str, Any]
           ) -> dict[str, Callable[[], Any]]:
    return {
        "pytorch eager": lambda: eager(old, rollout, mask, **settings),
        "iama cpu": lambda: rollout_correction(old, rollout, mask, impl="cpu", **settings),
        "iama reference (float64)": lambda: rollout_correction(old, rollout, mask, impl="reference",
                                                               **settings),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x1024,256x2048,512x4096", help="comma-separated SxT")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[Measurement] = []
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"--cases: {case!r} is not one of {list(CASES)}")
        for shape in args.shapes.split(","):
            S, T = (int(x) for x in shape.split("x"))
            old, rollout, mask = inputs(S, T)
            _check(old, rollout, mask, CASES[case])
            times = interleaved(_calls(old, rollout, mask, CASES[case]), args.rounds)
            record_times(rows, f"rollout_correction {case}", f"S={S} T={T}", times,
                         bytes_moved=S * T * (4 + 4 + 1 + 4), extra={"threads": args.threads})
    report(rows, "rollout_correction", "pytorch eager", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""KL-Cov's and Clip-Cov's token selections: ``covariance_top_k`` and ``covariance_band`` on the
C++ backend against the same selections in PyTorch as verl computes them (the rows ``torch``):
for the top k, the response tokens gathered, their centred product, ``torch.topk``; for the band,
verl's masked means, the ratio and PPO's clip test over every token, the band, ``nonzero``.

Inputs as ``benchmarks/verl_loss.py``'s micro-batch (float32 log-probs and old log-probs,
per-response advantages broadcast over a bool response mask of random lengths), verl's defaults:
``kl_cov_ratio = clip_cov_ratio = 0.0002``, band ``(1, 5)``, clip 0.2 / 0.28. The rows take turns
call by call in shuffled order; the median of ``--rounds`` each is reported, with GB/s over the
bytes a selection must read at least once (advantages, log-probs: 4 B each, the mask: 1 B per
token). Before timing, the selections are checked equal.

``.venv/bin/python benchmarks/covariance.py``; results go to
``benchmarks/results/covariance.jsonl``, the table is printed last.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Measurement, interleaved, record_times, report
from verl_loss import _micro_batch

from iama.integrations.verl_loss import _band_on_device, _top_k_on_device
from iama_kernels import covariance_band, covariance_top_k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x1024,256x2048,512x4096", help="comma-separated SxT")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[Measurement] = []
    for shape in args.shapes.split(","):
        S, T = (int(x) for x in shape.split("x"))
        b = _micro_batch(S, T)
        adv, logp, old, keep = b["advantages"], b["log_prob"], b["old_log_prob"], b["response_mask"]
        k = max(1, int(int(keep.sum()) * 0.0002))
        top_k = {"torch": partial(_top_k_on_device, adv, logp, keep, k),
                 "cpu": partial(covariance_top_k, adv, logp, keep, k, impl="cpu")}
        band = {"torch": partial(_band_on_device, logp, old, adv, keep, 0.2, 0.28, 1.0, 5.0),
                "cpu": partial(covariance_band, adv, logp, keep, 1.0, 5.0, old_logp=old, eps_low=0.2,
                               eps_high=0.28, impl="cpu")}
        assert set(top_k["torch"]().tolist()) == set(top_k["cpu"]().tolist())
        assert torch.equal(band["torch"](), band["cpu"]())
        moved = 9 * S * T  # advantages and log-probs (float32), the bool mask, each read once
        extra = {"threads": args.threads, "k": k}
        record_times(rows, "covariance_top_k", f"S={S} T={T}", interleaved(top_k, args.rounds),
                     bytes_moved=moved, extra=extra)
        record_times(rows, "covariance_band", f"S={S} T={T}", interleaved(band, args.rounds),
                     bytes_moved=moved, extra=extra)
    report(rows, "covariance", "torch", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

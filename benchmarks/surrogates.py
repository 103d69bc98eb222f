"""The surrogates of ``policy_loss`` on the C++ backend: each one's forward op against the clipped
surrogate's, with one advantage per row and with per-token advantages (verl's ``[bs, T]`` ones),
in one run, the cases taking turns call by call.

Inputs from ``harness.token_pass_inputs`` (as ``benchmarks/kl_estimators.py``'s): S x T float32
(or bfloat16) logp / old / ref, a bool prefix mask, beta = 0.04 with the plain k3,
``loss_type="grpo"``; the clip range 0.2 / 0.28 (GMPO's log-space bounds too), SAPO's
temperatures 1.0 / 1.05, DPPO's divergence bounds the same 0.2 / 0.28 with the weight cap 3
(verl's ``clip_ratio_c``). Times are of the forward op alone
(``torch.ops.iama.policy_loss_fwd``, which writes the gradient too): at 64 x 2048 the inputs
stay in the caches and the row's compute shows; at 512 x 4096 they stream from main memory. GB/s
over the bytes the op must move (logp, old, ref and the mask read, the gradient written; the
per-token advantages' 4 bytes a token where they are read). Where the CPU has AVX-512 every case
runs on the hand-vectorised row (csrc/cpu/token_row_byte_avx512.h).
``--label`` is recorded with each row (to tell builds apart).

``--weights`` passes float32 token weights for the mask (verl's rollout importance weights on it).

``.venv/bin/python benchmarks/surrogates.py [--shape SxT] [--threads N] [--weights] [--output NAME]``;
results go to ``benchmarks/results/<NAME>.jsonl`` (default ``surrogates``), the table is printed last.
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

from harness import Measurement, interleaved, record_times, report, token_pass_inputs

# surrogate -> dual_clip (DPPO's weight cap)
SURROGATES: dict[str, float | None] = {"clip": None, "cispo": None, "sapo": None, "dppo_tv": 3.0,
                                       "dppo_kl": 3.0, "gmpo": None, "vespo": None}


def _op_step(t: dict[str, torch.Tensor], adv: torch.Tensor, surrogate: str, dual_clip: float | None
             ) -> Callable[[], Any]:
    """The forward op as ``policy_loss(impl="cpu", surrogate=...)`` calls it."""
    op = torch.ops.iama.policy_loss_fwd
    return lambda: op(t["logp"], t["old"], t["ref"], adv, t["mask"], 0.2, 0.28, 0.04, "grpo", None, 0,
                      dual_clip, False, surrogate, 1.0, 1.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="64x2048", help="SxT")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--weights", action="store_true",
                        help="float32 token weights for the mask (it times U(0.5, 1.5))")
    parser.add_argument("--output", default="surrogates")
    parser.add_argument("--label", default="", help="recorded with each row")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from iama_kernels import _extension

    _extension.load()
    torch.set_num_threads(args.threads)
    S, T = (int(v) for v in args.shape.split("x"))
    rows: list[Measurement] = []
    extra: dict[str, Any] = {"threads": args.threads, "label": args.label}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        t = token_pass_inputs(S, T, dtype)
        if args.weights:
            g = torch.Generator().manual_seed(1)
            t["mask"] = t["mask"] * (0.5 + torch.rand(S, T, generator=g))
        # logp, old, ref, the gradient, the mask (a byte, or a float32 weight)
        moved = S * T * (4 * t["logp"].element_size() + t["mask"].element_size())
        for advantages in ("row", "token"):
            cases = {name: _op_step(t, t["adv"] if advantages == "row" else t["token_adv"], name, dual)
                     for name, dual in SURROGATES.items()}
            times = interleaved(cases, args.rounds)
            shape = f"S={S} T={T} {dtype_name} {advantages} A" + (" weights" if args.weights else "")
            record_times(rows, "policy_loss fwd (op)", shape, times,
                         bytes_moved=moved + (4 * S * T if advantages == "token" else 0), extra=extra)
    report(rows, args.output, "clip", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

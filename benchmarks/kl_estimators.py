"""The KL estimators of ``policy_loss`` on the C++ backend: each estimator's forward + backward
against the plain k3's, in one run, the cases taking turns call by call.

Inputs as ``benchmarks/run_cpu.py``'s token pass: S x T float32 (or bfloat16) logp / old / ref, a
bool prefix mask, one advantage per row, beta = 0.04, the clipped surrogate; every
``kl_estimator`` (k3, TRL's ``kl_weight="ratio"`` k3, k2, k1, abs, k3+, k1+, abs+), and verl's
``"dro"`` as ``"iama_dro"`` runs it (per-token advantages, CISPO's weight held at 1, the k2
penalty with ``dro_beta`` 0.5 to the sampling policy, ``dr_grpo``). GB/s over the bytes the op
must move (logp, old, ref and the mask read, the gradient written; the per-token advantages
for ``dro``). Where the CPU has AVX-512 every case runs on the hand-vectorised row.

``--op`` times the forward op alone (``torch.ops.iama.policy_loss_fwd``, which writes the
gradient too: no autograd, no allocation of a second gradient); at a size that stays in the
caches (``--shape 64x2048``) that is the row's compute, the figure least moved by other load on
a shared machine. ``--label`` is recorded with each row (to tell builds apart).

``.venv/bin/python benchmarks/kl_estimators.py [--threads N] [--op] [--output NAME]``; results go
to ``benchmarks/results/<NAME>.jsonl`` (default ``kl_estimators``), the table is printed last.
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

from iama_kernels import policy_loss

ESTIMATORS = {"k3": {}, "ratio k3": {"kl_weight": "ratio"}, "k2": {"kl_estimator": "k2"},
              "k1": {"kl_estimator": "k1"}, "abs": {"kl_estimator": "abs"}, "k3+": {"kl_estimator": "k3+"},
              "k1+": {"kl_estimator": "k1+"}, "abs+": {"kl_estimator": "abs+"}}


# the op's KlForm codes (csrc/include/iama/common.h) and kl_weight="ratio"
_KL_FORMS = {"k3": 0, "ratio k3": 1, "k2": 2, "k1": 3, "abs": 4, "k3+": 8, "k1+": 11, "abs+": 12}


def _op_step(t: dict[str, torch.Tensor], ref: torch.Tensor, adv: torch.Tensor, options: dict[str, Any],
             name: str) -> Callable[[], Any]:
    """The forward op as ``policy_loss(impl="cpu")`` calls it (the clipped surrogate, or dro's)."""
    from iama_kernels import _extension

    _extension.load()
    form = 2 if name.startswith("dro") else _KL_FORMS[name]
    surrogate = options.get("surrogate", "clip")
    eps_low, eps_high = options.get("eps_low", 0.2), options.get("eps_high", 0.2)
    loss_type = options.get("loss_type", "grpo")
    return lambda: torch.ops.iama.policy_loss_fwd(t["logp"], t["old"], ref, adv, t["mask"], eps_low, eps_high,
                                                  options["beta"], loss_type, None, form, None, False,
                                                  surrogate)


def _step(x: torch.Tensor, t: dict[str, torch.Tensor], ref: torch.Tensor, adv: torch.Tensor,
          options: dict[str, Any]) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        policy_loss(x, t["old"], ref, adv, t["mask"], impl="cpu", **options).loss.backward()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="512x2048", help="SxT")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--output", default="kl_estimators")
    parser.add_argument("--op", action="store_true", help="the forward op alone (see the module doc)")
    parser.add_argument("--label", default="", help="recorded with each row")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    S, T = (int(v) for v in args.shape.split("x"))
    rows: list[Measurement] = []
    for dtype in (torch.float32, torch.bfloat16):
        t = token_pass_inputs(S, T, dtype)
        x = t["logp"].clone().requires_grad_(True)
        dro = {"beta": 0.5, "kl_estimator": "k2", "surrogate": "cispo", "eps_low": 0.0, "eps_high": 0.0,
               "loss_type": "dr_grpo"}
        if args.op:
            cases = {name: _op_step(t, t["ref"], t["adv"], dict(options, beta=0.04), name)
                     for name, options in ESTIMATORS.items()}
            cases["dro (k2 to old, cispo)"] = _op_step(t, t["old"], t["token_adv"], dro, "dro")
        else:
            cases = {name: _step(x, t, t["ref"], t["adv"], dict(options, beta=0.04))
                     for name, options in ESTIMATORS.items()}
            cases["dro (k2 to old, cispo)"] = _step(x, t, t["old"], t["token_adv"], dro)
        size = t["logp"].element_size()
        moved = S * T * (4 * size + 1)  # logp, old, ref read, the gradient written, the mask
        times = interleaved(cases, args.rounds)
        shape = f"S={S} T={T} {str(dtype).replace('torch.', '')}"
        extra = {"threads": args.threads, "op_only": args.op, "label": args.label}
        dro_times = {"dro (k2 to old, cispo)": times.pop("dro (k2 to old, cispo)")}
        bench = "policy_loss fwd (op)" if args.op else "policy_loss fwd+bwd"
        record_times(rows, bench, shape, times, bytes_moved=moved, extra=extra)
        # dro reads old twice (as ref) and the advantages: 4 bytes of float32 a token more
        record_times(rows, bench, shape, dro_times, bytes_moved=moved + 4 * S * T, extra=extra)
    report(rows, args.output, "k3", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

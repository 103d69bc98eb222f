"""CPU benchmark of the C++ backend (``impl="cpu"``) against the PyTorch reference: one run, one table.

Measures, with every torch thread of this machine:

1. ``group_advantages``: B = 4096 groups of G = 16, m = 2 criteria, BestOfN(4) unbiased on both,
   WeightedSum: C++ vs reference (public functions, validation included).
2. ``policy_loss`` forward + backward: S = 512, T = 2048, float32 logp / old / ref, bool mask,
   beta = 0.04: C++ vs reference, with GB/s from the bytes the op must move at least (read logp,
   old, ref: 4 B each, mask: 1 B, advantages; write the gradient: 4 B) and the copy bandwidth
   measured in the same run (``dst.copy_(src)`` of 256 MiB: GB/s = 2 * bytes / time) as the
   roofline.
3. ``nonlinear_grpo_loss`` forward + backward at the same token count (B = 32, G = 16, T = 2048):
   the one-pass op vs ``group_advantages`` + ``policy_loss`` run separately vs the reference.
4. Dispatcher overhead on small shapes (B = 8, G = 8; S = 8, T = 16): the public function vs the
   ``torch.ops.iama`` op called directly.

Results go to ``benchmarks/results/cpu.jsonl`` (long format with the environment, via
benchmarks/harness.py); the table is printed last. The machine's other load shows up as the
spread between the p20 and p80 columns: rerun when it is quiet. ``--cpu-time`` measures instead
the CPU time of the calling thread with one torch thread (robust to other processes sharing the
cores, but not a wall-clock figure; results go to ``cpu_thread_time.jsonl``). ``--quick``
shortens every measurement (a smoke run).

Run from the repository root: ``python benchmarks/run_cpu.py`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Measurement, environment, measure, write_results

from iama_kernels import (
    BestOfN,
    Criterion,
    Objective,
    WeightedSum,
    _extension,
    group_advantages,
    nonlinear_grpo_loss,
    policy_loss,
)

OBJECTIVE = Objective([Criterion("a", BestOfN(4)), Criterion("b", BestOfN(4))], WeightedSum([0.5, 0.5]))


def _token_inputs(S: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(S, T, generator=g) * 2
    return {
        "logp": logp,
        "old": logp + 0.05 * torch.randn(S, T, generator=g),
        "ref": logp + 0.05 * torch.randn(S, T, generator=g),
        "mask": torch.rand(S, T, generator=g) < 0.9,
    }


def _loss_step(fn, x: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
    def step() -> None:
        x.grad = None
        fn(x, *args, **kwargs).loss.backward()

    return step


def bench(timing: dict) -> tuple[list[Measurement], list[str]]:
    rows: list[Measurement] = []
    notes: list[str] = []
    ops = torch.ops.iama
    kw = dict(estimator="unbiased")

    # 1. advantages
    B, G, m = 4096, 16, 2
    rewards = torch.randn(B, G, m, generator=torch.Generator().manual_seed(0))
    shape = f"B={B} G={G} m={m}"
    for impl in ("cpu", "reference"):
        rows.append(measure("group_advantages", impl, shape,
                            lambda impl=impl: group_advantages(rewards, OBJECTIVE, impl=impl, **kw),
                            **timing))

    # 2. copy bandwidth and the policy loss
    # Copy into a preallocated tensor: the memory roofline without page-fault costs.
    src = torch.ones(64 * 2**20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    copy = measure("copy (dst.copy_(src))", "torch", "256 MiB", lambda: dst.copy_(src),
                   bytes_moved=2 * src.numel() * 4, **timing)
    rows.append(copy)
    S, T = 512, 2048
    t = _token_inputs(S, T)
    adv = torch.randn(S)
    nbytes = S * T * (3 * 4 + 1 + 4) + S * 4
    shape = f"S={S} T={T} f32"
    for impl in ("cpu", "reference"):
        x = t["logp"].clone().requires_grad_(True)
        row = measure("policy_loss fwd+bwd", impl, shape,
                      _loss_step(policy_loss, x, t["old"], t["ref"], adv, t["mask"], beta=0.04, impl=impl),
                      bytes_moved=nbytes, **timing)
        row.extra["fraction_of_copy_bandwidth"] = row.gbps / copy.gbps
        rows.append(row)
    x = t["logp"].clone()
    rows.append(measure("policy_loss fwd (op only)", "cpu", shape,
                        lambda: ops.policy_loss_fwd(x, t["old"], t["ref"], adv, t["mask"], 0.2, 0.2, 0.04,
                                                    "grpo", None),
                        bytes_moved=nbytes, **timing))

    # 3. the one-pass op at the same token count
    B, G = 32, 16
    rewards = torch.randn(B, G, m, generator=torch.Generator().manual_seed(1))
    shape = f"B={B} G={G} m={m} T={T}"
    for impl in ("cpu", "reference"):
        x = t["logp"].clone().requires_grad_(True)
        rows.append(measure("nonlinear_grpo_loss fwd+bwd", impl, shape,
                            _loss_step(nonlinear_grpo_loss, x, t["old"], t["ref"], t["mask"], rewards,
                                       OBJECTIVE, beta=0.04, impl=impl, **kw),
                            bytes_moved=nbytes, **timing))
    x = t["logp"].clone().requires_grad_(True)

    def separate() -> None:
        x.grad = None
        a = group_advantages(rewards, OBJECTIVE, impl="cpu", **kw).advantages
        policy_loss(x, t["old"], t["ref"], a.reshape(-1), t["mask"], beta=0.04, impl="cpu").loss.backward()

    rows.append(measure("nonlinear_grpo_loss fwd+bwd", "cpu (2 ops separately)", shape, separate,
                        bytes_moved=nbytes, **timing))

    # 4. dispatcher overhead on small shapes
    small = torch.randn(8, 8, m)
    lam = torch.tensor([0.5, 0.5])
    codes = ([1, 1], [4, 4], [1.0, 1.0])
    shape = "B=8 G=8 m=2"
    for impl in ("cpu", "reference"):
        rows.append(measure("small group_advantages", f"public {impl}", shape,
                            lambda impl=impl: group_advantages(small, OBJECTIVE, impl=impl, **kw),
                            **timing))
    rows.append(measure("small group_advantages", "torch.ops.iama (direct)", shape,
                        lambda: ops.group_advantages(small, None, lam, *codes, "unbiased", "group", 1e-4),
                        **timing))
    st = _token_inputs(8, 16)
    sadv = torch.randn(8)
    shape = "S=8 T=16"
    for impl in ("cpu", "reference"):
        rows.append(measure("small policy_loss fwd", f"public {impl}", shape,
                            lambda impl=impl: policy_loss(st["logp"], st["old"], st["ref"], sadv, st["mask"],
                                                          beta=0.04, impl=impl),
                            **timing))
    rows.append(measure("small policy_loss fwd", "torch.ops.iama (direct)", shape,
                        lambda: ops.policy_loss_fwd(st["logp"], st["old"], st["ref"], sadv, st["mask"], 0.2,
                                                    0.2, 0.04, "grpo", None),
                        **timing))

    by = {(r.benchmark, r.impl): r.median_ms for r in rows}
    ga = by[("group_advantages", "reference")] / by[("group_advantages", "cpu")]
    pl = by[("policy_loss fwd+bwd", "reference")] / by[("policy_loss fwd+bwd", "cpu")]
    frac = next(r for r in rows if r.benchmark == "policy_loss fwd+bwd" and r.impl == "cpu").extra[
        "fraction_of_copy_bandwidth"]
    one = by[("nonlinear_grpo_loss fwd+bwd", "cpu")]
    two = by[("nonlinear_grpo_loss fwd+bwd", "cpu (2 ops separately)")]
    direct = "torch.ops.iama (direct)"
    overhead_ga = by[("small group_advantages", "public cpu")] - by[("small group_advantages", direct)]
    overhead_pl = by[("small policy_loss fwd", "public cpu")] - by[("small policy_loss fwd", direct)]
    notes += [
        f"group_advantages: C++ is {ga:.1f}x the reference (target >= 10x)",
        f"policy_loss fwd+bwd: C++ is {pl:.1f}x the reference (target >= 3x), "
        f"{100 * frac:.0f}% of the copy bandwidth (target >= 40%)",
        f"nonlinear_grpo_loss: one-pass {one:.2f} ms vs separate {two:.2f} ms (target: no slower)",
        f"dispatcher overhead (public function - direct op, small shapes): group_advantages "
        f"{1e3 * overhead_ga:.0f} us, policy_loss {1e3 * overhead_pl:.0f} us",
    ]
    return rows, notes


def format_rows(rows: list[Measurement]) -> str:
    header = (f"{'benchmark':<30} {'impl':<26} {'shape':<22} {'median ms':>10} {'p20':>9} {'p80':>9} "
              f"{'GB/s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gbps = f"{r.gbps:7.2f}" if r.gbps is not None else " " * 7
        lines.append(f"{r.benchmark:<30} {r.impl:<26} {r.shape:<22} {r.median_ms:10.3f} {r.p20_ms:9.3f} "
                     f"{r.p80_ms:9.3f} {gbps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (smoke run)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one torch thread, timed by the thread's CPU time (robust to other load)")
    args = parser.parse_args(argv)
    _extension.load()
    name = "cpu"
    if args.cpu_time:
        import time
        import types

        import harness

        torch.set_num_threads(1)
        # harness.time_fn reads time.perf_counter; give it this thread's CPU-time clock instead.
        harness.time = types.SimpleNamespace(perf_counter=time.thread_time, strftime=time.strftime)
        name = "cpu_thread_time"
    timing = dict(warmup=1, min_runs=3, max_runs=5, budget_s=0.2) if args.quick else \
        dict(warmup=3, min_runs=10, max_runs=200, budget_s=3.0)
    rows, notes = bench(timing)
    path = write_results(rows, name) if args.out is None else write_results(rows, name, Path(args.out))
    env = environment()
    print(f"machine: {env.get('cpu_model', env['processor'])}, {env['cpu_count']} cpus, "
          f"{env['torch_threads']} torch threads; torch {env['torch']}, python {env['python']}")
    print(f"results: {path}")
    print("\n".join(notes))
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

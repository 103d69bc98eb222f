"""CPU benchmark of the C++ backend (``impl="cpu"``) against the PyTorch reference: one run, one table.

Measures, with every torch thread of this machine:

1. ``group_advantages``: B = 4096 groups of G = 16, m = 2 criteria, BestOfN(4) unbiased on both,
   WeightedSum: C++ vs reference (public functions, validation included).
   Also with ``set_data_checks(False)`` (both implementations): the public functions' finiteness
   check of the rewards is a separate torch pass that costs about as much as the C++ kernel.
2. ``policy_loss`` forward + backward: S = 512, T = 2048, float32 logp / old / ref, bool mask,
   beta = 0.04: C++ vs reference, with GB/s from the bytes the op must move at least (read logp,
   old, ref: 4 B each, mask: 1 B, advantages; write the gradient: 4 B = 17.8 MB) against two copy
   bandwidths measured in the same run (``dst.copy_(src)`` into a preallocated tensor, median of
   many runs, GB/s = 2 * bytes / time): of 256 MiB (main memory: the DRAM roofline) and of the
   op's own size, 17.8 MB (the same working-set class as the op's data, which stays largely in
   the last-level cache between repetitions: the roofline that the op could reach at best).
   Also the C++ op with the int64 mask TRL and verl use (8 B per token, 25.2 MB: read as is and
   narrowed to bytes row by row in the kernel), with bfloat16 logp / old / ref / gradient (9.4 MB;
   on the hand-vectorised row where the CPU has AVX-512),
   with GSPO's sequence ratio (``ratio_level="sequence"``: the same bytes, a pre-pass per row),
   and with CISPO's, SAPO's, VESPO's and GMPO's surrogates (``surrogate="cispo"``/``"sapo"``/
   ``"vespo"``/``"gmpo"``: the same bytes; CISPO and SAPO on the hand-vectorised row where the
   CPU has AVX-512, VESPO and GMPO on the templated row after their pre-pass over each row's logp
   and old), and with the k2 KL estimator (``kl_estimator="k2"``, the same bytes: the hand-vectorised row
   with the estimator's coefficients where the CPU has AVX-512, else the templated row that reads
   them at run time; ``benchmarks/kl_estimators.py`` times every estimator).
3. ``nonlinear_grpo_loss`` forward + backward at the same token count (B = 32, G = 16, T = 2048):
   the one-pass op vs ``group_advantages`` + ``policy_loss`` run separately (timed in alternation,
   call by call) vs the reference.
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
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
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
    set_data_checks,
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


def _alternating(benchmark: str, shape: str, fns: dict[str, Callable[[], None]], nbytes: float,
                 timing: dict) -> list[Measurement]:
    """Times several functions call by call in alternation (warm-up, then rounds of one call each
    until the budget is spent); one :class:`Measurement` per function, as harness.measure makes."""
    clock = harness.time.perf_counter  # the harness's clock (thread CPU time with --cpu-time)
    for fn in fns.values():
        for _ in range(timing["warmup"]):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    first = times[next(iter(fns))]
    start = clock()
    budget = timing["budget_s"]
    while len(first) < timing["max_runs"] and (len(first) < timing["min_runs"] or clock() - start < budget):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        med = statistics.median(ts)
        rows.append(Measurement(benchmark, name, shape, med, q[1], q[7], len(ts),
                                gbps=nbytes / (med * 1e-3) / 1e9))
    return rows


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
    set_data_checks(False)
    try:
        for impl in ("cpu", "reference"):
            rows.append(measure("group_advantages (no data checks)", impl, shape,
                                lambda impl=impl: group_advantages(rewards, OBJECTIVE, impl=impl, **kw),
                                **timing))
    finally:
        set_data_checks(True)

    # 2. copy bandwidth and the policy loss
    S, T = 512, 2048
    nbytes = S * T * (3 * 4 + 1 + 4) + S * 4
    # Copies into a preallocated tensor (no page-fault costs): of main-memory size, and of the op's
    # own size (its data, like the op's, stays largely in the last-level cache between runs).
    copies = {}
    for label, numel in (("256 MiB", 64 * 2**20), (f"{nbytes / 1e6:.1f} MB (op size)", nbytes // 4)):
        src = torch.ones(numel)
        dst = torch.empty_like(src)
        copies[label] = measure("copy (dst.copy_(src))", "torch", label,
                                lambda dst=dst, src=src: dst.copy_(src), bytes_moved=2 * src.numel() * 4,
                                **timing)
        rows.append(copies[label])
        del src, dst
    dram, same_size = copies.values()
    t = _token_inputs(S, T)
    adv = torch.randn(S)
    shape = f"S={S} T={T} f32"
    for impl in ("cpu", "reference"):
        x = t["logp"].clone().requires_grad_(True)
        row = measure("policy_loss fwd+bwd", impl, shape,
                      _loss_step(policy_loss, x, t["old"], t["ref"], adv, t["mask"], beta=0.04, impl=impl),
                      bytes_moved=nbytes, **timing)
        row.extra["fraction_of_copy_bandwidth"] = row.gbps / dram.gbps
        row.extra["fraction_of_same_size_copy_bandwidth"] = row.gbps / same_size.gbps
        rows.append(row)
    # Variants of the C++ op: the int64 mask TRL and verl hand over (8 B per token, narrowed to
    # bytes row by row in the kernel), bfloat16 log-probs, GSPO's sequence ratio (each row's mean
    # log-ratio first, the row then in cache), and the CISPO, SAPO, VESPO and GMPO surrogates
    # (VESPO's weight and GMPO's objective, like GSPO's ratio, from a pre-pass over the row), and
    # the k2 KL estimator (the estimator's coefficients read at run time).
    bf16 = {name: t[name].to(torch.bfloat16) for name in ("logp", "old", "ref")}
    for label, src, mask, moved, options in (
            ("cpu, int64 mask", t, t["mask"].long(), nbytes + 7 * S * T, {}),
            ("cpu, bfloat16", bf16, t["mask"], nbytes - 8 * S * T, {}),
            ("cpu, sequence ratio", t, t["mask"], nbytes, {"ratio_level": "sequence"}),
            ("cpu, cispo", t, t["mask"], nbytes, {"surrogate": "cispo"}),
            ("cpu, sapo", t, t["mask"], nbytes, {"surrogate": "sapo"}),
            ("cpu, vespo", t, t["mask"], nbytes, {"surrogate": "vespo"}),
            ("cpu, gmpo", t, t["mask"], nbytes, {"surrogate": "gmpo", "eps_low": 0.4, "eps_high": 0.4}),
            ("cpu, k2 kl", t, t["mask"], nbytes, {"kl_estimator": "k2"})):
        x = src["logp"].clone().requires_grad_(True)
        row_shape = shape.replace("f32", "bf16") if src is bf16 else shape
        row = measure("policy_loss fwd+bwd", label, row_shape,
                      _loss_step(policy_loss, x, src["old"], src["ref"], adv, mask, beta=0.04, impl="cpu",
                                 **options),
                      bytes_moved=moved, **timing)
        row.extra["fraction_of_copy_bandwidth"] = row.gbps / dram.gbps
        rows.append(row)
    x = t["logp"].clone()
    rows.append(measure("policy_loss fwd (op only)", "cpu", shape,
                        lambda: ops.policy_loss_fwd(x, t["old"], t["ref"], adv, t["mask"], 0.2, 0.2, 0.04,
                                                    "grpo", None),
                        bytes_moved=nbytes, **timing))

    # 3. the one-pass op at the same token count, against the two ops run separately: timed in
    # alternation (one call of each per round), so that both see the same machine and heap state
    # (a 4 MB gradient whose memory the allocator returned to the system costs page faults, and
    # which case gets them depends on the allocations made just before).
    B, G = 32, 16
    rewards = torch.randn(B, G, m, generator=torch.Generator().manual_seed(1))
    shape = f"B={B} G={G} m={m} T={T}"
    x = t["logp"].clone().requires_grad_(True)

    def separate() -> None:
        x.grad = None
        a = group_advantages(rewards, OBJECTIVE, impl="cpu", **kw).advantages
        policy_loss(x, t["old"], t["ref"], a.reshape(-1), t["mask"], beta=0.04, impl="cpu").loss.backward()

    one_pass = _loss_step(nonlinear_grpo_loss, x, t["old"], t["ref"], t["mask"], rewards, OBJECTIVE,
                          beta=0.04, impl="cpu", **kw)
    pair = {"cpu": one_pass, "cpu (2 ops separately)": separate}
    rows += _alternating("nonlinear_grpo_loss fwd+bwd", shape, pair, nbytes, timing)
    x = t["logp"].clone().requires_grad_(True)
    rows.append(measure("nonlinear_grpo_loss fwd+bwd", "reference", shape,
                        _loss_step(nonlinear_grpo_loss, x, t["old"], t["ref"], t["mask"], rewards,
                                   OBJECTIVE, beta=0.04, impl="reference", **kw),
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
    ga_raw = (by[("group_advantages (no data checks)", "reference")]
              / by[("group_advantages (no data checks)", "cpu")])
    pl_row = next(r for r in rows if r.benchmark == "policy_loss fwd+bwd" and r.impl == "cpu")
    frac = pl_row.extra["fraction_of_copy_bandwidth"]
    frac_same = pl_row.extra["fraction_of_same_size_copy_bandwidth"]
    fwd = next(r for r in rows if r.benchmark == "policy_loss fwd (op only)")
    one = by[("nonlinear_grpo_loss fwd+bwd", "cpu")]
    two = by[("nonlinear_grpo_loss fwd+bwd", "cpu (2 ops separately)")]
    direct = "torch.ops.iama (direct)"
    overhead_ga = by[("small group_advantages", "public cpu")] - by[("small group_advantages", direct)]
    overhead_pl = by[("small policy_loss fwd", "public cpu")] - by[("small policy_loss fwd", direct)]
    notes += [
        f"group_advantages: C++ is {ga:.1f}x the reference (target >= 10x); "
        f"{ga_raw:.1f}x with the data checks off",
        f"policy_loss fwd+bwd: C++ is {pl:.1f}x the reference (target >= 3x), "
        f"{100 * frac:.0f}% of the 256 MiB copy bandwidth (target >= 40%), "
        f"{100 * frac_same:.0f}% of the same-size copy's; forward op alone {fwd.gbps:.1f} GB/s",
        f"nonlinear_grpo_loss: one-pass {one:.2f} ms vs separate {two:.2f} ms (target: no slower)",
        f"dispatcher overhead (public function - direct op, small shapes): group_advantages "
        f"{1e3 * overhead_ga:.0f} us, policy_loss {1e3 * overhead_pl:.0f} us",
    ]
    return rows, notes


def format_rows(rows: list[Measurement]) -> str:
    header = (f"{'benchmark':<34} {'impl':<26} {'shape':<22} {'median ms':>10} {'p20':>9} {'p80':>9} "
              f"{'GB/s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gbps = f"{r.gbps:7.2f}" if r.gbps is not None else " " * 7
        lines.append(f"{r.benchmark:<34} {r.impl:<26} {r.shape:<22} {r.median_ms:10.3f} {r.p20_ms:9.3f} "
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

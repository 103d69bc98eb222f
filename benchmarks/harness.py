"""The one benchmark harness: warm-up, median of many runs, peak memory, a derived throughput
figure next to the time, and a long-format results file that records the device and versions.

Every benchmark script builds a list of :class:`Measurement` through :func:`measure` and hands
it to :func:`write_results`, which appends one JSON object per line (long format: one row per
(benchmark, implementation, shape)) and prints a table last.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    benchmark: str
    impl: str
    shape: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    gbps: float | None = None
    tflops: float | None = None
    peak_mem_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    min_runs: int = 10,
    max_runs: int = 200,
    budget_s: float = 2.0,
) -> list[float]:
    """Wall-clock times in ms of ``fn()`` after ``warmup`` calls; runs until ``budget_s`` is spent
    (at least ``min_runs``, at most ``max_runs``). CUDA work is synchronised around each run."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(
    benchmark: str,
    impl: str,
    shape: str,
    fn: Callable[[], Any],
    *,
    bytes_moved: float | None = None,
    flops: float | None = None,
    device: torch.device | str = "cpu",
    **timing: Any,
) -> Measurement:
    """Time ``fn`` and derive GB/s from ``bytes_moved`` (and TFLOP/s from ``flops``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_fn(fn, device=device, **timing)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Measurement(
        benchmark, impl, shape, med, q[1], q[7], len(times),
        gbps=None if bytes_moved is None else bytes_moved / (med * 1e-3) / 1e9,
        tflops=None if flops is None else flops / (med * 1e-3) / 1e12,
        peak_mem_mb=peak,
    )


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 3,
                device: torch.device | str = "cpu", seed: int = 0) -> dict[str, list[float]]:
    """Wall-clock times in ms of each candidate, ``rounds`` calls each, the candidates taking
    turns call by call so that a change in machine load hits them alike. The order is shuffled
    every round so that none always follows the same one: what ran just before (what it left in
    the caches and the allocator) moved a call by up to 2x on the 2-core CI machine."""
    device = torch.device(device)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names, order = list(candidates), random.Random(seed)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            candidates[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def from_times(benchmark: str, impl: str, shape: str, times: list[float], *,
               bytes_moved: float | None = None, extra: dict[str, Any] | None = None) -> Measurement:
    """A :class:`Measurement` (median, p20, p80, GB/s) from times in ms taken elsewhere."""
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    med = statistics.median(times)
    return Measurement(benchmark, impl, shape, med, q[1], q[7], len(times),
                       gbps=None if bytes_moved is None else bytes_moved / (med * 1e-3) / 1e9,
                       extra=dict(extra or {}))


def record_times(rows: list[Measurement], benchmark: str, shape: str, times: dict[str, list[float]], *,
                 bytes_moved: float | None = None, extra: dict[str, Any] | None = None) -> None:
    """Append a :class:`Measurement` per candidate of an :func:`interleaved` run to ``rows`` and
    print a progress line for each."""
    for impl, ms in times.items():
        rows.append(from_times(benchmark, impl, shape, ms, bytes_moved=bytes_moved, extra=extra))
        print(f"{shape:<36} {impl:<28} {rows[-1].median_ms:9.3f} ms", flush=True)


def report(rows: list[Measurement], name: str, baseline_impl: str, write: bool = True) -> None:
    """The end of a benchmark script: ``<name>.jsonl`` in benchmarks/results (unless ``write`` is
    False), then the table."""
    if write:
        print(f"wrote {write_results(rows, name)}")
    print(format_table(rows, baseline_impl=baseline_impl))


def token_pass_inputs(S: int, T: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A policy-loss batch for the op benchmarks: S x T logp / old / ref in ``dtype`` (old and ref
    within 0.1 of logp), a bool prefix mask of random lengths, one advantage per row (``adv``) and
    per-token ones (``token_adv``, 0 where the mask is 0); seeded."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(S, T, generator=g) * 3
    lengths = torch.randint(T // 4, T + 1, (S, 1), generator=g)
    mask = torch.arange(T) < lengths
    return {"logp": logp.to(dtype), "old": (logp + 0.1 * torch.randn(S, T, generator=g)).to(dtype),
            "ref": (logp + 0.1 * torch.randn(S, T, generator=g)).to(dtype), "mask": mask,
            "adv": torch.randn(S, generator=g), "token_adv": torch.randn(S, T, generator=g) * mask}


def environment() -> dict[str, Any]:
    """Machine and versions, recorded with every results file."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        model = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"],
                               capture_output=True, text=True, timeout=5).stdout
        info["cpu_model"] = model.split(":", 1)[-1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def format_table(rows: list[Measurement], baseline_impl: str | None = None) -> str:
    """A plain-text table; ``x base`` is the speed-up over ``baseline_impl`` at the same shape."""
    base = {(r.benchmark, r.shape): r.median_ms for r in rows if r.impl == baseline_impl}
    header = f"{'benchmark':<28} {'impl':<22} {'shape':<26} {'median ms':>10} {'GB/s':>8} {'x base':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        b = base.get((r.benchmark, r.shape))
        speedup = f"{b / r.median_ms:7.2f}" if b else " " * 7
        gbps = f"{r.gbps:8.2f}" if r.gbps is not None else " " * 8
        lines.append(f"{r.benchmark:<28} {r.impl:<22} {r.shape:<26} {r.median_ms:10.3f} {gbps} {speedup}")
    return "\n".join(lines)


def write_results(rows: list[Measurement], name: str, directory: Path = RESULTS_DIR) -> Path:
    """Write ``<directory>/<name>.jsonl``: one environment line, then one line per measurement."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"environment": environment(),
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")
    return path

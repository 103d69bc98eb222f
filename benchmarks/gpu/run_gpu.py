"""GPU benchmark of the Triton backend: one run, one table.

Measures, on the current CUDA device:

1. device copy bandwidth (``dst.copy_(src)`` of 512 MiB: read + write), the roofline;
2. ``group_advantages`` alone at B * G up to 65536 (measured before the token cases: seconds in
   all): through the public function (validation, one host sync for the finiteness check, one
   launch: the benchmark's lambda does not depend on the values) and the kernel alone with the
   criterion weights given (timed with CUDA graphs so that launch overhead is excluded), at the
   default warp count and at the other counts of 1, 2 and 4;
3. for 1M and 16M tokens (T = 1024 tokens per row, G = 8 and 16, m = 2 criteria, float32
   logp, old/ref log-probs, bool prefix mask with about 3/8 padding; and bfloat16 log-probs at
   G = 16):
   * a correctness check first: the launch below against the float64 reference at that size;
   * ``fused kernel, graph``: the launcher alone (no argument validation, whose finiteness checks
     synchronise with the host, no autograd), replayed in a CUDA graph over enough input sets to
     defeat the L2 cache: the kernel time without launch overhead; ``fused kernel``: the same
     launcher, launched from Python;
   * ``token kernel, graph``: the token kernel of ``separate`` (``policy_loss``'s launcher) on the
     same input sets with precomputed advantages: what the fused kernel's advantages cost;
   * ``fused``: ``nonlinear_grpo_loss(impl="triton")`` forward (which computes and stores the
     gradient) and forward + backward;
   * ``separate``: ``group_advantages`` then ``policy_loss``, both ``impl="triton"``;
   * ``eager``: ``nonlinear_grpo_loss(impl="reference")`` (PyTorch eager);
   * ``compiled``: ``torch.compile`` of the reference function (float32 only);
   and float32 at 16M tokens with G = 64 (no compiled row), for the register lead in
   ``benchmarks/gpu/NOTES.md``;
   and, last, ``ppo policy_loss fwd+bwd`` at both sizes: ``policy_loss`` as verl's ``"iama"``
   policy loss runs it (per-token advantages, dual clip, no KL), Triton against eager, and
   ``gspo policy_loss fwd+bwd``: the same as verl's ``"iama_gspo"`` runs it (GSPO's sequence
   ratio: a second pre-pass over each row's logp and old, no dual clip), and ``cispo`` and
   ``sapo policy_loss fwd+bwd`` as ``"iama_cispo"`` and ``"iama_sapo"`` run them, and
   ``vespo policy_loss fwd+bwd`` (TRL's ``"vespo"``: each row's weight from a pre-pass) and
   ``gmpo policy_loss fwd+bwd`` as ``"iama_geo_mean"`` runs it (GMPO: each row's objective from a
   pre-pass); and ``covariance_top_k`` / ``covariance_band``, KL-Cov's and Clip-Cov's token
   selections, against verl's arithmetic in PyTorch (:func:`bench_covariance`); and
   ``rollout_correction``, the train/rollout correction, against its eager PyTorch arithmetic
   (:func:`bench_rollout_correction`);
   with GB/s computed from the fewest bytes the op must move (:func:`floor_bytes`: the mask and
   the gradient for every token, logp/old/ref up to each row's last valid token; rewards are
   negligible) and the ratio to the copy bandwidth, to eager and to compiled. The backward of
   ``fused`` moves more (it scales the saved gradient by ``grad_output``: one more read and
   write of it), so its fraction of the copy bandwidth is lower by design.

Timing: ``triton.testing.do_bench`` medians (warm-up and compilation excluded). Results go to
``<out>/gpu_bench.csv`` and ``<out>/gpu_bench.jsonl`` (long format with the environment, via
benchmarks/harness.py); ``<out>`` is ``--out``, else ``$OUT``, else benchmarks/results/. The
check and target lines, then the table, are printed last; the exit status is 1 if a
measurement raised or a check failed. Sized to finish in a few minutes on an H100.

``--smoke`` runs the same code at toy sizes (one token size, one group size) on CPU tensors
through the Triton interpreter (``TRITON_INTERPRET=1``), without torch.compile, so that the
script is tested without a GPU.

Run from the repository root: ``PYTHONPATH=. python benchmarks/gpu/run_gpu.py``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Measurement, format_table, write_results  # noqa: E402
from iama_kernels import (  # noqa: E402
    BestOfN,
    Criterion,
    Objective,
    SoftBestOfN,
    WeightedSum,
    group_advantages,
    nonlinear_grpo_loss,
    policy_loss,
)
from iama_kernels.nonlinear_grpo.reference import nonlinear_grpo_loss_ref  # noqa: E402
from iama_kernels.testing import (  # noqa: E402
    assert_matches_reference,
    max_rel_error,
    reference_grad_pair,
)

CHECK_REL = 1e-5  # float32 arithmetic, as in tests/test_triton.py
OBJECTIVE = Objective([Criterion("a", BestOfN(4)), Criterion("b", SoftBestOfN(0.5))],
                      WeightedSum([0.5, 0.5]))


def output_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return ROOT / "benchmarks" / "results"


class Timer:
    """Median time in ms of a callable: do_bench on CUDA, a short wall-clock loop otherwise.

    A measurement that raises is logged with its traceback and returns NaN, so that one failure
    does not cost the rest of a run on a machine lent for a few minutes; ``failures`` counts them
    and the script's exit status reports them."""

    def __init__(self, device: torch.device, smoke: bool) -> None:
        self.device = device
        self.smoke = smoke
        self.failures = 0

    def __call__(self, fn: Callable[[], Any], graph: bool = False) -> float:
        return self.attempt(lambda: self._time(fn, graph), float("nan"))

    def attempt(self, fn: Callable[[], Any], fallback: Any) -> Any:
        """``fn()``, or ``fallback`` when it raises (traceback printed, failure counted)."""
        try:
            return fn()
        except Exception:  # reported, counted, and the run goes on
            self.failures += 1
            traceback.print_exc()
            return fallback

    def _time(self, fn: Callable[[], Any], graph: bool) -> float:
        if self.device.type == "cuda":
            import triton.testing

            if graph:  # replays a CUDA graph: launch overhead excluded (small outputs only)
                return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        if not self.smoke:  # the smoke run times nothing worth a median: one call, no warm-up
            fn()
        times = []
        for _ in range(1 if self.smoke else 5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def row(benchmark: str, impl: str, shape: str, ms: float, nbytes: float | None,
        **extra: Any) -> Measurement:
    gbps = None if nbytes is None else nbytes / (ms * 1e-3) / 1e9
    return Measurement(benchmark, impl, shape, ms, ms, ms, 1, gbps=gbps, extra=extra)


def copy_bandwidth(timer: Timer, device: torch.device, smoke: bool) -> Measurement:
    n = (1 << 20) if smoke else (128 << 20)  # float32 elements: 4 MiB or 512 MiB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return row("copy", "torch", f"{n * 4 >> 20} MiB", ms, 2 * n * 4)


def token_inputs(tokens: int, G: int, T: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``logp, old, ref [S, T]`` in ``dtype``, a bool prefix mask (lengths uniform in
    ``[T/4, T]``: about 3/8 of the tokens are padding) and integer rewards ``[B, G, 2]``."""
    S = tokens // T
    B = S // G
    g = torch.Generator(device="cpu").manual_seed(seed)
    logp = -torch.rand(S, T, generator=g) * 3
    old = logp + 0.1 * torch.randn(S, T, generator=g)
    ref = logp + 0.1 * torch.randn(S, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (S, 1), generator=g)
    mask = (torch.arange(T)[None, :] < lengths).to(device)
    rewards = torch.randint(0, 5, (B, G, 2), generator=g).float().to(device)
    return (*(x.to(device=device, dtype=dtype) for x in (logp, old, ref)), mask, rewards)


def floor_bytes(logp: torch.Tensor, mask: torch.Tensor) -> int:
    """The fewest bytes the token pass must move: the mask read and the gradient written for every
    token, and logp, old and ref read up to each row's last valid token (the padding after it is
    never needed, and the Triton kernels do not read it). Rewards are negligible."""
    S, T = mask.shape
    last = T - torch.flip(mask, dims=[1]).to(torch.uint8).argmax(dim=1)
    extent = int(torch.where(mask.any(dim=1), last, 0).sum())
    return S * T * (mask.element_size() + logp.element_size()) + 3 * logp.element_size() * extent


def graph_sets(nbytes: int) -> int:
    """Input sets to rotate through in a CUDA-graph replay so that each set's data has left the
    L2 cache (60 MB on an H200) before it is read again: at least 256 MiB in all, at most 16."""
    return max(1, min(16, -(-(256 << 20) // nbytes)))


def check_launch(timer: Timer, launch: Callable[..., tuple[torch.Tensor, ...]],
                 inputs: tuple[torch.Tensor, ...], kw: dict[str, Any]) -> dict[str, Any]:
    """Correct first: the benchmarked launch against the float64 reference at the benchmark's
    size, by the test suite's rule (``assert_matches_reference``: within ``CHECK_REL`` of the
    oracle's scale or 4 times the error of the same-dtype reference), for the loss and every
    gradient element (padding included, so an unwritten element shows). The relative errors are
    recorded; a check that raises counts as a failure."""
    logp, old, ref, mask, rewards = inputs

    def check() -> dict[str, Any]:
        stats, *_, grad = launch(*inputs)
        (oracle, grad64), (same, grad_same) = reference_grad_pair(
            nonlinear_grpo_loss, logp, old, ref, mask, rewards, OBJECTIVE, **kw)
        try:
            assert_matches_reference(stats[0], oracle.loss, same.loss, rel=CHECK_REL, name="loss")
            assert_matches_reference(grad, grad64, grad_same, rel=CHECK_REL, name="grad")
            ok = True
        except AssertionError as failure:
            print(f"check failed: {failure}", flush=True)
            ok = False
        return {"loss_rel_err": max_rel_error(stats[0], oracle.loss),
                "loss_rel_err_same": max_rel_error(same.loss, oracle.loss),
                "grad_rel_err": max_rel_error(grad, grad64),
                "grad_rel_err_same": max_rel_error(grad_same, grad64), "check_ok": ok}

    return timer.attempt(check, {"loss_rel_err": float("nan"), "grad_rel_err": float("nan"),
                                 "check_ok": False})


def bench_tokens(timer: Timer, device: torch.device, tokens: int, G: int, T: int,
                 dtype: torch.dtype, compiled: Callable[..., Any] | None) -> list[Measurement]:
    logp, old, ref, mask, rewards = token_inputs(tokens, G, T, device, dtype)
    shape = f"N={tokens} G={G} T={T} m=2 {str(dtype).replace('torch.', '')}"
    nbytes = floor_bytes(logp, mask)
    kw = {"beta": 0.04, "loss_type": "grpo"}
    leaf = logp.clone().requires_grad_(True)

    def fused_fwd() -> None:
        nonlinear_grpo_loss(leaf, old, ref, mask, rewards, OBJECTIVE, impl="triton", **kw)

    def fwd_bwd(impl: str) -> Callable[[], None]:
        def run() -> None:
            leaf.grad = None
            nonlinear_grpo_loss(leaf, old, ref, mask, rewards, OBJECTIVE, impl=impl, **kw).loss.backward()
        return run

    def separate() -> None:
        leaf.grad = None
        adv = group_advantages(rewards, OBJECTIVE, impl="triton").advantages
        policy_loss(leaf, old, ref, adv.reshape(-1), mask, impl="triton", **kw).loss.backward()

    from iama_kernels.advantages.triton import transform_codes
    from iama_kernels.nonlinear_grpo.triton import _nonlinear_grpo_fwd
    from iama_kernels.policy_loss.triton import _policy_loss_fwd

    codes, taus = transform_codes(OBJECTIVE.transforms)
    lam = torch.tensor([0.5, 0.5], device=device)

    def launch(x: torch.Tensor, o: torch.Tensor, r: torch.Tensor, m: torch.Tensor,
               rw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The launcher alone: no validation (its finiteness checks synchronise with the host),
        no autograd bookkeeping."""
        return _nonlinear_grpo_fwd(x, o, r, m, rw, lam, codes, taus, "plugin", 1e-4, 1,
                                   0.2, 0.2, kw["beta"], kw["loss_type"], 0, True)

    frozen = leaf.detach()
    sets = [(frozen, old, ref, mask, rewards)]
    if device.type == "cuda":  # more input sets for the graph replay (see graph_sets)
        sets += [token_inputs(tokens, G, T, device, dtype, seed=k)
                 for k in range(1, graph_sets(nbytes))]

    def fused_kernel_sets() -> None:
        for inputs in sets:
            launch(*inputs)

    # The token kernel of `separate` alone, on the same sets (advantages computed once, untimed):
    # the fused kernel's time minus this one is what its in-kernel advantages cost.
    advs = [group_advantages(rw, OBJECTIVE, impl="triton").advantages.reshape(-1)
            for *_, rw in sets]

    def token_kernel_sets() -> None:
        for (x, o, r, m, _), adv in zip(sets, advs, strict=True):
            _policy_loss_fwd(x, o, r, adv, m, 0.2, 0.2, kw["beta"], kw["loss_type"], 0, True)

    errors = check_launch(timer, launch, sets[0], kw)
    graph_ms = timer(fused_kernel_sets, graph=True) / len(sets)
    rows = [
        row("nonlinear_grpo fwd", "fused kernel, graph", shape, graph_ms, nbytes, sets=len(sets),
            **errors),
        row("nonlinear_grpo fwd", "fused kernel", shape, timer(lambda: launch(*sets[0])), nbytes),
        row("policy_loss fwd", "token kernel, graph", shape,
            timer(token_kernel_sets, graph=True) / len(sets), nbytes),
        row("nonlinear_grpo fwd", "fused", shape, timer(fused_fwd), nbytes),
        row("nonlinear_grpo fwd+bwd", "fused", shape, timer(fwd_bwd("triton")), nbytes),
        row("nonlinear_grpo fwd+bwd", "separate", shape, timer(separate), nbytes),
        row("nonlinear_grpo fwd+bwd", "eager", shape, timer(fwd_bwd("reference")), nbytes),
    ]
    if compiled is not None:

        def compiled_run() -> None:
            leaf.grad = None
            compiled(leaf, old, ref, mask, rewards, OBJECTIVE, **kw).loss.backward()

        # do_bench's first call (untimed) compiles; a failing compilation is caught by the timer.
        rows.append(row("nonlinear_grpo fwd+bwd", "compiled", shape, timer(compiled_run), nbytes))
    return rows


def bench_ppo(timer: Timer, device: torch.device, tokens: int, T: int,
              loss: str = "ppo") -> list[Measurement]:
    """verl's PPO policy loss as iama's ``"iama"`` verl loss runs it (``loss="ppo"``):
    ``policy_loss`` with per-token advantages ``[S, T]`` (GAE's, or an outcome estimator's
    broadcast), the dual clip ``c = 3`` and ``eps_high = 0.28``, no KL term, float32; or as
    ``"iama_gspo"`` runs it (``loss="gspo"``: GSPO's sequence ratio, no dual clip), or
    ``"iama_cispo"`` (``loss="cispo"``: CISPO's clipped weight, token-mean) and ``"iama_sapo"``
    (``loss="sapo"``: SAPO's soft gate, seq-mean-token-mean), or TRL's ``"vespo"``
    (``loss="vespo"``: each row's gamma weight from a pre-pass over its logp and old, token-mean),
    or ``"iama_geo_mean"`` (``loss="gmpo"``: GMPO's row objective from a pre-pass, log-space
    bounds 0.4, the mean over rows). Triton against eager, checked first."""
    logp, old, _, mask, _ = token_inputs(tokens, 8, T, device, torch.float32, seed=7)
    g = torch.Generator(device="cpu").manual_seed(8)
    adv = (torch.randn(logp.shape, generator=g).to(device) * mask)
    shape = f"N={tokens} T={T} token advantages float32"
    nbytes = floor_bytes(logp, mask)  # logp, old and the advantages up to each row's extent
    kw = {"eps_low": 0.2, "eps_high": 0.28, "beta": 0.0, "loss_type": "token", "dual_clip": 3.0}
    if loss == "gspo":
        kw = dict(kw, dual_clip=None, ratio_level="sequence")
    elif loss in ("cispo", "sapo", "vespo"):
        kw = dict(kw, dual_clip=None, surrogate=loss, loss_type="grpo" if loss == "sapo" else "token")
    elif loss == "gmpo":
        kw = dict(kw, dual_clip=None, surrogate="gmpo", loss_type="grpo", eps_low=0.4, eps_high=0.4)
    leaf = logp.clone().requires_grad_(True)

    def fwd_bwd(impl: str) -> Callable[[], None]:
        def run() -> None:
            leaf.grad = None
            policy_loss(leaf, old, None, adv, mask, impl=impl, **kw).loss.backward()
        return run

    def check() -> dict[str, Any]:
        x = logp.clone().requires_grad_(True)
        out = policy_loss(x, old, None, adv, mask, impl="triton", **kw)
        (grad,) = torch.autograd.grad(out.loss, x)
        (oracle, grad64), (same, grad_same) = reference_grad_pair(policy_loss, logp, old, None, adv, mask,
                                                                  **kw)
        try:
            assert_matches_reference(out.loss, oracle.loss, same.loss, rel=CHECK_REL, name="loss")
            assert_matches_reference(grad, grad64, grad_same, rel=CHECK_REL, name="grad")
            ok = True
        except AssertionError as failure:
            print(f"check failed: {failure}", flush=True)
            ok = False
        return {"loss_rel_err": max_rel_error(out.loss, oracle.loss),
                "grad_rel_err": max_rel_error(grad, grad64), "check_ok": ok}

    errors = timer.attempt(check, {"loss_rel_err": float("nan"), "grad_rel_err": float("nan"),
                                   "check_ok": False})
    triton_ms = timer(fwd_bwd("triton"))
    eager_ms = timer(fwd_bwd("reference"))
    return [row(f"{loss} policy_loss fwd+bwd", "triton", shape, triton_ms, nbytes,
                x_eager=eager_ms / triton_ms, **errors),
            row(f"{loss} policy_loss fwd+bwd", "eager", shape, eager_ms, nbytes)]


def bench_covariance(timer: Timer, device: torch.device, tokens: int, T: int) -> list[Measurement]:
    """KL-Cov's and Clip-Cov's token selections (``covariance_top_k`` / ``covariance_band``) as
    ``"iama_kl_cov"`` and ``"iama_clip_cov"`` run them on CUDA (Triton), against verl's own
    arithmetic in PyTorch (``torch``: the functions the verl losses fall back to), on verl's
    micro-batch: float32 log-probs, one advantage per response over a prefix mask, verl's
    defaults ``kl_cov_ratio = 0.0002``, band ``(1, 5)``, clip 0.2 / 0.28. GB/s over the fewest
    bytes a selection reads (advantages and log-probs, the mask; the band's old log-probs too).
    Checked first against the float64 reference (a valid top k, the band up to its edges)."""
    from iama.integrations.verl_loss import _band_on_device, _top_k_on_device
    from iama_kernels import covariance_band, covariance_top_k

    logp, old, _, mask, _ = token_inputs(tokens, 8, T, device, torch.float32, seed=9)
    g = torch.Generator(device="cpu").manual_seed(10)
    adv = torch.randn(logp.shape[0], 1, generator=g).to(device) * mask
    k = max(1, int(int(mask.sum()) * 0.0002))
    shape = f"N={tokens} T={T} k={k} float32"
    runs = {
        "covariance_top_k": (lambda: covariance_top_k(adv, logp, mask, k, impl="triton"),
                             lambda: _top_k_on_device(adv, logp, mask, k), 9),
        "covariance_band": (lambda: covariance_band(adv, logp, mask, 1.0, 5.0, old_logp=old, eps_low=0.2,
                                                    eps_high=0.28, impl="triton"),
                            lambda: _band_on_device(logp, old, adv, mask, 0.2, 0.28, 1.0, 5.0), 13),
    }
    a64, l64, keep = adv.double(), logp.double(), mask.reshape(-1)
    rows = []
    for name, (ours, verls, per_token) in runs.items():
        def check(name: str = name, ours: Callable[[], torch.Tensor] = ours) -> dict[str, Any]:
            got = ours()
            if name == "covariance_top_k":
                want = covariance_top_k(a64, l64, mask, k, impl="reference")
            else:
                want = covariance_band(a64, l64, mask, 1.0, 5.0, old_logp=old.double(), eps_low=0.2,
                                       eps_high=0.28, impl="reference")
            n = keep.sum()
            cov = ((a64 - (a64 * mask).sum() / n) * (l64 - (l64 * mask).sum() / n)).reshape(-1)
            tol = 16 * 2.0 ** -23 * (1 + float(cov[keep].abs().max()))
            if name == "covariance_top_k":  # a valid top k: nothing left out above the cut
                left = keep.clone()
                left[got] = False
                ok = got.numel() == want.numel() and bool(keep[got].all()) and (
                    float(cov[left].max()) <= float(cov[got].min()) + tol)
            else:  # the band: a token on one side only where it lies within rounding of an edge
                rho = torch.exp(l64 - old.double()).reshape(-1)
                one = torch.zeros_like(keep)
                one[got] = True
                other = torch.zeros_like(keep)
                other[want] = True
                differ = one != other
                edge = ((cov - 1.0).abs() < tol) | ((cov - 5.0).abs() < tol)
                edge |= ((rho - 1.28).abs() < 1e-6) | ((rho - 0.8).abs() < 1e-6)
                ok = not bool((differ & ~edge).any())
            return {"selected": int(got.numel()), "check_ok": ok}

        errors = timer.attempt(check, {"selected": -1, "check_ok": False})
        ours_ms, verls_ms = timer(ours), timer(verls)
        nbytes = per_token * logp.numel()
        rows += [row(name, "triton", shape, ours_ms, nbytes, x_torch=verls_ms / ours_ms, **errors),
                 row(name, "torch", shape, verls_ms, nbytes)]
    return rows


# rollout_correction's cases on the GPU: (name, settings); float32 log-probs 0.02 apart
CORRECTION_CASES = (
    ("token ratio", {"level": "token", "gate": "ratio", "mode": "mask", "threshold": (0.5, 5.0)}),
    ("sequence binary_kl", {"level": "sequence", "gate": "binary_kl", "mode": "mask",
                            "threshold": (0.0, 4e-4)}),  # (rows' statistics 2e-4 to 5e-4: some kept)
)


def bench_rollout_correction(timer: Timer, device: torch.device, tokens: int, T: int) -> list[Measurement]:
    """The train/rollout correction (``rollout_correction(impl="triton")``) against the same
    arithmetic in eager PyTorch (``benchmarks/rollout_correction.py``'s ``eager``: OpenRLHF's), on
    float32 old and rollout log-probs 0.02 apart and the benchmark's bool prefix mask. GB/s over
    the 13 bytes a token moves (both log-probs and the mask read, the float32 weight written).
    Checked first against the float64 reference: the weights equal to float32 rounding except
    for tokens (rows) whose statistic lies within rounding of a bound (at most 1 in 1000)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rollout_correction import eager

    from iama_kernels import rollout_correction

    old, _, _, mask, _ = token_inputs(tokens, 8, T, device, torch.float32, seed=11)
    g = torch.Generator(device="cpu").manual_seed(12)
    rollout = old + 0.02 * torch.randn(old.shape, generator=g).to(device)
    rows = []
    for name, settings in CORRECTION_CASES:
        shape = f"N={tokens} T={T} {name} float32"

        def ours(settings: dict[str, Any] = settings) -> Any:
            return rollout_correction(old, rollout, mask, impl="triton", **settings)

        def check(settings: dict[str, Any] = settings) -> dict[str, Any]:
            got = ours().weights.double()
            want = rollout_correction(old.double(), rollout.double(), mask, impl="reference",
                                      **settings).weights
            close = torch.isclose(got, want, rtol=1e-5, atol=1e-7)
            share = float(close.double().mean())
            return {"close_share": share, "check_ok": share >= 0.999}

        errors = timer.attempt(check, {"close_share": 0.0, "check_ok": False})
        ours_ms = timer(ours)
        eager_ms = timer(lambda settings=settings: eager(old, rollout, mask, **settings))
        nbytes = 13 * old.numel()
        rows += [row("rollout_correction", "triton", shape, ours_ms, nbytes, x_eager=eager_ms / ours_ms,
                     **errors),
                 row("rollout_correction", "eager", shape, eager_ms, nbytes)]
    return rows


def bench_group_advantages(timer: Timer, device: torch.device, samples: int, G: int) -> list[Measurement]:
    from iama_kernels.advantages.triton import _group_advantages_fwd, group_warps, transform_codes

    B = samples // G
    g = torch.Generator(device="cpu").manual_seed(1)
    rewards = torch.randint(0, 5, (B, G, 2), generator=g).float().to(device)
    weights = torch.tensor([0.5, 0.5], device=device)
    codes, taus = transform_codes(OBJECTIVE.transforms)
    shape = f"B*G={samples} G={G} m=2"
    nbytes = samples * (2 * 4 + 4 + 4)  # rewards in, advantages and shaped out
    api = timer(lambda: group_advantages(rewards, OBJECTIVE, impl="triton"))

    def kernel(warps: int | None) -> float:
        return timer(lambda: _group_advantages_fwd(rewards, None, weights, codes, taus, "plugin",
                                                   1e-4, 1, False, warps), graph=True)

    rows = [row("group_advantages", "triton api", shape, api, nbytes),
            row("group_advantages", "triton kernel", shape, kernel(None), nbytes)]
    # Other warp counts for the same kernel (see benchmarks/gpu/NOTES.md, "Warps of the group
    # kernel"): which one the default should be is this table's call.
    default = group_warps(G)
    rows += [row("group_advantages", f"triton kernel, {w} warp{'s' * (w > 1)}", shape, kernel(w),
                 nbytes) for w in (1, 2, 4) if w != default]
    return rows


def add_ratios(rows: list[Measurement], copy_gbps: float) -> None:
    """Ratios next to each row: fraction of copy bandwidth, speed-up over eager and compiled."""
    by = {(r.benchmark, r.impl, r.shape): r.median_ms for r in rows}
    for r in rows:
        if r.gbps is not None and r.benchmark != "copy":
            r.extra["frac_copy_bw"] = r.gbps / copy_gbps
        for base in ("eager", "compiled"):
            b = by.get(("nonlinear_grpo fwd+bwd", base, r.shape))
            if b is not None and r.benchmark.startswith("nonlinear_grpo"):
                r.extra[f"x_{base}"] = b / r.median_ms


def targets(rows: list[Measurement]) -> list[str]:
    """The H100 targets, as lines (informational: they are checked by reading, not asserted)."""
    out = []
    for r in rows:
        if "check_ok" in r.extra and r.benchmark == "rollout_correction":
            ok = r.extra["check_ok"]
            out.append(f"check {r.shape}: rollout_correction weights, "
                       f"{100 * r.extra['close_share']:.2f}% equal to float64's ({'ok' if ok else 'FAIL'})")
            out.append(f"rollout_correction {r.shape}: {r.median_ms:.3f} ms, "
                       f"{r.extra.get('x_eager', 0):.1f}x eager, "
                       f"{100 * r.extra.get('frac_copy_bw', 0):.0f}% of copy bandwidth")
        elif "check_ok" in r.extra and r.benchmark.startswith("covariance"):
            ok = r.extra["check_ok"]
            out.append(f"check {r.shape}: {r.benchmark} selects {r.extra['selected']} tokens, "
                       f"against float64 ({'ok' if ok else 'FAIL'})")
            out.append(f"{r.benchmark} {r.shape}: {r.median_ms:.3f} ms, "
                       f"{r.extra.get('x_torch', 0):.1f}x verl's torch, "
                       f"{100 * r.extra.get('frac_copy_bw', 0):.0f}% of copy bandwidth")
        elif "check_ok" in r.extra:
            ok = r.extra["check_ok"]
            out.append(f"check {r.shape}: loss rel err {r.extra['loss_rel_err']:.1e}, grad rel err "
                       f"{r.extra['grad_rel_err']:.1e} vs float64 ({'ok' if ok else 'FAIL'})")
        if r.impl.startswith("fused") and r.benchmark == "nonlinear_grpo fwd":
            out.append(f"{r.impl} fwd {r.shape}: {100 * r.extra.get('frac_copy_bw', 0):.0f}% of copy "
                       "bandwidth (target >= 80%)")
        if r.impl == "fused" and r.benchmark == "nonlinear_grpo fwd+bwd":
            xe, xc = r.extra.get("x_eager"), r.extra.get("x_compiled")
            out.append(f"fused fwd+bwd {r.shape}: {xe or 0:.1f}x eager (target >= 5), "
                       + (f"{xc:.2f}x compiled (target >= 1.5)" if xc else "compiled not measured"))
        if r.benchmark.endswith(" policy_loss fwd+bwd") and r.impl == "triton":  # ppo, gspo, ...
            out.append(f"{r.benchmark.split()[0]} fwd+bwd {r.shape}: "
                       f"{r.extra.get('x_eager', 0):.1f}x eager, "
                       f"{100 * r.extra.get('frac_copy_bw', 0):.0f}% of copy bandwidth")
        if r.benchmark == "group_advantages":
            out.append(f"group_advantages {r.impl} {r.shape}: {1e3 * r.median_ms:.1f} us "
                       "(target <= 15 us)")
    return out


def failed_checks(rows: list[Measurement]) -> int:
    return sum(not r.extra["check_ok"] for r in rows if "check_ok" in r.extra)


def write_csv(rows: list[Measurement], path: Path) -> None:
    keys = ["frac_copy_bw", "x_eager", "x_compiled"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["benchmark", "impl", "shape", "median_ms", "gbps", *keys])
        for r in rows:
            w.writerow([r.benchmark, r.impl, r.shape, f"{r.median_ms:.5f}",
                        "" if r.gbps is None else f"{r.gbps:.1f}",
                        *("" if r.extra.get(k) is None else f"{r.extra[k]:.3f}" for k in keys)])


def save(rows: list[Measurement], copy_gbps: float, out: Path) -> list[str]:
    """Ratios, then ``gpu_bench.csv``, ``gpu_bench.jsonl`` and ``gpu_bench_summary.txt`` (the
    target and check lines, also returned) for the rows measured so far."""
    add_ratios(rows, copy_gbps)
    write_csv(rows, out / "gpu_bench.csv")
    write_results(rows, "gpu_bench", out)
    summary = targets(rows)
    (out / "gpu_bench_summary.txt").write_text("\n".join(summary) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on CPU through the Triton interpreter (TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=None, help="output directory (default: $OUT or benchmarks/results)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--compile-budget-s", type=float, default=120.0,
                        help="stop measuring torch.compile once this many seconds have passed")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device = torch.device("cpu")
    else:
        print("run_gpu.py needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    smoke = args.smoke
    timer = Timer(device, smoke)
    out = output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    rows = [copy_bandwidth(timer, device, smoke)]
    copy_gbps = rows[0].gbps or 1.0
    # The group kernel first: seconds in all, and a run stopped by its timeout keeps them.
    for samples in ([32] if smoke else [8192, 65536]):
        for G in (8, 16):
            rows += bench_group_advantages(timer, device, samples, G)
    save(rows, copy_gbps, out)
    # The smoke run takes one size: every code path at half the interpreter time (the CI budget).
    token_sizes = [512] if smoke else [1 << 20, 1 << 24]
    T = 32 if smoke else 1024
    # One compiled function for every shape: after the first shape change torch.compile
    # recompiles once with dynamic shapes and reuses that graph (keeps compile time bounded).
    compiled = None if smoke or args.no_compile else torch.compile(nonlinear_grpo_loss_ref)
    # float32 at every size and G; bfloat16 log-probs (what a bf16 model gives) at G = 16.
    cases = [(tokens, G, torch.float32) for tokens in token_sizes for G in (8, 16)]
    cases += [(tokens, 16, torch.bfloat16) for tokens in token_sizes]
    if not smoke:  # G = 64: the register lead in benchmarks/gpu/NOTES.md (fused vs separate)
        cases.append((token_sizes[-1], 64, torch.float32))
    for tokens, G, dtype in cases:
        if compiled is not None and time.perf_counter() - start > args.compile_budget_s:
            print("compile budget spent: torch.compile rows skipped from here", flush=True)
            compiled = None
        rows += bench_tokens(timer, device, tokens, G, T, dtype,
                             compiled if dtype == torch.float32 and G <= 16 else None)
        save(rows, copy_gbps, out)  # after every case: a run stopped by its timeout keeps its rows
        print(f"[{time.perf_counter() - start:6.1f}s] tokens={tokens} G={G} {dtype} done", flush=True)
    # verl's PPO loss (per-token advantages, dual clip), GSPO, CISPO, SAPO and GMPO; TRL's VESPO
    for loss in ("ppo", "gspo", "cispo", "sapo", "vespo", "gmpo"):
        for tokens in token_sizes:
            rows += bench_ppo(timer, device, tokens, T, loss)
            save(rows, copy_gbps, out)
    for tokens in token_sizes:  # KL-Cov's and Clip-Cov's selections
        rows += bench_covariance(timer, device, tokens, T)
        save(rows, copy_gbps, out)
    for tokens in token_sizes:  # the train/rollout correction
        rows += bench_rollout_correction(timer, device, tokens, T)
        save(rows, copy_gbps, out)
    summary = save(rows, copy_gbps, out)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"copy bandwidth {copy_gbps:.0f} GB/s; total {time.perf_counter() - start:.0f}s; "
          f"results in {out}")
    print("\n".join(summary))
    print(format_table(rows, baseline_impl="eager"))
    bad = failed_checks(rows)
    if timer.failures or bad:
        print(f"{timer.failures} measurement(s) raised (tracebacks above), {bad} correctness "
              "check(s) failed", flush=True)
    return 1 if timer.failures or bad else 0


if __name__ == "__main__":
    sys.exit(main())

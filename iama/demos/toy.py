"""``iama demo toy``: the paper's Prop. 3.1 toy problem, solved by exact non-linear mirror descent.

Outcomes ``y`` on a grid of ``[0, 1]``; two criteria ``r_1 = 1 - y^2`` (best at 0) and
``r_2 = 1 - (1-y)^2`` (best at 1), averaged, both served by Best-of-n at inference. The
inference-unaware optimum is a point mass at 1/2 (value 3/4); the inference-aware optimum has CDF
``F(y) = y^a / (y^a + (1-y)^a)``, ``a = 1/(n-1)``: uniform for n = 2, more and more bimodal as n
grows. For n = 2, 4, 8 the demo runs exact mirror descent from the uniform policy and prints the
value reached next to the closed-form optimum's and the point mass's. With a KL term
(``beta > 0``) it then shows the linear rate of the paper's Thm 5.2 for n = 4: the gap to the
optimum against the bound ``beta KL(pi*||pi_0) / ((1 + beta/L)^T - 1)``.

Writes ``toy.png`` (densities and CDFs against the closed form, gap against bound) and
``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..theory import (
    kl_divergence,
    mirror_descent,
    objective_value,
    toy_optimum,
    toy_optimum_density,
    toy_problem,
)

NS = (2, 4, 8)
RATE_N = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo-toy", help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2000,
                        help="mirror steps per run (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=1001,
                        help="number of grid points on [0, 1] (default: %(default)s)")
    parser.add_argument("--eta", type=_eta, default=2.0,
                        help="step size of the beta = 0 runs, or 'backtracking' (each step's size by "
                             "trial, see iama.theory.mirror_descent) (default: %(default)s; the "
                             "theory's 1/L = 4/(n(n-1)) is safe but slow for n = 8, and the ascent "
                             "stays monotone at 2.0)")
    parser.add_argument("--beta", type=float, default=0.05,
                        help=f"KL coefficient of the linear-rate run, n = {RATE_N}, eta = 1/L "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eta(text: str) -> float | str:
    """``--eta``: a number, or ``backtracking``."""
    if text == "backtracking":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'backtracking', got {text!r}") from None


def _check(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if args.grid < 3:
        raise SystemExit(f"--grid must be >= 3, got {args.grid}")
    if not isinstance(args.eta, str) and not (math.isfinite(args.eta) and args.eta > 0):
        raise SystemExit(f"--eta must be > 0, got {args.eta}")
    if not (math.isfinite(args.beta) and args.beta > 0):
        raise SystemExit(f"--beta must be > 0, got {args.beta}")


def _rate_times(steps: int) -> list[int]:
    """A few T from 1 to steps, roughly geometric."""
    times = {1, steps}
    t = 10
    while t < steps:
        times.add(t)
        t *= 2
    return sorted(times)


def run(args: argparse.Namespace) -> int:
    _check(args)
    from tqdm.auto import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid, steps = args.grid, args.steps
    # The pi* of the rate run comes from a run 3x as long (its gap is then at rounding level).
    total = len(NS) * steps + 4 * steps
    bar = tqdm(total=total, desc="mirror descent", unit="step", disable=args.no_progress, leave=False)

    def tick(_t: int, _value: float) -> None:
        bar.update(1)

    runs: dict[int, dict[str, Any]] = {}
    for n in NS:
        y, rewards, objective = toy_problem(grid, n)
        result = mirror_descent(rewards, objective, eta=args.eta, steps=steps, callback=tick)
        optimum = toy_optimum(y, n)
        naive = torch.zeros(grid, dtype=torch.float64)
        naive[grid // 2] = 1.0  # the grid point nearest 1/2 (exactly 1/2 for an odd grid)
        runs[n] = {
            "y": y,
            "pi": result.pi,
            "optimum_pi": optimum,
            "reached": float(result.values[-1]),
            "optimum": objective_value(optimum, rewards, objective),
            "naive": objective_value(naive, rewards, objective),
            "L": result.L,
            "monotone": bool((result.values.diff() >= -1e-13).all()),
            "mass_outer_fifths": float(result.pi[(y < 0.2) | (y > 0.8)].sum()),
        }

    # Linear rate (Thm 5.2) with a KL term, eta = 1/L, from a random full-support policy.
    y, rewards, objective = toy_problem(grid, RATE_N)
    g = torch.Generator().manual_seed(0)
    pi0 = torch.rand(grid, generator=g, dtype=torch.float64) + 0.1
    pi0 /= pi0.sum()
    star = mirror_descent(rewards, objective, beta=args.beta, pi0=pi0, steps=3 * steps, callback=tick)
    rate = mirror_descent(rewards, objective, beta=args.beta, pi0=pi0, steps=steps, callback=tick)
    bar.close()
    f_star = float(star.values[-1])
    gap = (f_star - rate.values).clamp(min=0)
    T = torch.arange(steps + 1, dtype=torch.float64)
    with torch.no_grad():
        bound = args.beta * kl_divergence(star.pi, pi0) / torch.expm1(T * math.log1p(args.beta / rate.L))

    step_size = "backtracking sizes" if isinstance(args.eta, str) else f"eta = {args.eta:g}"
    print(f"Prop. 3.1 toy: y on {grid} grid points, r1 = 1 - y^2, r2 = 1 - (1-y)^2, weights (1/2, 1/2),"
          f" beta = 0, {steps} exact mirror steps of {step_size} from the uniform policy")
    print(f"{'n':>3} {'reached':>12} {'closed form':>12} {'rel. gap':>10} {'point mass 1/2':>15}"
          f" {'mass y<.2 or y>.8':>18}")
    for n, r in runs.items():
        rel = (r["optimum"] - r["reached"]) / r["optimum"]
        print(f"{n:>3} {r['reached']:>12.8f} {r['optimum']:>12.8f} {rel:>10.1e} {r['naive']:>15.8f}"
              f" {r['mass_outer_fifths']:>18.3f}")
    print(f"\nLinear rate (Thm 5.2): n = {RATE_N}, beta = {args.beta:g}, eta = 1/L = 1/{rate.L:g}, random "
          f"pi_0; pi* from {3 * steps} steps")
    print(f"{'T':>6} {'F(pi*) - F(pi_T)':>18} {'bound':>12}")
    rows = []
    for t in _rate_times(steps):
        rows.append({"T": t, "gap": float(gap[t]), "bound": float(bound[t])})
        print(f"{t:>6} {float(gap[t]):>18.3e} {float(bound[t]):>12.3e}")
    holds = bool((gap[1:] <= bound[1:] + 1e-14).all())
    print(f"bound holds at every T: {holds}; contraction of the bound per step: "
          f"1/(1 + beta/L) = {1 / (1 + args.beta / rate.L):.5f}")

    png = out / "toy.png"
    _plot(png, runs, T, gap, bound, args.beta, rate.L)
    results = {
        "grid": grid, "steps": steps, "eta": args.eta,
        "runs": {str(n): {k: r[k] for k in ("reached", "optimum", "naive", "L", "monotone",
                                             "mass_outer_fifths")} for n, r in runs.items()},
        "rate": {"n": RATE_N, "beta": args.beta, "L": rate.L, "bound_holds": holds, "table": rows},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {png} and {out / 'results.json'}")
    return 0


def _plot(
    path: Path,
    runs: dict[int, dict[str, Any]],
    T: torch.Tensor,
    gap: torch.Tensor,
    bound: torch.Tensor,
    beta: float,
    L: float,
) -> None:
    # Agg canvas without pyplot: no display, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    density_ax, cdf_ax, rate_ax = fig.subplots(1, 3)
    colors = {2: "tab:blue", 4: "tab:orange", 8: "tab:green"}
    for n, r in runs.items():
        y = r["y"]
        h = float(y[1] - y[0])
        inner = slice(1, -1)  # the closed-form density is infinite at 0 and 1 for n > 2
        density_ax.plot(y, r["pi"] / h, color=colors[n], lw=1.4, label=f"n = {n}: mirror descent")
        density_ax.plot(y[inner], toy_optimum_density(y[inner], n), color=colors[n], lw=1.0, ls="--",
                        label=f"n = {n}: closed form")
        cdf_ax.plot(y, r["pi"].cumsum(0), color=colors[n], lw=1.4, label=f"n = {n}: mirror descent")
        cdf_ax.plot(y, r["optimum_pi"].cumsum(0), color=colors[n], lw=1.0, ls="--",
                    label=f"n = {n}: closed form")
    density_ax.axvline(0.5, color="0.3", lw=1.0, ls=":", label="inference-unaware optimum (point mass)")
    density_ax.set_yscale("log")
    density_ax.set_ylim(0.05, 500)
    density_ax.set_xlabel("y")
    density_ax.set_ylabel("density")
    steps = len(T) - 1
    density_ax.set_title(f"Policies after {steps} mirror steps vs the optimum (Prop. 3.1)")
    density_ax.legend(fontsize=7, loc="upper center")
    cdf_ax.set_xlabel("y")
    cdf_ax.set_ylabel("CDF")
    cdf_ax.set_title("CDF against F(y) = y^a / (y^a + (1-y)^a), a = 1/(n-1)")
    cdf_ax.legend(fontsize=7, loc="upper left")

    keep = (gap > 1e-15) & (T > 0)  # below that the gap is rounding noise
    rate_ax.semilogy(T[keep], gap[keep], color="tab:orange", label="F(pi*) - F(pi_T)")
    rate_ax.semilogy(T[1:], bound[1:], color="0.2", ls="--", label="bound of Thm 5.2")
    rate_ax.set_ylim(1e-16, 10)
    rate_ax.set_xlabel("mirror step T")
    rate_ax.set_ylabel("gap to the optimum")
    rate_ax.set_title(f"Linear rate: n = {RATE_N}, beta = {beta:g}, eta = 1/L = 1/{L:g}")
    rate_ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)

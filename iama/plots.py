"""Plots for the demos: a Pareto plot of policies and overlaid completion-length histograms.

Both write a PNG with matplotlib's Agg canvas (no display needed, pyplot's state untouched) and
return the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["length_histograms", "pareto_front", "pareto_plot"]


def _figure(width: float, height: float):
    """A figure drawn by the Agg canvas without going through pyplot: no global backend switch and
    no figure registry to clean up (imported lazily so that importing iama stays cheap)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _check_points(points: object, what: str = "points") -> dict[str, tuple[float, float]]:
    if not isinstance(points, Mapping) or not points:
        raise ValueError(f"{what} must be a non-empty mapping {{name: (x, y)}}")
    out = {}
    for name, point in points.items():
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{what}[{name!r}] must be a pair of numbers (x, y), got {point!r}") from error
        if what == "points" and not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"points[{name!r}] must be finite, got {(x, y)}")
        out[str(name)] = (x, y)
    return out


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Names of the non-dominated points when both coordinates are to be maximised, sorted by x.

    A point is dominated when another is at least as good on both coordinates and better on one;
    equal points are all kept.
    """
    pts = _check_points(points)
    front = [
        name for name, (x, y) in pts.items()
        if not any(qx >= x and qy >= y and (qx > x or qy > y) for qx, qy in pts.values())
    ]
    return sorted(front, key=lambda n: (pts[n][0], -pts[n][1]))


def pareto_plot(
    points: Mapping[str, tuple[float, float]],
    *,
    xlabel: str,
    ylabel: str,
    path: str | Path,
    title: str | None = None,
    errors: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """One point per policy at its (criterion 1, criterion 2) values; the non-dominated points
    (both coordinates maximised, see :func:`pareto_front`) are joined by a line.

    Args:
        points: ``{policy name: (x, y)}``.
        xlabel, ylabel: axis labels (e.g. ``"R_short under BestOfN(4)"``).
        path: the PNG to write (parent folders are created).
        title: optional figure title.
        errors: optional ``{policy name: (x_err, y_err)}`` drawn as error bars (e.g. standard errors).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    pts = _check_points(points)
    if errors is not None:
        # NaN standard errors (a single prompt) simply draw no bar.
        errors = {k: v for k, v in _check_points(errors, "errors").items() if all(map(math.isfinite, v))}
    front = pareto_front(pts)
    fig = _figure(6, 5)
    ax = fig.subplots()
    ax.plot([pts[n][0] for n in front], [pts[n][1] for n in front], "-", color="0.6", zorder=1,
            label="Pareto front")
    for i, (name, (x, y)) in enumerate(pts.items()):
        color = f"C{i % 10}"
        marker = "o" if name in front else "x"
        if errors is not None and name in errors:
            ax.errorbar(x, y, xerr=errors[name][0], yerr=errors[name][1], fmt="none", ecolor=color,
                        alpha=0.6, zorder=2)
        ax.scatter([x], [y], color=color, marker=marker, s=60, zorder=3, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def length_histograms(
    lengths: Mapping[str, Sequence[int]],
    *,
    targets: Mapping[str, float],
    path: str | Path,
    title: str | None = None,
    xlabel: str = "completion length (tokens)",
) -> Path:
    """Overlaid histograms of completion lengths, one per policy, with a dashed vertical line at
    each target length.

    Args:
        lengths: ``{policy name: lengths}`` (any sequence or 1-D tensor of non-negative numbers).
        targets: ``{label: target length}``, e.g. ``{"short": 12, "long": 36}``.
        path: the PNG to write (parent folders are created).
        title: optional figure title.
        xlabel: the x-axis label.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(lengths, Mapping) or not lengths:
        raise ValueError("lengths must be a non-empty mapping {policy name: lengths}")
    data: dict[str, list[float]] = {}
    for name, values in lengths.items():
        try:
            data[str(name)] = [float(v) for v in values]
        except (TypeError, ValueError) as error:
            raise TypeError(f"lengths[{name!r}] must be a sequence of numbers") from error
        if not data[str(name)]:
            raise ValueError(f"lengths[{name!r}] is empty")
    if not isinstance(targets, Mapping):
        raise TypeError(f"targets must be a mapping {{label: length}}, got {type(targets).__name__}")
    target_values = {}
    for label, t in targets.items():
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"targets[{label!r}] must be a finite number, got {t!r}")
        target_values[str(label)] = float(t)
    everything = [v for vs in data.values() for v in vs] + list(target_values.values())
    low, high = math.floor(min(everything)), math.ceil(max(everything))
    # Integer-width bins (one per length when the range is small) so that every policy shares them.
    width = max(1, math.ceil((high - low + 1) / 60))
    bins = [low - 0.5 + k * width for k in range((high - low) // width + 2)]
    fig = _figure(7, 4)
    ax = fig.subplots()
    for i, (name, values) in enumerate(data.items()):
        ax.hist(values, bins=bins, alpha=0.45, color=f"C{i % 10}", label=f"{name} (n={len(values)})")
    for j, (label, t) in enumerate(target_values.items()):
        ax.axvline(t, color="k", linestyle=["--", ":", "-."][j % 3], linewidth=1.2,
                   label=f"target {label} = {t:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

"""The ``cpu`` entry of every op's backend list: what it accepts, why it refuses, and the codes
with which the ops' schemas name the transforms (importing this module builds nothing)."""

from __future__ import annotations

from . import _extension
from ._dispatch import Call
from .objectives import BestOfN, Mean, Objective, SoftBestOfN, Transform


def cpu_check(call: Call) -> str | None:
    """``None`` when the C++ CPU backend can run ``call``, else the reason (builds on first use)."""
    if call.device.type != "cpu":
        return f"the C++ CPU backend runs on CPU tensors only, got tensors on {call.device}"
    return _extension.unavailable_reason()


def cpu_announce(call: Call) -> bool:
    """A CPU call that the backend refuses means the extension is unavailable: worth one log line."""
    return call.device.type == "cpu"


# Codes shared with csrc/include/iama/common.h (TransformKind).
KIND_MEAN, KIND_BEST_OF_N, KIND_SOFT_BEST_OF_N = 0, 1, 2


def transform_codes(transforms: tuple[Transform, ...]) -> tuple[list[int], list[int], list[float]]:
    """``(kinds, ns, taus)`` of the ops' schemas for a tuple of transforms. ``BestOfN(1)`` is
    plain GRPO for both estimators and is passed as ``Mean``, as the reference treats it."""
    kinds, ns, taus = [], [], []
    for t in transforms:
        if isinstance(t, BestOfN) and t.n > 1:
            kinds.append(KIND_BEST_OF_N)
            ns.append(t.n)
            taus.append(1.0)
        elif isinstance(t, SoftBestOfN):
            kinds.append(KIND_SOFT_BEST_OF_N)
            ns.append(1)
            taus.append(t.tau)
        elif isinstance(t, (Mean, BestOfN)):
            kinds.append(KIND_MEAN)
            ns.append(1)
            taus.append(1.0)
        else:  # pragma: no cover - objectives validate transforms
            raise TypeError(f"unknown transform {t!r}")
    return kinds, ns, taus


def objective_codes(objective: Objective) -> tuple[list[int], list[int], list[float]]:
    return transform_codes(objective.transforms)

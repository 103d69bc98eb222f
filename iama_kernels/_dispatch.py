"""Explicit backend choice: ``impl="auto" | "reference" | "cpu" | "cuda" | "triton"``.

Each op lists its candidate backends in preference order. A backend says whether it can run a
given call (``check`` returns ``None``) or why not (a one-line reason). ``impl="auto"`` takes the
first that can run; an explicit ``impl`` runs that backend or raises a ``ValueError`` with its
reason: it never falls back silently. When ``auto`` passes over a backend because it is
unavailable (for example the C++ extension could not be built), that is logged once; at DEBUG
level, every choice of ``auto`` is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IMPLS = ("auto", "reference", "cpu", "cuda", "triton")

logger = logging.getLogger("iama_kernels")
_logged: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Call:
    """What a backend needs to know to accept or refuse a call."""

    op: str
    device: torch.device
    explicit: bool
    details: dict[str, Any]


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``check(call)`` returns ``None`` when the backend can run the call, otherwise the reason.
    ``run`` has the op's own signature (validated arguments, already normalised).
    ``announce`` marks reasons worth logging when ``auto`` passes the backend over (it is
    installed-but-broken rather than simply not meant for this device).
    """

    name: str
    check: Callable[[Call], str | None]
    run: Callable[..., Any]
    announce: Callable[[Call], bool] = lambda call: False


def choose(op: str, impl: str, backends: Sequence[Backend], call: Call) -> Backend:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    by_name = {b.name: b for b in backends}
    if impl != "auto":
        backend = by_name.get(impl)
        if backend is None:
            have = ", ".join(repr(b.name) for b in backends)
            raise ValueError(f"impl={impl!r} is not implemented for {op} (available: {have})")
        reason = backend.check(call)
        if reason is not None:
            raise ValueError(f"impl={impl!r} cannot run {op}: {reason}")
        return backend
    reasons = []
    for backend in backends:
        reason = backend.check(call)
        if reason is None:
            for skipped, why, loud in reasons:
                key = (op, skipped, why)
                if loud and key not in _logged:
                    _logged.add(key)
                    logger.warning("%s: impl='auto' uses %r because %r is unavailable: %s",
                                   op, backend.name, skipped, why)
            # What auto chose, for `iama info` and for anyone who turns on DEBUG for
            # "iama_kernels"; skipped while torch.compile traces (constant there, and cheap here).
            if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s on %s: impl='auto' runs %r", op, call.device.type, backend.name)
            return backend
        reasons.append((backend.name, reason, backend.announce(call)))
    listing = "; ".join(f"{name}: {why}" for name, why, _ in reasons)
    raise ValueError(f"no backend can run {op} ({listing})")


def reference_check(call: Call) -> str | None:
    return None

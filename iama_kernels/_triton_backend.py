"""The ``"triton"`` backend entries of the dispatch tables, without importing triton.

``import iama_kernels`` must stay cheap and must work without triton, so this module only decides
whether the Triton kernels can run a call (``check_*``) and imports the kernel modules
(``iama_kernels/<op>/triton.py``, which import triton) the first time a call actually runs.

Where the kernels run:

* CUDA tensors: always (``impl="auto"`` prefers them over the reference).
* CPU tensors: only through Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
  imported) and only with an explicit ``impl="triton"``: the interpreter runs Python per block
  and exists for testing the kernels without a GPU, so ``impl="auto"`` never picks it.
* float64 inputs are refused: the kernels compute in float32 (half inputs are loaded and
  converted to float32 inside the kernel); the reference keeps float64 exact.
* Groups are held in registers: ``G <= MAX_GROUP_SIZE``.
* Token tensors may have any number of elements (row offsets are 64-bit), but offsets within a
  row are 32-bit: ``(T - 1) * stride(1) < 2**31``, which holds for rows stored contiguously
  unless ``T`` itself is near ``2**31``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from ._dispatch import Call

MAX_GROUP_SIZE = 128
MAX_ROW_SPAN = 2**31 - 1  # the largest offset within a row the token kernels index (int32)
_import_error: list[str] = []


def interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors (read when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_missing() -> str | None:
    """``None`` when triton imports, else a reason that says how to install it (cached).

    Not probed while torch.compile traces (it cannot trace an import); a missing triton then
    surfaces as the ImportError of the kernel module."""
    if not _import_error and not torch.compiler.is_compiling():
        try:
            importlib.import_module("triton")
            _import_error.append("")
        except ImportError as exc:  # triton absent, or present but broken
            _import_error.append(
                f"triton is not installed or cannot be imported ({exc}); install it with "
                "`pip install triton` (or `pip install 'iama[triton]'`)"
            )
    return _import_error[0] if _import_error and _import_error[0] else None


def _check(call: Call) -> str | None:
    device = call.device
    if device.type == "cpu":
        if not interpreter_enabled():
            return ("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter, for tests); "
                    "use impl='cpu' or 'reference' on CPU")
        if not call.explicit:
            return "the Triton interpreter is for tests: CPU tensors use it only with impl='triton'"
    elif device.type != "cuda":
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    for key in ("dtype", "reward_dtype"):
        if call.details.get(key) == torch.float64:
            return ("float64 inputs are not supported (the kernels compute in float32); "
                    "use impl='reference' for float64")
    G = call.details.get("G")
    if G is not None and G > MAX_GROUP_SIZE:
        return (f"group size G={G} > {MAX_GROUP_SIZE}: the kernel keeps a whole group in "
                "registers; use another impl for larger groups")
    span = call.details.get("row_span", 0)
    if span > MAX_ROW_SPAN:
        return (f"a row of the token tensors spans {span} elements ((T - 1) * stride(1)), past "
                "the kernels' 32-bit offsets within a row; pass tensors whose rows are contiguous")
    return _triton_missing()


def check_triton(call: Call) -> str | None:
    """``Backend.check`` for every op of the Triton backend."""
    return _check(call)


def announce_triton(call: Call) -> bool:
    """Log when ``auto`` skips triton on CUDA because it cannot be imported."""
    return call.device.type == "cuda"


def first_variation_triton(*args: Any) -> torch.Tensor:
    from .advantages.triton import first_variation_triton as run

    return run(*args)


def group_values_triton(*args: Any) -> torch.Tensor:
    from .advantages.triton import group_values_triton as run

    return run(*args)


def group_advantages_triton(*args: Any) -> Any:
    from .advantages.triton import group_advantages_triton as run

    return run(*args)


def policy_loss_triton(*args: Any) -> Any:
    from .policy_loss.triton import policy_loss_triton as run

    return run(*args)


def nonlinear_grpo_loss_triton(*args: Any) -> Any:
    from .nonlinear_grpo.triton import nonlinear_grpo_loss_triton as run

    return run(*args)


def sequence_log_ratio_triton(*args: Any) -> Any:
    from .policy_loss.sequence_log_ratio_triton import sequence_log_ratio_triton as run

    return run(*args)


def covariance_top_k_triton(*args: Any) -> Any:
    from .policy_loss.covariance_triton import covariance_top_k_triton as run

    return run(*args)


def covariance_band_triton(*args: Any) -> Any:
    from .policy_loss.covariance_triton import covariance_band_triton as run

    return run(*args)


def rollout_correction_triton(*args: Any) -> Any:
    from .policy_loss.rollout_correction_triton import rollout_correction_triton as run

    return run(*args)

"""Build and load the C++ CPU extension (``csrc/``) lazily, with an error that says what to do.

Nothing is built at import time: :func:`load` runs the first time a ``cpu`` backend is asked for
(``impl="cpu"``, or ``impl="auto"`` on CPU tensors). It compiles ``csrc/registration.cpp`` and
``csrc/cpu/*.cpp`` with ``torch.utils.cpp_extension.load`` (ninja, ``-O3``, OpenMP) into
``build/torch_extensions/`` at the repository root (ignored by git; ``$IAMA_BUILD_DIR``
overrides it, and ``~/.cache/iama`` is used when the repository is not writable). Later processes
reuse the build; ninja rebuilds only what changed. The shared library registers the ``iama`` ops
with ``torch.library``; loading it also imports :mod:`iama_kernels._cpu_ops`, which registers
their fake functions and autograd formulas.

Ahead of time: ``make build`` runs the same build (it calls :func:`main`).

When the build is impossible (no C++ compiler, no ninja, a failed compilation), :func:`load`
raises :class:`ExtensionUnavailable` with the remedy, :func:`unavailable_reason` returns it as a
string, and ``impl="auto"`` falls back to the reference (logged once by the dispatcher).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["ExtensionUnavailable", "build_directory", "load", "main", "sources", "unavailable_reason"]

NAME = "iama_cpu_ops"
_REPO = Path(__file__).resolve().parent.parent
CSRC = _REPO / "csrc"
_SOURCES = (
    "registration.cpp",
    "autograd.cpp",
    "cpu/advantages.cpp",
    "cpu/group_fast_generic.cpp",
    "cpu/group_fast_avx512.cpp",
    "cpu/policy_loss.cpp",
    "cpu/token_pass_generic.cpp",
    "cpu/token_pass_avx2.cpp",
    "cpu/token_pass_avx512.cpp",
    "cpu/nonlinear_grpo.cpp",
    "cpu/sequence_log_ratio.cpp",
    "cpu/covariance.cpp",
    "cpu/rollout_correction.cpp",
    "cpu/rollout_correction_avx2.cpp",
    "cpu/rollout_correction_avx512.cpp",
)
# -O3 lets GCC vectorise the token loop (csrc/include/iama/loss.h); -fno-trapping-math lets it
# evaluate both sides of a select (which is what vectorising `mask ? x : 0` needs) and
# -fno-math-errno keeps libm calls pure. Neither changes a single result (torch itself is built
# with both); no -ffast-math, whose reassociation and NaN assumptions would. OpenMP is what
# at::parallel_for uses in this torch build (the wheel ships libgomp, which the extension shares).
_CFLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-DNDEBUG"]
_LDFLAGS = ["-fopenmp"]

# The ops that csrc/registration.cpp defines (checked after loading).
OPS = ("group_stats", "group_advantages", "policy_loss_fwd", "nonlinear_grpo_fwd", "sequence_log_ratio",
       "covariance_top_k", "covariance_band", "rollout_correction")

_lock = threading.Lock()
_loaded = False
_error: str | None = None


class ExtensionUnavailable(RuntimeError):
    """The C++ extension cannot be built or loaded on this machine; the message says why and
    what to install."""


def sources() -> list[Path]:
    """The C++ translation units of the extension."""
    return [CSRC / s for s in _SOURCES]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def build_directory() -> Path:
    """Where the extension is built: ``$IAMA_BUILD_DIR``, else ``<repo>/build/torch_extensions``,
    else ``~/.cache/iama/torch_extensions``; one subfolder per Python and torch version."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    override = os.environ.get("IAMA_BUILD_DIR")
    candidates = [Path(override)] if override else []
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    candidates += [_REPO / "build" / "torch_extensions", cache / "iama" / "torch_extensions"]
    for base in candidates:
        if _writable(base / tag):
            return base / tag
    raise ExtensionUnavailable(
        f"no writable build directory for the iama C++ extension (tried {', '.join(map(str, candidates))}); "
        "set IAMA_BUILD_DIR to a writable folder"
    )


def _missing_tools() -> str | None:
    """A remedy when the toolchain is missing, checked before calling the compiler."""
    from torch.utils import cpp_extension

    missing = []
    if not all(p.is_file() for p in sources()):
        return (f"the C++ sources are missing from {CSRC} (the extension is built from a source checkout; "
                "install the package in editable mode: pip install --no-build-isolation -e .)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++17 compiler ({compiler!r} not found; e.g. apt-get install g++, or set CXX)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if missing:
        return "the iama C++ extension cannot be built: install " + " and ".join(missing)
    return None


def _source_digest() -> str:
    """A digest of every file under csrc/. torch's JIT versioner hashes only the translation units,
    so a header-only edit could otherwise load a stale build; the digest goes into the flags."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file() and path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            digest.update(path.relative_to(CSRC).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _build(verbose: bool) -> None:
    from torch.utils import cpp_extension

    reason = _missing_tools()
    if reason is not None:
        raise ExtensionUnavailable(reason)
    try:
        cpp_extension.load(
            name=NAME,
            sources=[str(p) for p in sources()],
            extra_include_paths=[str(CSRC / "include"), str(CSRC)],
            extra_cflags=[*_CFLAGS, f"-DIAMA_SOURCE_DIGEST={_source_digest()}"],
            extra_ldflags=_LDFLAGS,
            build_directory=str(build_directory()),
            is_python_module=False,
            verbose=verbose,
        )
    except ExtensionUnavailable:
        raise
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError, SystemExit) as error:
        message = str(error).strip().splitlines()
        tail = "\n".join(message[-20:])
        raise ExtensionUnavailable(
            "building the iama C++ extension failed (it needs a C++17 compiler with OpenMP, e.g. g++, "
            "and ninja); "
            f"run `make build` to see the full log. Last lines:\n{tail}"
        ) from error
    missing = [op for op in OPS if not hasattr(torch.ops.iama, op)]
    if missing:
        raise ExtensionUnavailable(
            f"the loaded iama library lacks the ops {missing} (a stale build?); delete "
            f"{build_directory()} and retry"
        )


def load(verbose: bool = False) -> None:
    """Build (if needed) and load the extension; idempotent and thread-safe.

    Raises:
        ExtensionUnavailable: the toolchain is missing or the build failed (the message says what
            to install). The outcome is cached: a failed build is not retried in this process.
    """
    global _loaded, _error
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _error is not None:
            raise ExtensionUnavailable(_error)
        try:
            _build(verbose)
        except ExtensionUnavailable as error:
            _error = str(error)
            raise
        from . import _cpu_ops  # noqa: F401  (registers fake functions and autograd formulas)

        _loaded = True


def _assume_constant_result(fn: Callable[[], str | None]) -> Callable[[], str | None]:
    """``torch.compiler.assume_constant_result`` without its cost at import: that decorator
    imports ``torch._dynamo`` (and with it triton), close to a second per ``import iama_kernels``,
    only to set this marker, which torch.compile reads when it traces a call of ``fn`` (it then
    calls ``fn`` once and uses the result as a constant). tests/test_compile.py checks that the
    public decorator sets the same marker, so a torch that changes it fails a test."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_assume_constant_result
def unavailable_reason() -> str | None:
    """``None`` when the extension is loaded (building it on first use), else why it cannot be."""
    if _loaded:
        return None
    try:
        load()
    except ExtensionUnavailable as error:
        return str(error)
    return None


def main() -> int:
    """Ahead-of-time build (``make build``): compile, load, and print where the library lives;
    ``-v`` in the command line shows the compiler's output."""
    try:
        load(verbose="-v" in sys.argv[1:])
    except ExtensionUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    print(f"iama C++ extension built and loaded from {build_directory()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

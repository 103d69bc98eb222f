"""The reference path needs torch alone: in a fresh process where ``triton`` and every compiled
extension are blocked, all public functions still run with ``impl="reference"`` and
``impl="auto"``, and agree."""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = r'''
import importlib.abc
import importlib.machinery
import sys


class _Block(importlib.abc.MetaPathFinder):
    """Refuse triton (and its submodules) and any compiled module of the package."""

    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"{name} is blocked in this test")
        if name.startswith("iama_kernels") or name.startswith("iama."):
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
                        raise ImportError(f"compiled module {name} is blocked in this test")
                    return None
        return None


sys.meta_path.insert(0, _Block())
sys.modules["triton"] = None  # `import triton` raises ImportError

import torch
import torch.utils.cpp_extension as cpp_extension


def _no_build(*args, **kwargs):
    raise RuntimeError("building or loading a compiled extension is blocked in this test")


def _no_library(*args, **kwargs):
    raise OSError("loading a compiled library is blocked in this test")


cpp_extension.load = _no_build
cpp_extension.load_inline = _no_build
torch.ops.load_library = _no_library

import iama_kernels as ik
from iama_kernels import BestOfN, Criterion, Mean, Objective, SmoothMin, SoftBestOfN

assert sys.modules.get("triton") is None, "triton was imported"
torch.manual_seed(0)
B, G, T = 3, 5, 6
rewards = torch.randn(B, G, 2, dtype=torch.float64)
obj = Objective([Criterion("a", BestOfN(3)), Criterion("b", SoftBestOfN(0.2))], SmoothMin([1, 1], 2.0))
logp = -torch.rand(B * G, T, dtype=torch.float64)
old = logp + 0.1 * torch.randn(B * G, T, dtype=torch.float64)
ref = logp + 0.1 * torch.randn(B * G, T, dtype=torch.float64)
mask = torch.rand(B * G, T) < 0.8


def run(impl, dtype):
    r = rewards.to(dtype)
    lp = logp.to(dtype).requires_grad_(True)
    o, rf = old.to(dtype), ref.to(dtype)
    out = {
        "fv_plugin": ik.first_variation(r[..., 0], BestOfN(3), impl=impl),
        "fv_unbiased": ik.first_variation(r[..., 0], BestOfN(3), estimator="unbiased", impl=impl),
        "fv_mean": ik.first_variation(r[..., 1], Mean(), impl=impl),
        "gv": ik.group_values(r[..., 1], SoftBestOfN(0.2), impl=impl),
        "ga": ik.group_advantages(r, obj, estimator="unbiased", impl=impl).advantages,
    }
    pl = ik.policy_loss(lp, o, rf, out["ga"].reshape(-1), mask, beta=0.04, impl=impl)
    out["pl"] = pl.loss
    (out["pl_grad"],) = torch.autograd.grad(pl.loss, lp)
    ng = ik.nonlinear_grpo_loss(lp, o, rf, mask, r, obj, beta=0.04, impl=impl)
    out["ng"] = ng.loss
    (out["ng_grad"],) = torch.autograd.grad(ng.loss, lp)
    return out


for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
    a, b = run("reference", dtype), run("auto", dtype)
    for key in a:
        assert torch.isfinite(a[key]).all(), key
        torch.testing.assert_close(b[key].detach().double(), a[key].detach().double(), rtol=tol, atol=tol)

assert sys.modules.get("triton") is None, "triton was imported"
for name, module in list(sys.modules.items()):
    if name.startswith("iama") and module is not None:
        assert not str(getattr(module, "__file__", "")).endswith((".so", ".pyd")), name
print("ok")
'''


def test_reference_runs_without_triton_or_extensions() -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")

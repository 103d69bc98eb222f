"""Compile every Triton kernel ahead of time for an H100 (sm_90), without a GPU.

The interpreter lane runs the kernels' Python semantics; this script runs Triton's real compiler
(front end, MLIR passes, PTX, ptxas) on representative specialisations, which catches what the
interpreter accepts but a GPU build rejects (loop-carried types, layouts, unsupported ops). Run by
tests/test_triton.py in a fresh process with TRITON_INTERPRET unset (the interpreter replaces the
kernels when it is set at import). Prints one line per kernel and "ok" at the end.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from iama_kernels.advantages.triton import _group_advantages_fwd_kernel, group_warps
from iama_kernels.nonlinear_grpo.triton import _nonlinear_grpo_fwd_kernel
from iama_kernels.policy_loss.triton import _finalize_kernel, _policy_loss_fwd_kernel

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {
    **{name: "*fp32" for name in ("rewards_ptr", "table_ptr", "crit_ptr", "lam_ptr", "adv_ptr",
                                  "shaped_ptr", "values_ptr", "old_ptr", "ref_ptr", "partial_ptr",
                                  "out_ptr")},
    "logp_ptr": "*bf16", "grad_ptr": "*bf16", "valid_ptr": "*u8", "mask_ptr": "*u8",
    **{name: "fp32" for name in ("eps", "eps_low", "eps_high", "beta", "norm")},
}


def compile_kernel(fn: triton.runtime.JITFunction, consts: dict, num_warps: int) -> None:
    signature = {name: "constexpr" if name in consts else TYPES.get(name, "i32") for name in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs=consts), target=TARGET,
                   options={"num_warps": num_warps})
    print(fn.__name__, consts, "compiled", flush=True)


def main() -> None:
    for BG, M, valid, scale in [(8, 2, False, 1), (64, 1, True, 0), (128, 3, True, 1)]:
        compile_kernel(_group_advantages_fwd_kernel, {"BG": BG, "M": M, "NC": 1, "HAS_VALID": valid,
                                                      "SCALE": scale, "VALUES_ONLY": False}, group_warps(BG))
    for loss_type, old, ref in [(0, True, True), (1, False, True), (2, True, False)]:
        compile_kernel(_policy_loss_fwd_kernel, {"HAS_OLD": old, "HAS_REF": ref, "LOSS_TYPE": loss_type,
                                                 "WRITE_GRAD": True, "BLOCK_T": 1024, "NP": 8}, 8)
    compile_kernel(_finalize_kernel, {"LOSS_TYPE": 1, "NP": 8, "BLOCK_P": 1024}, 4)
    for BG, M in [(16, 2), (128, 1)]:
        compile_kernel(_nonlinear_grpo_fwd_kernel, {"BG": BG, "M": M, "SCALE": 1, "HAS_OLD": True,
                                                    "HAS_REF": True, "LOSS_TYPE": 0, "WRITE_GRAD": True,
                                                    "BLOCK_T": 512, "NP": 8}, max(4, group_warps(BG)))
    print("ok")


if __name__ == "__main__":
    main()

"""Compile every Triton kernel ahead of time for an H100 (sm_90), without a GPU.

The interpreter lane runs the kernels' Python semantics; this script runs Triton's real compiler
(front end, MLIR passes, PTX, ptxas) on representative specialisations, which catches what the
interpreter accepts but a GPU build rejects (loop-carried types, layouts, unsupported ops). Run by
tests/test_triton.py in a fresh process with TRITON_INTERPRET unset (the interpreter replaces the
kernels when it is set at import). Prints one line per kernel and "ok" at the end. The
specialisations are compiled by a pool of processes (one per core, at most 4: each compile is
single-threaded), then checked here.

It also checks the width of the token loads in the PTX. A launch on contiguous tensors whose row
length is a multiple of 16 is specialised by Triton's JIT (integer arguments equal to 1 become
constants; pointers and integers divisible by 16 are marked so); compiled the same way here, each
of logp, old and ref must be read by one 16-byte vector load per thread and block
(``ld.global.v4.b32``): the token pass is memory-bound, and predicated scalar loads (what a mask
that depends on each token's value gives) multiply the load instructions by 4 to 8.

And it checks register counts (ptxas -v, the ptxas Triton ships): the group block's pairwise
tiles set the count of the whole fused kernel, token loop included, so at G = 64 the fused kernel
must leave room for two 8-warp programs per multiprocessor (at most 128 registers: 65536 / 512),
and the group kernel at G = 128 (16 warps, the register limit) must not spill.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from iama_kernels.advantages.triton import _group_advantages_fwd_kernel, group_warps
from iama_kernels.nonlinear_grpo.triton import _nonlinear_grpo_fwd_kernel
from iama_kernels.policy_loss.covariance_triton import _band_kernel, _row_sums_kernel, _top_k_keys_kernel
from iama_kernels.policy_loss.sequence_log_ratio_triton import _sequence_log_ratio_kernel
from iama_kernels.policy_loss.triton import _finalize_kernel, _policy_loss_fwd_kernel, token_block

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {
    **{name: "*fp32" for name in ("rewards_ptr", "table_ptr", "crit_ptr", "lam_ptr", "adv_ptr",
                                  "shaped_ptr", "values_ptr", "old_ptr", "ref_ptr", "partial_ptr", "seq_ptr",
                                  "rows_ptr",
                                  "out_ptr")},
    "logp_ptr": "*bf16", "grad_ptr": "*bf16", "valid_ptr": "*u8", "mask_ptr": "*u8",
    "sums_ptr": "*fp32", "support_ptr": "*i32", "lo": "fp32", "hi": "fp32",
    **{name: "fp32" for name in ("eps", "eps_low", "eps_high", "beta", "norm", "tau_pos",
                                 "tau_neg", "vk_pos", "vl_pos", "vk_neg", "vl_neg")},
}
# What the JIT specialises for contiguous [S, T] tensors with T % 16 == 0.
UNIT_STRIDES = {name: 1 for name in ("s_lt", "s_ot", "s_rt", "s_mt", "s_gt")}
ALIGNED = ("s_lr", "s_or", "s_rr", "s_mr", "s_gr", "s_ar", "T")
VECTOR_LOAD = "ld.global.v4.b32"
UNIT_STRIDES_SLR = {name: 1 for name in ("s_lt", "s_ot", "s_mt")}
UNIT_STRIDES_COV = {name: 1 for name in ("s_at", "s_lt", "s_ot", "s_mt")}
COV_TYPES = {"a_ptr": "*fp32", "l_ptr": "*fp32", "o_ptr": "*fp32", "m_ptr": "*u8", "sums_ptr": "*fp64",
             "count_ptr": "*i32", "means_ptr": "*fp32", "keys_ptr": "*i64", "flags_ptr": "*u8",
             **{name: "fp32" for name in ("low", "high", "ratio_low", "ratio_high")}}


KERNELS = {fn.__name__: fn for fn in (_group_advantages_fwd_kernel, _nonlinear_grpo_fwd_kernel,
                                       _policy_loss_fwd_kernel, _finalize_kernel,
                                       _sequence_log_ratio_kernel, _row_sums_kernel, _top_k_keys_kernel,
                                       _band_kernel)}
# (kernel name, constexprs, warps, argument types, aligned), and what to check in its PTX.
Job = tuple[str, dict, int, "dict | None", bool]
JOBS: list[tuple[Job, Callable[[str], None] | None]] = []


def compile_kernel(fn: triton.runtime.JITFunction, consts: dict, num_warps: int,
                   types: dict | None = None, aligned: bool = False,
                   then: Callable[[str], None] | None = None) -> None:
    """Queue a compile for sm_90 (``aligned``: the contiguous-launch specialisation); ``then`` is
    called with its PTX once compiled."""
    JOBS.append(((fn.__name__, consts, num_warps, types, aligned), then))


def compile_job(job: Job) -> str:
    """The PTX of one queued specialisation (run in a worker process)."""
    name, consts, num_warps, types, aligned = job
    fn = KERNELS[name]
    types = {**TYPES, **(types or {})}
    # Constexpr parameters left out take their defaults, as in a JIT launch (else they would be
    # compiled as run-time integers).
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    attrs = {}
    if aligned:
        div16 = [n for n in fn.arg_names if n.endswith("_ptr") or n in ALIGNED]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16 if n not in consts}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs), target=TARGET,
                            options={"num_warps": num_warps})
    print(fn.__name__, consts, "compiled", flush=True)
    return kernel.asm["ptx"]


def run_jobs() -> None:
    """Compile every queued specialisation, then run each one's check in queue order."""
    workers = max(1, min(4, len(os.sched_getaffinity(0))))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        ptxs = list(pool.map(compile_job, [job for job, _ in JOBS]))
    for (_, then), ptx in zip(JOBS, ptxs, strict=True):
        if then is not None:
            then(ptx)


def check_vector_loads(ptx: str, loads: int, name: str) -> None:
    found = len(re.findall(re.escape(VECTOR_LOAD) + r"\b", ptx))
    if found < loads:
        raise SystemExit(f"{name}: {found} {VECTOR_LOAD} in the PTX, expected >= {loads} "
                         "(one per log-prob tensor): the token loads are not 16-byte vectors")
    print(f"{name}: {found} x {VECTOR_LOAD}", flush=True)


def aligned_loss(consts: dict, num_warps: int, types: dict, loads: int, name: str) -> None:
    """Queue the policy-loss kernel's contiguous-launch build, checking ``loads`` vector loads."""
    compile_kernel(_policy_loss_fwd_kernel, consts, num_warps, types, aligned=True,
                   then=functools.partial(check_vector_loads, loads=loads, name=f"policy_loss {name}"))


def registers(ptx: str, name: str) -> tuple[int, int]:
    """``(registers per thread, spill-store bytes)`` of the PTX's kernel, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(TARGET.arch).path, "-v", f"--gpu-name=sm_{TARGET.arch}a", path,
                               "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
    if regs is None or spill is None:
        raise SystemExit(f"{name}: no register count in the ptxas output:\n{proc.stderr}")
    print(f"{name}: {regs.group(1)} registers, {spill.group(1)} bytes spilled", flush=True)
    return int(regs.group(1)), int(spill.group(1))


def check_fused_registers(ptx: str, BG: int, num_warps: int) -> None:
    regs, _ = registers(ptx, f"nonlinear_grpo fp32 BG={BG} ({num_warps} warps)")
    if BG == 64 and regs > 65536 // (2 * 32 * num_warps):
        raise SystemExit(f"nonlinear_grpo at BG=64: {regs} registers leave room for one "
                         "program per multiprocessor (the group block's tiles grew)")


def check_group_spills(ptx: str) -> None:
    _, spill = registers(ptx, "group_advantages BG=128 M=2")
    if spill:
        raise SystemExit(f"group_advantages at BG=128 spills {spill} bytes per thread")


def check_registers() -> None:
    fp32 = {name: "*fp32" for name in ("logp_ptr", "old_ptr", "ref_ptr", "grad_ptr")}
    block_t, warps = token_block(1024, 4)
    for BG in (16, 64, 128):
        consts = {"BG": BG, "M": 2, "SCALE": 1, "HAS_OLD": True, "HAS_REF": True, "LOSS_TYPE": 0,
                  "WRITE_GRAD": True, "BLOCK_T": block_t, "NP": 8, "stride_rm": 1, **UNIT_STRIDES}
        num_warps = max(warps, group_warps(BG))
        compile_kernel(_nonlinear_grpo_fwd_kernel, consts, num_warps, fp32, aligned=True,
                       then=functools.partial(check_fused_registers, BG=BG, num_warps=num_warps))
    consts = {"BG": 128, "M": 2, "NC": 1, "HAS_VALID": True, "SCALE": 1, "VALUES_ONLY": False}
    compile_kernel(_group_advantages_fwd_kernel, consts, group_warps(128), then=check_group_spills)


def main() -> None:
    # Every register block size (one strip up to 16, several above), with and without a mask.
    for BG, M, valid, scale in [(2, 1, False, 0), (4, 3, True, 1), (8, 2, False, 1), (16, 1, True, 1),
                                (32, 2, True, 0), (64, 1, True, 0), (128, 3, True, 1)]:
        compile_kernel(_group_advantages_fwd_kernel, {"BG": BG, "M": M, "NC": 1, "HAS_VALID": valid,
                                                      "SCALE": scale, "VALUES_ONLY": False}, group_warps(BG))
    for loss_type, old, ref in [(0, True, True), (1, False, True), (2, True, False)]:
        compile_kernel(_policy_loss_fwd_kernel, {"HAS_OLD": old, "HAS_REF": ref, "LOSS_TYPE": loss_type,
                                                 "WRITE_GRAD": True, "BLOCK_T": 1024, "NP": 8}, 8)
    ratio_kl = {"HAS_OLD": True, "HAS_REF": True, "LOSS_TYPE": 1, "WRITE_GRAD": True, "BLOCK_T": 1024,
                "NP": 8, "KL_FORM": 1}  # TRL's bias-corrected KL
    compile_kernel(_policy_loss_fwd_kernel, ratio_kl, 8)
    fused_ratio_kl = {"BG": 16, "M": 2, "SCALE": 1, "HAS_OLD": True, "HAS_REF": True, "LOSS_TYPE": 0,
                      "WRITE_GRAD": True, "BLOCK_T": 512, "NP": 8, "KL_FORM": 1}
    compile_kernel(_nonlinear_grpo_fwd_kernel, fused_ratio_kl, max(4, group_warps(16)))
    dual_clip = {"HAS_OLD": True, "HAS_REF": False, "LOSS_TYPE": 1, "WRITE_GRAD": True, "BLOCK_T": 1024,
                 "NP": 8, "DUAL_CLIP": True}  # verl's vanilla loss: dual clip, no KL term
    compile_kernel(_policy_loss_fwd_kernel, dual_clip, 8)
    compile_kernel(_policy_loss_fwd_kernel, dict(dual_clip, TOKEN_ADV=True), 8)  # GAE's advantages
    compile_kernel(_nonlinear_grpo_fwd_kernel, dict(fused_ratio_kl, DUAL_CLIP=True), max(4, group_warps(16)))
    compile_kernel(_policy_loss_fwd_kernel, dict(dual_clip, TOKEN_ADV=True, SEQ_RATIO=True), 8)  # verl's gspo
    compile_kernel(_nonlinear_grpo_fwd_kernel, dict(fused_ratio_kl, SEQ_RATIO=True), max(4, group_warps(16)))
    # TRL's per-sequence clip extremes
    compile_kernel(_policy_loss_fwd_kernel, dict(dual_clip, TOKEN_ADV=True, ROW_STATS=True), 8)
    for code in (1, 2):  # CISPO and SAPO, with per-token advantages and in the fused kernel
        compile_kernel(_policy_loss_fwd_kernel, dict(ratio_kl, TOKEN_ADV=True, SURROGATE=code), 8)
        compile_kernel(_nonlinear_grpo_fwd_kernel, dict(fused_ratio_kl, SURROGATE=code),
                       max(4, group_warps(16)))
    # VESPO (TRL's "vespo": token normaliser, row or per-token advantages, the ratio KL; fused)
    compile_kernel(_policy_loss_fwd_kernel, dict(ratio_kl, SURROGATE=3), 8)
    compile_kernel(_policy_loss_fwd_kernel, dict(ratio_kl, TOKEN_ADV=True, SURROGATE=3), 8)
    compile_kernel(_nonlinear_grpo_fwd_kernel, dict(fused_ratio_kl, SURROGATE=3), max(4, group_warps(16)))
    for code in (4, 5):  # DPPO (verl's dppo_tv, dppo_kl): per-token advantages, the weight cap
        compile_kernel(_policy_loss_fwd_kernel, dict(dual_clip, TOKEN_ADV=True, SURROGATE=code), 8)
        compile_kernel(_nonlinear_grpo_fwd_kernel, dict(fused_ratio_kl, DUAL_CLIP=True, SURROGATE=code),
                       max(4, group_warps(16)))
    # GMPO (verl's geo_mean): row and per-token advantages; fused
    compile_kernel(_policy_loss_fwd_kernel, dict(ratio_kl, SURROGATE=6), 8)
    compile_kernel(_policy_loss_fwd_kernel, dict(ratio_kl, TOKEN_ADV=True, SURROGATE=6), 8)
    compile_kernel(_nonlinear_grpo_fwd_kernel, dict(fused_ratio_kl, SURROGATE=6), max(4, group_warps(16)))
    # The other KL estimators (k2, k1, |x|, and straight-through k3, k1, |x|); verl's DRO (k2, CISPO)
    for form in (2, 3, 4, 8, 11, 12):
        compile_kernel(_policy_loss_fwd_kernel, dict(ratio_kl, KL_FORM=form), 8)
    compile_kernel(_policy_loss_fwd_kernel, dict(ratio_kl, KL_FORM=2, SURROGATE=1), 8)
    compile_kernel(_nonlinear_grpo_fwd_kernel, dict(fused_ratio_kl, KL_FORM=2), max(4, group_warps(16)))
    compile_kernel(_finalize_kernel, {"LOSS_TYPE": 1, "NP": 8, "BLOCK_P": 1024}, 4)
    # sequence_log_ratio: both clamps (TRL's VESPO), none; the contiguous launch reads bf16 logp and
    # float32 old in 16-byte vectors
    for clamp_lo, clamp_hi in ((True, True), (False, False)):
        block_t, warps = token_block(4096, 2)
        compile_kernel(_sequence_log_ratio_kernel, {"CLAMP_LO": clamp_lo, "CLAMP_HI": clamp_hi,
                                                    "BLOCK_T": block_t, **UNIT_STRIDES_SLR}, warps,
                       aligned=True, then=functools.partial(check_vector_loads, loads=2,
                                                            name=f"sequence_log_ratio clamp={clamp_lo}"))
    # the covariance selections: the float64 row sums, the 64-bit keys, the band with and without
    # the clip test; the contiguous launch reads the float32 advantages and log-probs (and old) in
    # 16-byte vectors
    block_t, warps = token_block(4096, 4)
    cov_consts = {"BLOCK_T": block_t, **{k: v for k, v in UNIT_STRIDES_COV.items() if k != "s_ot"}}
    for kernel, consts, loads in ((_row_sums_kernel, cov_consts, 2), (_top_k_keys_kernel, cov_consts, 2),
                                  (_band_kernel, dict(cov_consts, CLIP_TEST=False), 2),
                                  (_band_kernel, dict(cov_consts, CLIP_TEST=True, s_ot=1), 3)):
        compile_kernel(kernel, consts, warps, COV_TYPES, aligned=True,
                       then=functools.partial(check_vector_loads, loads=loads,
                                              name=f"{kernel.__name__} {consts.get('CLIP_TEST', '')}"))
    for BG, M in [(2, 1), (16, 2), (32, 3), (128, 1)]:
        compile_kernel(_nonlinear_grpo_fwd_kernel, {"BG": BG, "M": M, "SCALE": 1, "HAS_OLD": True,
                                                    "HAS_REF": True, "LOSS_TYPE": 0, "WRITE_GRAD": True,
                                                    "BLOCK_T": 512, "NP": 8}, max(4, group_warps(BG)))
    # Load widths of the contiguous launch, float32 and bfloat16 log-probs, at the launchers' warps.
    for dtype, itemsize in (("fp32", 4), ("bf16", 2)):
        block_t, warps = token_block(1024, itemsize)
        types = {name: f"*{dtype}" for name in ("logp_ptr", "old_ptr", "ref_ptr", "grad_ptr")}
        for loss_type in (0, 1):
            consts = {"HAS_OLD": True, "HAS_REF": True, "LOSS_TYPE": loss_type, "WRITE_GRAD": True,
                      "BLOCK_T": block_t, "NP": 8, **UNIT_STRIDES}
            aligned_loss(consts, warps, types, 3, f"{dtype} loss_type={loss_type}")
        # GSPO: the pre-pass loads logp and old, the loss pass logp and ref, all as vectors.
        aligned_loss(dict(consts, SEQ_RATIO=True), warps, types, 4, f"{dtype} sequence ratio")
        # The other surrogates, row advantages (DPPO reads old in its loss pass too).
        for code, name in ((1, "cispo"), (2, "sapo"), (4, "dppo_tv"), (5, "dppo_kl")):
            aligned_loss(dict(consts, SURROGATE=code), warps, types, 3, f"{dtype} {name}")
        # VESPO: the pre-pass loads logp and old, the loss pass logp, old and ref, all as vectors.
        aligned_loss(dict(consts, SURROGATE=3), warps, types, 5, f"{dtype} vespo")
        # GMPO: as VESPO (the pre-pass's logp and old, the loss pass's logp, old and ref).
        aligned_loss(dict(consts, SURROGATE=6), warps, types, 5, f"{dtype} gmpo")
        consts = {"BG": 16, "M": 2, "SCALE": 1, "HAS_OLD": True, "HAS_REF": True, "LOSS_TYPE": 0,
                  "WRITE_GRAD": True, "BLOCK_T": block_t, "NP": 8, "stride_rm": 1, **UNIT_STRIDES}
        compile_kernel(_nonlinear_grpo_fwd_kernel, consts, max(warps, group_warps(16)), types, aligned=True,
                       then=functools.partial(check_vector_loads, loads=3, name=f"nonlinear_grpo {dtype}"))
    check_registers()
    run_jobs()
    print("ok")


if __name__ == "__main__":
    main()

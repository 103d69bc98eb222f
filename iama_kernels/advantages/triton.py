"""Triton kernels for first variations, group values and advantages (one program per group).

A program loads its group's rewards ``[G, m]`` into registers and, per criterion:

1. ranks the samples by pairwise comparison (``rank_j = #{r_i < r_j} + #{i < j : r_i = r_j}``, a
   permutation; ``last_j = #{r_i <= r_j} - 1`` is the last sorted position of ``j``'s tied run)
   instead of sorting: ``G <= 128`` fits in registers and a ``[G, G]`` comparison is cheap there
   (done in strips of 16 rows, see ``_group_block``);
2. moves the shifted rewards ``x = r - min`` into sorted order with a one-hot ``[G, G]`` sum
   (exact: one non-zero term), so that every reduction below runs over sorted positions in a
   fixed order and the result does not depend on the input order, ties included;
3. evaluates the first variation at each sample's ``last`` position (ties take the value at the
   run's last position, bit-identical) with the exact weight table of ``iama_kernels._weights``:
   ``s_(p) = D_p y_(p) + sum_{k < p} L_k (x_(k+1) - x_(k)) + sum_{k > p} U_k y_(k)`` with
   ``y = x - max x`` (rows of ``D + U`` have a constant sum, so the shift cancels when centring)
   (plug-in: ``L = c``, the increments, kept as differences so that nothing cancels; unbiased:
   ``D = A`` prefix sums, ``U_k = a_(k-1)``; Mean and ``BestOfN(1)``: ``D = 1``), or the
   SoftBestOfN plug-in in closed form; centres it; the value is ``V . x_sorted + min``;
4. combines the criteria with ``lambda`` and scales (group std computed in the sorted order of
   the first criterion, so a one-criterion result is permutation invariant to the last bit).

``first_variation`` and ``group_values`` run the same kernel with one criterion and
``lambda = 1`` (``first_variation`` is then the centred ``shaped`` output, bit for bit).

Weight tables are built once per ``(G, n, estimator)`` from the float64 tables of
``iama_kernels._weights`` and cached on the device (``_TABLES``). With a ``valid`` mask the group
size differs per group, so the table holds one row per possible count ``1..G``.

Lambda needs batch-level values before criteria can be combined and there is no grid-wide sync:
for ``Min``/``SmoothMin`` over ``m > 1`` criteria without ``criterion_weights`` a first launch
computes the values only, a few torch ops compute ``lambda``, then the full launch runs.
``scale="batch"`` likewise needs the std over the whole batch: the kernel writes the centred
``shaped`` values and one torch expression scales them. When lambda does not depend on the values
(one criterion, ``WeightedSum``, or given ``criterion_weights``) and ``scale`` is ``"group"`` or
``"none"``, it is one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import launch_device
from .._types import AdvantageOutput
from .._weights import plugin_increments, unbiased_others_weights, unbiased_prefix_sums, value_weights
from ..objectives import BestOfN, Objective, SoftBestOfN, Transform, WeightedSum
from .reference import batch_values, scale_advantages

ROW_CHUNK = tl.constexpr(16)  # rows of a pairwise tile strip (see _group_block)
SCALE_CODES = {"none": 0, "group": 1, "batch": 0}  # "batch": the kernel writes unscaled values

# (G, criterion key, per-count rows?, device) -> float32 table [NC, 4, BG]; see criterion_table.
_TABLES: dict[tuple, torch.Tensor] = {}
_STACKS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_LAMBDAS: dict[tuple, torch.Tensor] = {}


def block_size(G: int) -> int:
    """Register block for a group: the next power of two, at least 2."""
    return max(2, triton.next_power_of_2(G))


def group_warps(G: int) -> int:
    """Warps for a group's pairwise tiles. Compiled for sm_90 (ptxas -v, two criteria): BG <= 32
    fits 4 warps, BG = 64 fits 8 in 128 registers and BG = 128 fits 16 (the register limit, 128)
    without spills; fewer warps at BG = 128 spill (4 warps: 268 bytes per thread)."""
    BG = block_size(G)
    return 4 if BG <= 32 else (8 if BG == 64 else 16)


def transform_codes(transforms: tuple[Transform, ...]) -> tuple[list[int], list[float]]:
    """The transforms as plain numbers for the ops' schemas: ``code = n`` for ``BestOfN(n > 1)``,
    ``0`` for Mean and ``BestOfN(1)`` (the identity table), ``-1`` for SoftBestOfN; ``tau``
    (1.0 where unused)."""
    codes, taus = [], []
    for t in transforms:
        if isinstance(t, SoftBestOfN):
            codes.append(-1)
            taus.append(t.tau)
        else:
            codes.append(t.n if isinstance(t, BestOfN) and t.n > 1 else 0)
            taus.append(1.0)
    return codes, taus


def criterion_key(code: int, estimator: str) -> tuple:
    """What a criterion's table depends on (SoftBestOfN carries the unused identity table)."""
    return ("best_of_n", code, estimator) if code > 1 else ("mean",)


def _table_rows(count: int, key: tuple, BG: int) -> list[list[float]]:
    """Rows ``D, L, U, V`` (each of length BG, zero-padded) for a group of ``count`` samples."""
    D, L, U, V = ([0.0] * BG for _ in range(4))
    if key[0] == "mean":
        for k in range(count):
            D[k], V[k] = 1.0, 1.0 / count
        return [D, L, U, V]
    _, n, estimator = key
    if estimator == "unbiased" and count < n:
        return [D, L, U, V]  # never used: the API rejects such groups
    V[:count] = value_weights(count, n, estimator)
    if estimator == "plugin":
        L[: count - 1] = plugin_increments(count, n)
    else:
        D[:count] = unbiased_prefix_sums(count, n)
        U[1:count] = unbiased_others_weights(count, n)
    return [D, L, U, V]


def criterion_table(G: int, key: tuple, per_count: bool, device: torch.device) -> torch.Tensor:
    """float32 ``[NC, 4, BG]`` (``NC = G`` rows, one per count, when ``per_count`` else 1), cached.

    Built in float64 from exact binomials and rounded once to float32 on the device.
    """
    cache_key = (G, key, per_count, device)
    table = _TABLES.get(cache_key)
    if table is None:
        BG = block_size(G)
        counts = range(1, G + 1) if per_count else [G]
        rows = [_table_rows(c, key, BG) for c in counts]
        table = torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)
        _TABLES[cache_key] = table
    return table


def objective_tables(
    G: int, codes: list[int], taus: list[float], estimator: str, per_count: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked tables ``[m, NC, 4, BG]`` and per-criterion ``[m, 2]`` = (is_soft, tau), cached.

    Looked up inside the ops (not passed to them), so torch.compile never sees the tables."""
    cache_key = (G, tuple(codes), tuple(taus), estimator, per_count, device)
    hit = _STACKS.get(cache_key)
    if hit is None:
        tables = torch.stack([criterion_table(G, criterion_key(c, estimator), per_count, device)
                              for c in codes]).contiguous()
        crit = torch.tensor([[1.0 if c < 0 else 0.0, tau] for c, tau in zip(codes, taus, strict=True)],
                            dtype=torch.float32, device=device)
        hit = _STACKS[cache_key] = (tables, crit)
    return hit


def constant_lambda(objective: Objective, device: torch.device) -> torch.Tensor | None:
    """``lambda`` when it does not depend on the values, cached; else ``None``.

    That is the case for one criterion (lambda is the single weight, or 1) and for
    ``WeightedSum`` (lambda = w); ``Min`` and ``SmoothMin`` with ``m > 1`` need the values.
    While torch.compile traces, it is computed in the graph instead (a few scalar ops)."""
    m = len(objective)
    if m != 1 and not isinstance(objective.aggregate, WeightedSum):
        return None
    if torch.compiler.is_compiling():
        return objective.aggregate.gradient(torch.zeros(m, dtype=torch.float32, device=device))
    key = (objective.aggregate, device)
    lam = _LAMBDAS.get(key)
    if lam is None:
        lam = objective.aggregate.gradient(torch.zeros(m, dtype=torch.float64))
        lam = _LAMBDAS[key] = lam.to(device=device, dtype=torch.float32)
    return lam


@triton.jit
def _rows(v, c0: tl.constexpr, CH: tl.constexpr, BG: tl.constexpr):
    """Entries ``[c0, c0 + CH)`` of the ``[BG]`` vector ``v`` as a ``[CH, 1]`` column: the row
    operand of a ``[CH, BG]`` tile (exact: a one-hot sum, or the vector itself when CH = BG)."""
    if CH == BG:
        return v[:, None]
    else:
        pick = (c0 + tl.arange(0, CH))[:, None] == tl.arange(0, BG)[None, :]
        return tl.sum(tl.where(pick, v[None, :], 0), axis=1)[:, None]


@triton.jit
def _group_block(
    b, rewards_ptr, stride_rb, stride_rg, stride_rm,
    valid_ptr, stride_vb, stride_vg,
    table_ptr, crit_ptr, lam_ptr, values_ptr, G, eps, write_group,
    BG: tl.constexpr, M: tl.constexpr, NC: tl.constexpr,
    HAS_VALID: tl.constexpr, SCALE: tl.constexpr, WRITE_VALUES: tl.constexpr,
):
    """Advantages ``[BG]`` (sample order) and centred ``shaped`` of group ``b``; writes values.

    ``values[b, i]`` is stored when ``WRITE_VALUES`` and ``write_group``. Lanes ``>= G`` and
    invalid samples hold 0.

    Registers: every ``[BG]`` vector is indexed along axis 1 of the pairwise tiles (what an
    axis-0 reduction returns), which Triton spreads over the threads; and the tiles are
    ``[CH, BG]`` strips (``CH = min(BG, ROW_CHUNK)`` rows at a time, summed strip by strip) rather
    than ``[BG, BG]``. A vector indexed along axis 0 of a ``[BG, BG]`` tile is held whole by every
    thread of a row group (16 registers at BG = 64, 8 warps), and this block sets the register
    count of the fused kernel, token loop included: whole tiles with such vectors need 201
    registers at BG = 64 (one 8-warp program per multiprocessor), strips 128 (two), and at
    BG = 128 strips do not spill (tests/_triton_aot.py checks both; benchmarks/gpu/NOTES.md).
    """
    CH: tl.constexpr = ROW_CHUNK if BG > ROW_CHUNK else BG
    offs = tl.arange(0, BG)
    in_g = offs < G
    if HAS_VALID:
        v = tl.load(valid_ptr + b * stride_vb + offs * stride_vg, mask=in_g, other=0)
        ok = in_g & (v != 0)
    else:
        ok = in_g
    count = tl.sum(ok.to(tl.int32), axis=0)
    count_f = count.to(tl.float32)
    valid_k = offs < count  # sorted positions of valid samples come first
    if HAS_VALID:  # noqa: SIM108 (a constexpr branch in a Triton kernel)
        trow = tl.maximum(count - 1, 0)
    else:
        trow = 0
    col = offs[None, :]  # axis 1: the sample being ranked, or a sorted position
    sub = tl.arange(0, CH)[:, None]  # axis 0, plus the strip's start: another sample or position
    shaped = tl.zeros([BG], dtype=tl.float32)
    rank0 = offs
    for i in tl.static_range(M):
        r = tl.load(rewards_ptr + b * stride_rb + offs * stride_rg + i * stride_rm,
                    mask=ok, other=0.0).to(tl.float32)
        key = tl.where(ok, r, float("inf"))
        rmin = tl.min(key, axis=0)
        x = tl.where(ok, r - rmin, 0.0)  # exact zeros for the minimum and constant groups
        key_j = key[None, :]
        rank = tl.zeros([BG], dtype=tl.int32)
        last = tl.full([BG], -1, dtype=tl.int32)
        for c0 in tl.static_range(0, BG, CH):  # rows: the other samples
            key_i = _rows(key, c0, CH, BG)
            before = (key_i < key_j) | ((key_i == key_j) & (c0 + sub < col))
            rank += tl.sum(before.to(tl.int32), axis=0)
            last += tl.sum((key_i <= key_j).to(tl.int32), axis=0)
        if i == 0:
            rank0 = rank
        xs = tl.zeros([BG], dtype=tl.float32)
        ps = tl.zeros([BG], dtype=tl.int32)
        xnext = tl.zeros([BG], dtype=tl.float32)
        for c0 in tl.static_range(0, BG, CH):  # rows: samples j; columns: sorted positions k
            rank_j = _rows(rank, c0, CH, BG)
            x_j = _rows(x, c0, CH, BG)
            at = rank_j == col  # sample j sits at sorted position k
            xs += tl.sum(tl.where(at, x_j, 0.0), axis=0)
            ps += tl.sum(tl.where(at, _rows(last, c0, CH, BG), 0), axis=0)
            xnext += tl.sum(tl.where(rank_j == col + 1, x_j, 0.0), axis=0)
        gap = tl.where(offs + 1 < count, xnext - xs, 0.0)
        xmax = tl.max(tl.where(valid_k, xs, -float("inf")), axis=0)
        # Every row of D + U sums to the same constant (n unbiased, 1 Mean, 0 plug-in), so the
        # D and U terms may use y = x - max instead of x: the shift cancels in the centring, and
        # the heavily weighted top samples contribute small numbers (much less rounding for
        # large n, where s ~ n max x but the centred s is small).
        y = tl.where(valid_k, xs - xmax, 0.0)
        tbase = table_ptr + (i * NC + trow) * 4 * BG
        d_last = tl.load(tbase + ps, mask=valid_k, other=0.0)
        lg = tl.load(tbase + BG + offs) * gap
        uy = tl.load(tbase + 2 * BG + offs) * y
        vw = tl.load(tbase + 3 * BG + offs)
        p = ps[None, :]
        s_bon = d_last * y
        for c0 in tl.static_range(0, BG, CH):  # rows: positions q of position k's sum
            q = c0 + sub
            terms = tl.where(q < p, _rows(lg, c0, CH, BG),
                             tl.where((q > p) & (q < count), _rows(uy, c0, CH, BG), 0.0))
            s_bon += tl.sum(terms, axis=0)
        # SoftBestOfN plug-in (sorted order; ties have equal x and so equal s).
        is_soft = tl.load(crit_ptr + 2 * i)
        tau = tl.load(crit_ptr + 2 * i + 1)
        dmax = xs - xmax
        # The maximum and its ties weigh exactly 1 even if tau underflowed to 0 in float32.
        w = tl.where(valid_k, tl.where(dmax == 0, 1.0, tl.exp(dmax / tau)), 0.0)
        sw = tl.sum(w, axis=0)
        sw = tl.where(sw > 0, sw, 1.0)  # sw >= 1 unless the group has no valid sample
        rhat = tl.sum(w * xs, axis=0) / sw
        s_soft = w / (sw / tl.maximum(count_f, 1.0)) * (xs - rhat)
        s = tl.where(valid_k, tl.where(is_soft != 0, s_soft, s_bon), 0.0)
        # Mean taken relative to s at sorted position 0: exact when all s are equal (n = G
        # unbiased gives a constant), and the sum of small differences loses less.
        s0 = tl.sum(tl.where(offs == 0, s, 0.0), axis=0)
        mean = s0 + tl.sum(tl.where(valid_k, s - s0, 0.0), axis=0) / tl.maximum(count_f, 1.0)
        centred = tl.where(valid_k, s - mean, 0.0)
        if WRITE_VALUES:
            value = tl.where(is_soft != 0, rhat, tl.sum(vw * xs, axis=0)) + rmin
            value = tl.where(count > 0, value, 0.0)
            tl.store(values_ptr + b * M + i, value, mask=write_group)
        lam = tl.load(lam_ptr + i)
        back = tl.zeros([BG], dtype=tl.float32)  # sorted order back to sample order (exact)
        for c0 in tl.static_range(0, BG, CH):  # rows: sorted positions k; columns: samples j
            back += tl.sum(tl.where(rank[None, :] == c0 + sub, _rows(centred, c0, CH, BG), 0.0),
                           axis=0)
        shaped += lam * back
    shaped = tl.where(ok, shaped, 0.0)
    if SCALE == 1:
        # Group std over the first criterion's sorted order (fixed order: permutation invariant).
        sh = tl.zeros([BG], dtype=tl.float32)
        for c0 in tl.static_range(0, BG, CH):
            sh += tl.sum(tl.where(_rows(rank0, c0, CH, BG) == col, _rows(shaped, c0, CH, BG), 0.0),
                         axis=0)
        mu = tl.sum(sh, axis=0) / tl.maximum(count_f, 1.0)
        dev = tl.where(valid_k, sh - mu, 0.0)
        var = tl.sum(dev * dev, axis=0) / tl.maximum(count_f - 1.0, 1.0)
        denom = tl.sqrt_rn(var) + eps
        # denom == 0 only when eps == 0 and the group is constant, where shaped is exactly 0.
        adv = tl.where(denom > 0, shaped / tl.where(denom > 0, denom, 1.0), 0.0)
    else:
        adv = shaped
    return adv, shaped


@triton.jit
def _group_advantages_fwd_kernel(
    rewards_ptr, stride_rb, stride_rg, stride_rm,
    valid_ptr, stride_vb, stride_vg,
    table_ptr, crit_ptr, lam_ptr,
    adv_ptr, shaped_ptr, values_ptr, G, eps,
    BG: tl.constexpr, M: tl.constexpr, NC: tl.constexpr,
    HAS_VALID: tl.constexpr, SCALE: tl.constexpr, VALUES_ONLY: tl.constexpr,
):
    """One program per group: advantages ``[B, G]``, shaped ``[B, G]``, values ``[B, m]``."""
    b = tl.program_id(0)
    adv, shaped = _group_block(
        b, rewards_ptr, stride_rb, stride_rg, stride_rm, valid_ptr, stride_vb, stride_vg,
        table_ptr, crit_ptr, lam_ptr, values_ptr, G, eps, True,
        BG, M, NC, HAS_VALID, SCALE, True,
    )
    if not VALUES_ONLY:
        offs = tl.arange(0, BG)
        tl.store(adv_ptr + b * G + offs, adv, mask=offs < G)
        tl.store(shaped_ptr + b * G + offs, shaped, mask=offs < G)


def _group_advantages_fwd(
    rewards: torch.Tensor,
    valid: torch.Tensor | None,
    lam: torch.Tensor,
    codes: list[int],
    taus: list[float],
    estimator: str,
    eps: float,
    scale_code: int,
    values_only: bool,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch one program per group on rewards ``[B, G, m]`` (any strides, half/float32).

    ``lam [m]`` float32; ``codes, taus`` from :func:`transform_codes`; ``num_warps`` defaults to
    :func:`group_warps` (the benchmark times other counts). Returns float32
    ``advantages [B, G]``, ``shaped [B, G]`` (both empty when ``values_only``) and
    ``values [B, m]``.
    """
    B, G, m = rewards.shape
    dev = rewards.device
    tables, crit = objective_tables(G, codes, taus, estimator, valid is not None, dev)
    values = torch.empty(B, m, dtype=torch.float32, device=dev)
    shape = (0, 0) if values_only else (B, G)
    adv = torch.empty(shape, dtype=torch.float32, device=dev)
    shaped = torch.empty(shape, dtype=torch.float32, device=dev)
    if B == 0:
        return adv, shaped, values
    valid_arg = rewards if valid is None else valid.view(torch.uint8)
    vstrides = (0, 0) if valid is None else valid.stride()
    _group_advantages_fwd_kernel[(B,)](
        rewards, *rewards.stride(), valid_arg, *vstrides,
        tables, crit, lam, adv, shaped, values, G, eps,
        BG=tables.shape[-1], M=m, NC=tables.shape[1], HAS_VALID=valid is not None,
        SCALE=scale_code, VALUES_ONLY=values_only, num_warps=num_warps or group_warps(G),
    )
    return adv, shaped, values


# The op as torch sees it (opaque to torch.compile, which traces around it).
@torch.library.custom_op("iama_triton::group_advantages", mutates_args=())
def _group_advantages_op(
    rewards: torch.Tensor,
    valid: torch.Tensor | None,
    lam: torch.Tensor,
    codes: list[int],
    taus: list[float],
    estimator: str,
    eps: float,
    scale_code: int,
    values_only: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with launch_device(rewards.device):
        return _group_advantages_fwd(rewards, valid, lam, codes, taus, estimator, eps, scale_code,
                                     values_only)


@_group_advantages_op.register_fake
def _(rewards, valid, lam, codes, taus, estimator, eps, scale_code, values_only):
    B, G, m = rewards.shape
    shape = (0, 0) if values_only else (B, G)
    new = rewards.new_empty
    return (new(shape, dtype=torch.float32), new(shape, dtype=torch.float32),
            new((B, m), dtype=torch.float32))


def _lambda(
    rewards: torch.Tensor,
    objective: Objective,
    estimator: str,
    criterion_weights: torch.Tensor | None,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``lambda [m]`` float32, and the values when a values-only pass was needed to get it."""
    if criterion_weights is not None:
        return criterion_weights.to(torch.float32), None
    lam = constant_lambda(objective, rewards.device)
    if lam is not None:
        return lam, None
    ones = torch.ones(len(objective), dtype=torch.float32, device=rewards.device)
    codes, taus = transform_codes(objective.transforms)
    _, _, values = _group_advantages_op(rewards, valid, ones, codes, taus, estimator, 0.0, 0, True)
    lam = objective.aggregate.gradient(batch_values(values, valid))
    return lam.to(torch.float32), values


def group_advantages_triton(
    rewards: torch.Tensor,
    objective: Objective,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    criterion_weights: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> AdvantageOutput:
    """Triton :func:`iama_kernels.group_advantages` on rewards ``[B, G, m]`` (validated)."""
    lam, _ = _lambda(rewards, objective, estimator, criterion_weights, valid)
    codes, taus = transform_codes(objective.transforms)
    adv, shaped, values = _group_advantages_op(rewards, valid, lam, codes, taus, estimator, eps,
                                               SCALE_CODES[scale], False)
    if scale == "batch":
        adv = scale_advantages(shaped, "batch", eps, valid)
        if valid is not None:
            adv = torch.where(valid, adv, torch.zeros_like(adv))
    return AdvantageOutput(adv, shaped, values, lam)


def _single(
    rewards: torch.Tensor, transform: Transform, estimator: str
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
    """Rewards ``[..., G]`` as ``[N, G, 1]`` (a view when possible), lambda = 1 and the codes."""
    flat = rewards.reshape(-1, rewards.shape[-1], 1)
    codes, taus = transform_codes((transform,))
    return flat, _ones(rewards.device), codes, taus


def first_variation_triton(
    rewards: torch.Tensor, transform: Transform, estimator: str = "plugin"
) -> torch.Tensor:
    """Triton :func:`iama_kernels.first_variation` on ``[..., G]`` rewards: float32, centred."""
    flat, one, codes, taus = _single(rewards, transform, estimator)
    adv, _, _ = _group_advantages_op(flat, None, one, codes, taus, estimator, 0.0, 0, False)
    return adv.reshape(rewards.shape)


def group_values_triton(
    rewards: torch.Tensor, transform: Transform, estimator: str = "plugin"
) -> torch.Tensor:
    """Triton :func:`iama_kernels.group_values` on ``[..., G]`` rewards: float32 ``[...]``."""
    flat, one, codes, taus = _single(rewards, transform, estimator)
    _, _, values = _group_advantages_op(flat, None, one, codes, taus, estimator, 0.0, 0, True)
    return values.reshape(rewards.shape[:-1])


def _ones(device: torch.device) -> torch.Tensor:
    """``lambda = [1.0]`` on the device (cached; built in the graph while compiling)."""
    if torch.compiler.is_compiling():
        return torch.ones(1, dtype=torch.float32, device=device)
    key = ("ones", device)
    t = _LAMBDAS.get(key)
    if t is None:
        t = _LAMBDAS[key] = torch.ones(1, dtype=torch.float32, device=device)
    return t


__all__ = [
    "first_variation_triton",
    "group_advantages_triton",
    "group_values_triton",
]

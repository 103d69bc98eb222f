"""Oracles and tolerance helpers shared by the tests and the benchmarks.

Tolerances follow one rule: a backend's error against the float64 reference must stay within a
small multiple of the error that the same-dtype reference itself makes (plus a floor for outputs
that are exactly representable), so that a tolerance never has to be guessed.

The module also holds the independent oracles (subset enumeration, exact integration of the
empirical-CDF formula, lgamma-based weights, the policy loss in plain Python loops), a reward
generator with deliberate ties and constant groups, and :func:`reference_pair`, which gives the
``(float64 oracle, same-dtype reference)`` pair that :func:`assert_matches_reference` takes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` computed in float64 (0 for empty tensors)."""
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max(max |b|, tiny)``: relative to the scale of the oracle."""
    if not a.numel():
        return 0.0
    scale = max(float(b.double().abs().max()), torch.finfo(torch.float64).tiny)
    return max_abs_error(a, b) / scale


def assert_matches_reference(
    out: torch.Tensor,
    oracle64: torch.Tensor,
    same_dtype_ref: torch.Tensor | None = None,
    *,
    factor: float = 4.0,
    rel: float | None = None,
    atol: float = 0.0,
    name: str = "output",
) -> None:
    """Check a backend's output against the float64 oracle.

    Passes when ``|out - oracle64| <= factor * |same_dtype_ref - oracle64| + atol`` (max over
    elements) or, when ``rel`` is given, when the relative error is ``<= rel``. Shapes must match
    exactly and the output must be finite wherever the oracle is; empty outputs of equal shape
    match.
    """
    if out.shape != oracle64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != oracle {tuple(oracle64.shape)}")
    if out.numel() == 0:
        return
    finite = torch.isfinite(oracle64)
    if not bool(torch.isfinite(out.double())[finite].all()):
        raise AssertionError(f"{name}: non-finite values where the oracle is finite")
    err = max_abs_error(out, oracle64)
    bounds = []
    if same_dtype_ref is not None:
        bounds.append(factor * max_abs_error(same_dtype_ref, oracle64) + atol)
    if rel is not None:
        scale = max(float(oracle64.double().abs().max()), torch.finfo(torch.float64).tiny)
        bounds.append(rel * scale + atol)
    if not bounds:
        bounds.append(atol)
    if err > max(bounds):
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds the tolerance {max(bounds):.3e} "
            f"(oracle scale {float(oracle64.double().abs().max()):.3e})"
        )


# ---------------------------------------------------------------------------------------------
# Independent oracles. None of them uses the package's weight tables or sorted-difference
# formulas: they enumerate subsets, integrate the empirical CDF, or use lgamma-based weights, so
# an agreement with the reference is evidence and not a tautology. All work in float64 (or exact
# Python floats with math.fsum) and return float64 CPU tensors.
# ---------------------------------------------------------------------------------------------


def _floats(rewards_1d: torch.Tensor | Sequence[float]) -> list[float]:
    """A group's rewards as Python floats (float64), from a 1-D tensor or a sequence."""
    if isinstance(rewards_1d, torch.Tensor):
        if rewards_1d.dim() != 1:
            raise ValueError(f"rewards_1d must be 1-D, got shape {tuple(rewards_1d.shape)}")
        return [float(v) for v in rewards_1d.detach().double().cpu().tolist()]
    return [float(v) for v in rewards_1d]


def _centred(values: list[float]) -> torch.Tensor:
    mean = math.fsum(values) / len(values)
    return torch.tensor([v - mean for v in values], dtype=torch.float64)


def brute_force_unbiased(rewards_1d: torch.Tensor | Sequence[float], n: int) -> torch.Tensor:
    """Unbiased BestOfN(n) first variation of one group by enumerating subsets, centred.

    ``s_j = n * mean over all (n-1)-subsets S of the other G-1 samples of max(r_j, max S)``
    (``itertools.combinations``; for ``n = 1`` the only subset is empty and ``s_j = r_j``), then
    ``s - mean(s)``. Cost ``G * C(G-1, n-1)``: meant for G <= 10.

    Args:
        rewards_1d: ``[G]`` rewards (any float dtype; used as float64), ``G >= n``.
        n: the BestOfN ``n >= 1``.
    Returns:
        ``[G]`` float64, centred.
    """
    r = _floats(rewards_1d)
    G = len(r)
    if not 1 <= n <= G:
        raise ValueError(f"brute_force_unbiased needs 1 <= n <= G, got n={n}, G={G}")
    s = []
    for j in range(G):
        others = r[:j] + r[j + 1 :]
        maxima = [max((r[j], *subset)) for subset in itertools.combinations(others, n - 1)]
        s.append(n * math.fsum(maxima) / len(maxima))
    return _centred(s)


def unbiased_value(rewards_1d: torch.Tensor | Sequence[float], n: int) -> float:
    """Unbiased BestOfN(n) group value: the mean over all n-subsets of the group of their max.

    Enumerates ``itertools.combinations(G, n)``; meant for ``C(G, n)`` up to ~1e5.
    """
    r = _floats(rewards_1d)
    if not 1 <= n <= len(r):
        raise ValueError(f"unbiased_value needs 1 <= n <= G, got n={n}, G={len(r)}")
    maxima = [max(subset) for subset in itertools.combinations(r, n)]
    return math.fsum(maxima) / len(maxima)


def brute_force_plugin_value(rewards_1d: torch.Tensor | Sequence[float], n: int) -> float:
    """Plug-in BestOfN(n) group value: ``E[max of n draws with replacement]`` from the group's
    empirical distribution, by enumerating all ``G**n`` ordered draws (meant for ``G**n <= 1e5``).
    """
    r = _floats(rewards_1d)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(r) ** n > 200_000:
        raise ValueError(f"G**n = {len(r)}**{n} is too many draws to enumerate")
    maxima = [max(draw) for draw in itertools.product(r, repeat=n)]
    return math.fsum(maxima) / len(maxima)


def plugin_by_integration(rewards_1d: torch.Tensor | Sequence[float], n: int) -> torch.Tensor:
    """Plug-in BestOfN(n) first variation by integrating SPEC's formula exactly, centred.

    ``s(y) = -int_{r(y)}^{r_max} n C(t)^{n-1} dt`` with ``C(t) = #{i : r_i <= t} / G`` the
    empirical CDF of the group (the sample itself included). ``C`` is a step function that is
    constant between consecutive distinct rewards, so the integral is an exact sum over those
    intervals; ``C`` is evaluated by counting at each interval's midpoint (not from sorted
    positions), which keeps this independent of the reference's difference formula. Works for
    any ``n >= 1`` and G up to a few thousand.

    Returns:
        ``[G]`` float64, centred.
    """
    r = _floats(rewards_1d)
    G = len(r)
    if n < 1 or G < 1:
        raise ValueError(f"plugin_by_integration needs n >= 1 and G >= 1, got n={n}, G={G}")
    levels = sorted(set(r))
    # piece[i] = int over [levels[i], levels[i+1]) of n C(t)^(n-1) dt
    pieces = []
    for lo, hi in itertools.pairwise(levels):
        mid = 0.5 * (lo + hi)
        cdf = sum(1 for v in r if v <= mid) / G
        pieces.append(n * cdf ** (n - 1) * (hi - lo))
    # integral from levels[i] to the top = sum of pieces i..end (fsum: exact up to one rounding)
    from_level = {lv: -math.fsum(pieces[i:]) for i, lv in enumerate(levels)}
    return _centred([from_level[v] for v in r])


class LogspaceUnbiasedWeights(NamedTuple):
    """Weights of the unbiased BestOfN estimator computed through ``lgamma`` (see
    :func:`logspace_unbiased_weights`)."""

    others: torch.Tensor  # [G-1]: a_k = n C(k-1, n-2) / C(G-1, n-1), k = 1..G-1
    value: torch.Tensor  # [G]:   v_k = C(k-1, n-1) / C(G, n),       k = 1..G


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def logspace_unbiased_weights(G: int, n: int) -> LogspaceUnbiasedWeights:
    """The unbiased estimator's binomial weights in log space (float64, relative error ~1e-13
    at G = 1024), independent of the exact integer arithmetic of ``iama_kernels._weights``.

    ``others[k-1] = n C(k-1, n-2) / C(G-1, n-1)`` is the weight of the k-th smallest of the
    other G-1 rewards in the leave-one-out U-statistic (all 0 for ``n = 1``);
    ``value[k-1] = C(k-1, n-1) / C(G, n)`` is the weight of the k-th smallest reward in the
    group value. Binomials with ``b < 0`` or ``b > a`` are 0.
    """
    if not 1 <= n <= G:
        raise ValueError(f"logspace_unbiased_weights needs 1 <= n <= G, got G={G}, n={n}")
    others = [0.0] * (G - 1)
    if n >= 2:
        log_den = _log_comb(G - 1, n - 1)
        for k in range(n - 1, G):
            others[k - 1] = n * math.exp(_log_comb(k - 1, n - 2) - log_den)
    log_den = _log_comb(G, n)
    value = [math.exp(_log_comb(k - 1, n - 1) - log_den) if k >= n else 0.0 for k in range(1, G + 1)]
    return LogspaceUnbiasedWeights(torch.tensor(others, dtype=torch.float64),
                                   torch.tensor(value, dtype=torch.float64))


def logspace_unbiased_first_variation(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased BestOfN(n) first variation of groups ``[..., G]`` straight from SPEC's formula.

    ``s_j = sum_k others_k * max(r_j, r^{(-j)}_(k))`` with the lgamma weights of
    :func:`logspace_unbiased_weights`, evaluated as a dense ``[G, G-1]`` matrix of the other
    samples per sample (``O(G^2)`` memory and time per group; fine for G = 1024), then centred.
    No suffix sums, no tie handling: ties agree only up to rounding.

    Returns:
        ``[..., G]`` float64.
    """
    x = rewards.detach().double().cpu()
    G = x.shape[-1]
    flat = x.reshape(-1, G)
    if n == 1:
        out = flat.clone()
    else:
        a = logspace_unbiased_weights(G, n).others
        # column k of row j is the k-th smallest of the others: sorted[k] below j, sorted[k+1] from j.
        rows = torch.arange(G).unsqueeze(1)
        cols = torch.arange(G - 1).unsqueeze(0)
        take = cols + (cols >= rows).long()  # [G, G-1] index into the sorted group
        out = torch.empty_like(flat)
        for b in range(flat.shape[0]):
            xs, order = torch.sort(flat[b])
            others = xs[take]
            s_sorted = torch.maximum(xs.unsqueeze(1), others) @ a
            out[b, order] = s_sorted
    out = out - out.mean(-1, keepdim=True)
    return out.reshape(x.shape)


def logspace_unbiased_group_value(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased BestOfN(n) value ``sum_k v_k r_(k)`` of groups ``[..., G]`` with lgamma weights."""
    x = rewards.detach().double().cpu()
    v = logspace_unbiased_weights(x.shape[-1], n).value
    return (torch.sort(x, dim=-1).values * v).sum(-1)


def plugin_group_value_by_cdf(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Plug-in BestOfN(n) value of groups ``[..., G]``: ``E[max] = sum over distinct levels u of
    u * (C(u)^n - C(u-)^n)`` with the empirical CDF counted directly (float64)."""
    x = rewards.detach().double().cpu()
    G = x.shape[-1]
    flat = x.reshape(-1, G)
    out = torch.empty(flat.shape[0], dtype=torch.float64)
    for b in range(flat.shape[0]):
        r = flat[b].tolist()
        terms = []
        for u in sorted(set(r)):
            below = sum(1 for v in r if v < u) / G
            upto = sum(1 for v in r if v <= u) / G
            terms.append(u * (upto**n - below**n))
        out[b] = math.fsum(terms)
    return out.reshape(x.shape[:-1])


def soft_best_of_n_oracle(
    rewards_1d: torch.Tensor | Sequence[float], tau: float
) -> tuple[torch.Tensor, float]:
    """SoftBestOfN(tau) plug-in of one group from SPEC's formula, in Python float64.

    ``w_j = exp((r_j - max r) / tau)``, ``R_hat = sum w r / sum w``,
    ``s_j = (w_j / mean w) (r_j - R_hat)``, then centred. Weights are formed from the
    differences to the maximum, so any reward/tau ratio stays finite.

    Returns:
        ``(s [G] float64 centred, R_hat)``.
    """
    r = _floats(rewards_1d)
    top = max(r)
    # (r - top) / tau: both factors are Python floats, so no float32 underflow of tau.
    w = [1.0 if v == top else math.exp((v - top) / tau) for v in r]
    r_hat = math.fsum(wi * v for wi, v in zip(w, r, strict=True)) / math.fsum(w)
    mean_w = math.fsum(w) / len(w)
    return _centred([wi / mean_w * (v - r_hat) for wi, v in zip(w, r, strict=True)]), r_hat


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------


def random_rewards(
    B: int,
    G: int,
    *,
    ties: bool = True,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    m: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random group rewards ``[B, G]`` (or ``[B, G, m]``) that exercise ties and constant groups.

    With ``ties=False`` every entry is standard normal. With ``ties=True`` group ``b`` is of kind
    ``b % 4``:

    * 0: entries drawn from a pool of about G/2 normal values (ties at random values, anywhere
      in the sort order);
    * 1: a few levels on the grid ``k/4``, ``|k| <= 4`` (many ties, exact in every float dtype);
    * 2: binary ``{0, 1}`` (the pass@k setting);
    * 3: a constant group (all G entries equal).

    So any ``B >= 4`` contains every kind. Values are drawn in float64 and then cast, so ties
    survive the cast to any ``dtype``.
    """
    shape = (B, G) if m is None else (B, G, m)
    r = torch.randn(shape, generator=generator, dtype=torch.float64)
    if ties:
        for b in range(B):
            kind = b % 4
            if kind == 0:
                # G entries drawn from a pool of about G/2 normal values: ties at random values.
                pool = torch.randn((G // 2 + 1, *r.shape[2:]), generator=generator, dtype=torch.float64)
                idx = torch.randint(0, pool.shape[0], r[b].shape, generator=generator)
                r[b] = torch.gather(pool, 0, idx)
            elif kind == 1:
                r[b] = torch.randint(-4, 5, r[b].shape, generator=generator).double() / 4
            elif kind == 2:
                r[b] = torch.randint(0, 2, r[b].shape, generator=generator).double()
            elif kind == 3:
                r[b] = r[b, :1].clone().expand_as(r[b])
    return r.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Pairs (float64 oracle, same-dtype reference) for assert_matches_reference.
# ---------------------------------------------------------------------------------------------


def _to_float64(x: object) -> object:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        y = x.detach().to(torch.float64)
        return y.requires_grad_(x.requires_grad)
    return x


def reference_pair(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``(float64 oracle, same-dtype reference)`` outputs of a public op for one call.

    ``fn`` is a public function (``first_variation``, ``group_values``, ``group_advantages``,
    ``policy_loss``, ``nonlinear_grpo_loss``). Both calls use ``impl="reference"``; the oracle
    call gets every floating tensor argument cast to float64 (bool/integer tensors and
    non-tensors unchanged). Use as::

        oracle64, ref = reference_pair(first_variation, rewards, BestOfN(4), estimator="unbiased")
        assert_matches_reference(out, oracle64, ref)

    For NamedTuple outputs both elements are NamedTuples; compare field by field.
    """
    kwargs = dict(kwargs, impl="reference")
    with torch.no_grad():
        oracle = fn(*(_to_float64(a) for a in args), **{k: _to_float64(v) for k, v in kwargs.items()})
        same = fn(*args, **kwargs)
    return oracle, same


def reference_grad_pair(
    fn: Callable[..., Any], *args: Any, wrt: int | str = 0, **kwargs: Any
) -> tuple[tuple[Any, torch.Tensor], tuple[Any, torch.Tensor]]:
    """Like :func:`reference_pair` for a differentiable op: also the gradient of the op's scalar
    output (the first field of a NamedTuple output) with respect to argument ``wrt`` (a position
    in ``args`` or a keyword name).

    Returns:
        ``((out64, grad64), (out, grad))``; ``grad`` has the dtype of the argument.
    """
    kwargs = dict(kwargs, impl="reference")

    def run(cast: bool) -> tuple[Any, torch.Tensor]:
        a = [(_to_float64(x) if cast else x) for x in args]
        kw = {k: (_to_float64(v) if cast else v) for k, v in kwargs.items()}
        if isinstance(wrt, int):
            leaf = a[wrt].detach().clone().requires_grad_(True)
            a[wrt] = leaf
        else:
            leaf = kw[wrt].detach().clone().requires_grad_(True)
            kw[wrt] = leaf
        out = fn(*a, **kw)
        scalar = out[0] if isinstance(out, tuple) else out
        (grad,) = torch.autograd.grad(scalar, leaf)
        return out, grad

    return run(True), run(False)


# ---------------------------------------------------------------------------------------------
# Policy loss by hand.
# ---------------------------------------------------------------------------------------------


def ragged_rows(g: torch.Generator, S: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S]`` float64 advantages of both signs with a zero (row 0; every third row negative) and an
    ``[S, T]`` bool mask of ragged rows (lengths 1 to ``T``) with an empty one (row 1), drawn from
    ``g`` in that order: the rows the policy-loss tests build their cases on."""
    adv = torch.randn(S, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    adv[::3] = -adv[::3].abs()
    lengths = torch.randint(1, T + 1, (S,), generator=g)
    lengths[1] = 0
    return adv, torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


def policy_loss_and_grad(inp: dict[str, torch.Tensor], impl: str = "reference",
                         **kw: object) -> tuple[Any, torch.Tensor]:
    """:func:`iama_kernels.policy_loss` on a case ``{"logp", "old_logp", "ref_logp",
    "advantages", "mask"}`` and ``d loss / d logp`` (autograd, into a fresh leaf of ``logp``)."""
    from . import policy_loss  # (the package imports this module's users, not this module)

    logp = inp["logp"].clone().requires_grad_(True)
    out = policy_loss(logp, inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"], impl=impl, **kw)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return out, grad


def fused_and_separate(inp: dict[str, torch.Tensor], rewards: torch.Tensor, objective: Any, impl: str,
                       **kw: object) -> tuple[Any, Any]:
    """:func:`iama_kernels.nonlinear_grpo_loss` on a case (``{"logp", "old_logp", "ref_logp",
    "mask"}``, rows group-major) and ``rewards``, and :func:`iama_kernels.policy_loss` on the
    advantages it returns, with the same options: the one-pass op and its two steps."""
    from . import nonlinear_grpo_loss, policy_loss  # (the package imports this module's users)

    logp, old, ref, mask = inp["logp"], inp["old_logp"], inp["ref_logp"], inp["mask"]
    fused = nonlinear_grpo_loss(logp, old, ref, mask, rewards, objective, impl=impl, **kw)
    sep = policy_loss(logp, old, ref, fused.advantages.reshape(-1), mask, impl=impl, **kw)
    return fused, sep


def saturated_sapo_inputs(device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """float32 ``(logp, old_logp, advantages, mask)``, 2 x 8, where SAPO's gate saturates: in row 0
    log-ratios of 95 (a ratio past float32's range), in row 1 of -5 (with ``tau = 100`` the gate's
    exp overflows), the other tokens ordinary; both advantage signs. Every backend must give a
    finite loss and a 0 gradient on the saturated tokens."""
    logp = -torch.linspace(0.1, 2.0, 16).reshape(2, 8)
    old = logp - 0.1 * torch.linspace(-1, 1, 16).reshape(2, 8)
    old[0, :4] = logp[0, :4] - 95.0
    old[1, :4] = logp[1, :4] + 5.0
    mask = torch.ones(2, 8, dtype=torch.bool)
    return (logp.to(device), old.to(device), torch.tensor([0.7, -0.4], device=device), mask.to(device))


class LoopPolicyLoss(NamedTuple):
    """Result of :func:`policy_loss_by_loops` (float64 CPU tensors)."""

    loss: torch.Tensor  # []
    grad: torch.Tensor  # [S, T] d loss / d logp
    kl: torch.Tensor  # []
    clip_fraction: torch.Tensor  # []
    ratio_mean: torch.Tensor  # []
    log_ratio_mean: torch.Tensor  # []
    dual_clip_fraction: torch.Tensor  # []
    clip_high_fraction: torch.Tensor  # []
    sequence_log_ratio: torch.Tensor | None  # [S] with ratio_level="sequence", else None
    row_clip_weights: torch.Tensor  # [S, 3] each row's mask total, clipped and clipped-above weights


def policy_loss_by_loops(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    kl_weight: str = "none",
    dual_clip: float | None = None,
    ratio_level: str = "token",
    surrogate: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    kl_estimator: str = "k3",
) -> LoopPolicyLoss:
    """SPEC section 5 token by token in plain Python float64 loops: loss, gradient and metrics.

    The gradient is the SPEC's closed form ``-(rho A unless clipped) + beta (1 - exp(ref - logp))``
    times the token's aggregation weight (with ``kl_weight="ratio"`` the KL is ``rho * k3`` and its
    derivative ``rho (logp - ref)``); "clipped" is TRL's definition (``rho < 1 - eps_low`` with
    ``A < 0`` or ``rho > 1 + eps_high`` with ``A > 0``), which is also ``clip_fraction``. Tokens
    with mask 0 are skipped before their values are read. ``mask`` values are token weights.
    ``dual_clip`` ``c``: a token with ``A < 0`` and ``rho > c`` has surrogate ``c A`` and no
    surrogate gradient (dual-clip PPO, verl's ``clip_ratio_c``). ``ratio_level="sequence"``: every
    token of a row has GSPO's ratio ``exp`` of the row's mean ``logp - old`` over its tokens with a
    non-zero mask, and ``d rho / d logp_t = rho`` (GSPO-token's ``sg[s] pi_t / sg[pi_t]``).
    ``surrogate="cispo"``: the term ``c A logp`` with ``c = clip(rho)`` held constant (gradient
    ``c A``), clipped when ``rho`` is outside the range; ``"sapo"``: ``(4 / tau) sigma(tau (rho -
    1)) A`` with ``tau = tau_pos`` for ``A > 0`` else ``tau_neg`` (gradient ``4 sigma (1 - sigma)
    rho A``), never clipped; ``"vespo"``: ``phi A logp`` with ``phi = exp(lambda + k log w -
    lambda w)`` held constant (gradient ``phi A``; ``(k, lambda)`` the ``_pos`` pair for ``A >= 0``,
    ``log w`` the row's sum of its token log-ratios, each clamped to +-20, clamped to
    ``[log 1e-8, 20]``; a non-finite ``phi`` is 0), never clipped; the returned
    ``sequence_log_ratio`` holds the ``log w``. ``"dppo_tv"``/``"dppo_kl"``: ``c A logp`` with
    ``c = min(exp(clamp(logp - old, -20, 20)), dual_clip)`` held constant where DPPO's trust region
    holds the token (``p = exp(logp)``, ``q = exp(old)``; TV: ``p - q <= eps_high`` for ``A > 0``,
    ``p - q >= -eps_low`` otherwise; binary KL ``k = q (log q - log p) + (1 - q) log((1 - q +
    1e-8) / (1 - p + 1e-8))``: ``k <= eps_high or p <= q`` for ``A > 0``, ``k <= eps_low or
    p >= q`` otherwise) and 0 elsewhere; clipped where it is not held, dual-clipped where it is
    and the clamped ratio exceeds ``dual_clip``. ``"gmpo"``: every token's term is its row's
    ``G = exp(M) Abar`` (``M`` the mask-weighted mean of ``min(lr, eps_high)`` where ``A > 0``,
    ``max(lr, -eps_low)`` where ``A < 0``, 0 where ``A = 0``; ``Abar`` the mask-weighted mean
    advantage), gradient ``G`` where ``A != 0`` and the token is not clipped (``A > 0`` and ``lr >
    eps_high``, or ``A < 0`` and ``lr < -eps_low``), else 0; the metrics' ratio is ``exp(M)`` and
    ``sequence_log_ratio`` holds ``M``. ``kl_estimator`` (``x = logp - ref``): ``"k2"``
    ``x^2 / 2`` (derivative ``x``), ``"k1"`` ``x`` (1), ``"abs"`` ``|x|`` (``sign(x)``, 0 at 0);
    with ``"+"`` the derivative is ``x`` whatever the value.
    """
    lp = logp.detach().double().tolist()
    old = lp if old_logp is None else old_logp.detach().double().tolist()
    ref = None if ref_logp is None else ref_logp.detach().double().tolist()
    adv = advantages.detach().double().tolist()
    msk = mask.detach().double().tolist()
    S, T = len(lp), len(lp[0]) if lp else 0
    total = sum(math.fsum(row) for row in msk)
    length = T if max_completion_length is None else max_completion_length
    loss_terms, kl_terms, clip_terms, ratio_terms = [], [], [], []
    lratio_terms, dual_terms, high_terms = [], [], []
    grad = [[0.0] * T for _ in range(S)]
    row_log_ratios = []
    row_clips = []
    for s in range(S):
        row_total = math.fsum(msk[s])
        support = [t for t in range(T) if msk[s][t] != 0]
        row_log_ratio = (math.fsum(lp[s][t] - old[s][t] for t in support) / len(support)
                         if support else 0.0)
        if surrogate == "vespo":
            log_w = math.fsum(min(max(lp[s][t] - old[s][t], -20.0), 20.0) for t in support)
            row_log_ratio = min(max(log_w, math.log(1e-8)), 20.0)
        if surrogate == "gmpo":  # the row's mean sign-aware clipped log-ratio and objective
            row_adv = [adv[s][t] if isinstance(adv[s], list) else adv[s] for t in range(T)]
            bounded = []
            for t in support:
                lr, a = lp[s][t] - old[s][t], row_adv[t]
                bounded.append(msk[s][t] * (min(lr, eps_high) if a > 0 else
                                            (max(lr, -eps_low) if a < 0 else 0.0)))
            row_log_ratio = math.fsum(bounded) / row_total if row_total != 0 else 0.0
            if not isinstance(adv[s], list):
                mean_adv = adv[s]
            else:
                mean_adv = (math.fsum(msk[s][t] * row_adv[t] for t in support) / row_total
                            if row_total != 0 else 0.0)
            objective = math.exp(row_log_ratio) * mean_adv
        row_log_ratios.append(row_log_ratio)
        row_clip, row_high = [], []
        row_clips.append((row_total, row_clip, row_high))
        for t in range(T):
            w = msk[s][t]
            if w == 0:
                continue
            if loss_type == "grpo":
                agg = w / (S * max(1.0, row_total))
            elif loss_type == "token":
                agg = w / max(1.0, total)
            elif loss_type == "dr_grpo":
                agg = w / (S * length)
            else:
                raise ValueError(f"unknown loss_type {loss_type!r}")
            A = adv[s][t] if isinstance(adv[s], list) else adv[s]
            log_rho = row_log_ratio if ratio_level == "sequence" else lp[s][t] - old[s][t]
            if surrogate == "vespo":
                k, lam = ((vespo_k_pos, vespo_lambda_pos) if A >= 0 else (vespo_k_neg, vespo_lambda_neg))
                try:
                    phi = math.exp(lam + k * row_log_ratio - lam * math.exp(row_log_ratio))
                except OverflowError:
                    phi = 0.0
            rho = math.exp(log_rho)
            weight = min(max(rho, 1 - eps_low), 1 + eps_high)
            high = rho > 1 + eps_high and A > 0
            dual = False
            if surrogate == "gmpo":
                lr = lp[s][t] - old[s][t]
                high = A > 0 and lr > eps_high
                clipped = high or (A < 0 and lr < -eps_low)
                surr = objective
                d_surr = 0.0 if clipped or A == 0 else objective
                rho = math.exp(row_log_ratio)  # the metric's ratio; the KL keeps the token's below
            elif surrogate == "vespo":
                clipped = high = False
                surr, d_surr = phi * A * lp[s][t], phi * A
            elif surrogate in ("dppo_tv", "dppo_kl"):
                p, q = math.exp(lp[s][t]), math.exp(old[s][t])
                if surrogate == "dppo_tv":
                    held = p - q <= eps_high if A > 0 else p - q >= -eps_low
                else:
                    x = (1 - q + 1e-8) / (1 - p + 1e-8)  # torch's log: -inf at 0, NaN below (p > 1)
                    log_x = math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)
                    k = q * (old[s][t] - lp[s][t]) + (1 - q) * log_x
                    held = (k <= eps_high or p <= q) if A > 0 else (k <= eps_low or p >= q)
                rho_c = math.exp(min(max(lp[s][t] - old[s][t], -20.0), 20.0))
                cap = math.inf if dual_clip is None else dual_clip
                weight = min(rho_c, cap) if held else 0.0
                clipped, high, dual = not held, (not held) and A > 0, held and rho_c > cap
                surr, d_surr = weight * A * lp[s][t], weight * A
            elif surrogate == "cispo":
                clipped = rho < 1 - eps_low or rho > 1 + eps_high
                surr, d_surr = weight * A * lp[s][t], weight * A
            elif surrogate == "sapo":
                clipped = high = False
                tau = tau_pos if A > 0 else tau_neg
                sig = 1 / (1 + math.exp(-tau * (rho - 1)))
                surr, d_surr = 4 / tau * sig * A, 4 * sig * (1 - sig) * rho * A
            else:
                clipped = (rho < 1 - eps_low and A < 0) or high
                surr = min(rho * A, weight * A)
                dual = dual_clip is not None and A < 0 and rho > dual_clip
                if dual:
                    surr = dual_clip * A
                d_surr = 0.0 if clipped or dual else rho * A
            kl, dkl = 0.0, 0.0
            if ref is not None:
                d = ref[s][t] - lp[s][t]
                x = lp[s][t] - ref[s][t]
                base = kl_estimator.rstrip("+")
                if base == "k2":
                    kl, dkl = x * x / 2, x
                elif base == "k1":
                    kl, dkl = x, 1.0
                elif base == "abs":
                    kl, dkl = abs(x), (1.0 if x > 0 else (-1.0 if x < 0 else 0.0))
                else:
                    kl = math.exp(d) - d - 1
                    dkl = 1 - math.exp(d)
                if kl_estimator.endswith("+"):
                    dkl = x
                if kl_weight == "ratio":
                    token_rho = math.exp(log_rho)
                    kl, dkl = token_rho * kl, -token_rho * d
            loss_terms.append(agg * (beta * kl - surr))
            grad[s][t] = agg * (-d_surr + beta * dkl)
            kl_terms.append(w * kl)
            clip_terms.append(w * float(clipped))
            row_clip.append(w * float(clipped))
            row_high.append(w * float(high))
            ratio_terms.append(w * rho)
            lratio_terms.append(w * log_rho)
            dual_terms.append(w * float(dual))
            high_terms.append(w * float(high))
    tokens = max(1.0, total)

    def t64(v: object) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64)

    return LoopPolicyLoss(
        t64(math.fsum(loss_terms)),
        t64(grad).reshape(S, T),
        t64(math.fsum(kl_terms) / tokens),
        t64(math.fsum(clip_terms) / tokens),
        t64(math.fsum(ratio_terms) / tokens),
        t64(math.fsum(lratio_terms) / tokens),
        t64(math.fsum(dual_terms) / tokens),
        t64(math.fsum(high_terms) / tokens),
        t64(row_log_ratios) if ratio_level == "sequence" or surrogate in ("vespo", "gmpo") else None,
        t64([[total_s, math.fsum(c), math.fsum(h)] for total_s, c, h in row_clips]).reshape(S, 3),
    )

"""Cheap argument validation shared by every public function.

Errors name the argument and say what was expected; they are raised before any backend runs, so
every ``impl`` reports bad input identically.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .objectives import BestOfN, Objective

ESTIMATORS = ("plugin", "unbiased")
_data_checks = True


def set_data_checks(enabled: bool) -> None:
    """Turn the data-dependent checks on or off (default on).

    Shape, dtype, device and option checks always run. The data-dependent ones (rewards and
    advantages finite, enough valid samples per group for ``"unbiased"``) read values back to
    the host, which on a GPU waits for the device once per call; a trainer that has validated
    its rewards can turn them off. They are also skipped while ``torch.compile`` traces.
    """
    global _data_checks
    _data_checks = bool(enabled)


def data_checks_enabled() -> bool:
    return _data_checks and not torch.compiler.is_compiling()

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "token", "dr_grpo")
KL_WEIGHTS = ("none", "ratio")  # policy_loss: plain k3, or k3 weighted by the ratio (TRL bias correction)
# policy_loss's estimators of KL(pi || pi_ref), x = logp - ref: k3 = exp(-x) + x - 1 (TRL's and
# verl's "low_var_kl"), k2 = x^2 / 2 (verl's "mse"), k1 = x (verl's "kl"), |x| (verl's "abs");
# "+": that value with k2's gradient x (verl's straight-through "k3+")
KL_ESTIMATORS = ("k3", "k2", "k1", "abs", "k3+", "k1+", "abs+")
# -> iama::KlForm (csrc/include/iama/common.h): k3 0, ratio * k3 1, k2 2, k1 3, abs 4, + 8
_KL_FORMS = {"k3": 0, "k2": 2, "k1": 3, "abs": 4}
KL_STRAIGHT = 8
KL_RATIO_K3 = 1
RATIO_LEVELS = ("token", "sequence")  # policy_loss: per-token ratios, or GSPO's one per sequence
# policy_loss: PPO's clipped ratio, CISPO's clipped importance weight (MiniMax-M1), SAPO's soft gate,
# VESPO's gamma weight of the sequence ratio, DPPO's divergence masks (total variation, binary KL),
# GMPO's geometric mean of the clipped token ratios
SURROGATES = ("clip", "cispo", "sapo", "vespo", "dppo_tv", "dppo_kl", "gmpo")
# The surrogates with one value per row, computed by a pre-pass over its tokens and returned as the
# output's sequence_log_ratio: VESPO's log weight, GMPO's mean clipped log-ratio
ROW_SURROGATES = ("vespo", "gmpo")
# The surrogates for which dual_clip means something: the clipped one's dual clip, DPPO's weight cap
DUAL_CLIP_SURROGATES = ("clip", "dppo_tv", "dppo_kl")
# VESPO's (k_pos, lambda_pos, k_neg, lambda_neg): TRL's defaults
VESPO_DEFAULTS = (2.0, 3.0, 3.0, 2.0)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kl(kl_estimator: object, kl_weight: object) -> None:
    """``kl_estimator`` and ``kl_weight`` of the policy losses (TRL's ratio weighting is of k3
    alone)."""
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_choice("kl_weight", kl_weight, KL_WEIGHTS)
    if kl_weight == "ratio" and kl_estimator != "k3":
        raise ValueError(f"kl_weight='ratio' (TRL's bias-corrected k3) takes kl_estimator='k3', "
                         f"got {kl_estimator!r}")


def kl_form(kl_estimator: str, kl_weight: str) -> int:
    """The kernels' KL form code (``iama::KlForm``) of options already checked by :func:`check_kl`."""
    if kl_weight == "ratio":
        return KL_RATIO_K3
    straight = kl_estimator.endswith("+")
    return _KL_FORMS[kl_estimator.rstrip("+")] + (KL_STRAIGHT if straight else 0)


def check_dual_clip(dual_clip: object) -> float | None:
    """``dual_clip`` of the policy losses: ``None`` (off) or a finite float ``c > 1``."""
    if dual_clip is None:
        return None
    if isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float)):
        raise TypeError(f"dual_clip must be a float or None, got {type(dual_clip).__name__}")
    c = float(dual_clip)
    if not math.isfinite(c) or c <= 1:
        raise ValueError(f"dual_clip must be a finite float > 1 or None, got {dual_clip}")
    return c


def check_surrogate(surrogate: object, tau_pos: object, tau_neg: object,
                    dual_clip: float | None) -> tuple[float, float]:
    """``surrogate`` of the policy losses and SAPO's temperatures; returns them as floats.

    The temperatures are checked whatever the surrogate (a bad one is an error even where unused);
    the dual clip is the clipped surrogate's alone."""
    check_choice("surrogate", surrogate, SURROGATES)
    tau_pos = check_positive_float("tau_pos", tau_pos)
    tau_neg = check_positive_float("tau_neg", tau_neg)
    if dual_clip is not None and surrogate not in DUAL_CLIP_SURROGATES:
        raise ValueError(f"dual_clip applies to surrogate='clip' (and DPPO's weight cap) only, got "
                         f"surrogate={surrogate!r} with dual_clip={dual_clip}")
    return tau_pos, tau_neg


# The surrogates that take token-level ratios only, and why
_TOKEN_LEVEL_ONLY = {"vespo": "its weight is already one per sequence",
                     "dppo_tv": "its trust region is per token", "dppo_kl": "its trust region is per token",
                     "gmpo": "its ratio is already one per sequence"}


def check_ratio_level(ratio_level: object, surrogate: str) -> None:
    """``ratio_level`` of the policy losses, and that ``surrogate`` takes it (VESPO, DPPO and GMPO
    take token-level ratios only)."""
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    if ratio_level != "token" and surrogate in _TOKEN_LEVEL_ONLY:
        why = _TOKEN_LEVEL_ONLY[surrogate]
        raise ValueError(f"surrogate={surrogate!r} takes token-level ratios ({why}), got "
                         f"ratio_level={ratio_level!r}")


def check_vespo(k_pos: object, lambda_pos: object, k_neg: object, lambda_neg: object,
                prefix: str = "vespo_") -> tuple[float, float, float, float]:
    """VESPO's shape ``k`` (finite) and rate ``lambda`` (finite, ``> 0``) for ``A >= 0`` and
    ``A < 0``; returns ``(k_pos, lambda_pos, k_neg, lambda_neg)`` as floats. Checked whatever the
    surrogate, as the temperatures are. ``prefix``: of the argument names in the errors."""
    out = []
    for name, value, positive in (("k_pos", k_pos, False), ("lambda_pos", lambda_pos, True),
                                  ("k_neg", k_neg, False), ("lambda_neg", lambda_neg, True)):
        name = prefix + name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        v = float(value)
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{name} must be a finite float{' > 0' if positive else ''}, got {value}")
        out.append(v)
    return out[0], out[1], out[2], out[3]


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: object, *, allow_half: bool = True) -> torch.Tensor:
    t = check_tensor(name, t)
    allowed = FLOAT_DTYPES if allow_half else (torch.float32, torch.float64)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {t.dtype}")
    return t


def check_ndim(name: str, t: torch.Tensor, ndims: Sequence[int], shape_doc: str) -> None:
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise ValueError(
                f"{k} is on {v.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_finite_rewards(name: str, rewards: torch.Tensor, valid: torch.Tensor | None) -> None:
    """Rewards ``[B, G]`` or ``[B, G, m]``: NaN/inf among valid samples names the first group."""
    if valid is not None:
        rewards = torch.where(valid if rewards.dim() == 2 else valid.unsqueeze(-1), rewards, 0)
    # Fast path: one reduction. A NaN or inf element makes the sum non-finite, so a finite sum
    # proves every element finite; a non-finite sum (or an overflow) gets the exact search.
    if bool(torch.isfinite(rewards.sum())):
        return
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        where = f"group {idx[0]}, sample {idx[1]}" + (f", criterion {idx[2]}" if len(idx) > 2 else "")
        value = rewards[tuple(idx)].item()
        raise ValueError(f"{name} must be finite, got {value} at {where}")


def check_real(name: str, value: object, *, optional: bool = False) -> float | None:
    """A real number (not bool, not NaN; infinities allowed) as a float; ``None`` passes through
    when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def check_like_logp(logp: torch.Tensor, *, like: str = "logp", **tensors: torch.Tensor | None) -> None:
    """Every tensor given (``None`` skipped) has ``logp``'s shape and device (``like``: the name
    ``logp`` goes by in the messages)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if tuple(t.shape) != tuple(logp.shape):
            shape = tuple(logp.shape)
            raise ValueError(f"{name} must have the shape of {like} {shape}, got {tuple(t.shape)}")
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but {like} is on {logp.device}")


def check_positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return v


def check_group_sizes(objective: Objective, estimator: str, group_size: int | None) -> None:
    """``estimator='unbiased'`` needs at least n samples per group for every BestOfN(n)."""
    if estimator != "unbiased" or group_size is None:
        return
    for c in objective.criteria:
        if isinstance(c.transform, BestOfN) and group_size < c.transform.n:
            raise ValueError(
                f"estimator='unbiased' needs group size G >= n, but criterion {c.name!r} uses "
                f"{c.transform!r} with G={group_size}; use estimator='plugin' or a larger G"
            )

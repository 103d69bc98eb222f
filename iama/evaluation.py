"""Inference-time algorithms and the evaluation of a policy under them.

* :func:`best_of_n` and :func:`soft_best_of_n` are the inference-time algorithms themselves: they
  serve a policy by sampling ``n`` candidates per prompt and returning one.
* :func:`evaluate` (and the reusable :class:`Evaluator`) estimates what a user experiences,
  ``R_i[pi] = E_x E_{y ~ T_i[pi](.|x)} r_i(x, y)``, for every criterion under its own transform
  ``T_i``, from ``M`` samples per prompt: ``BestOfN(n)`` with the unbiased U-statistic
  ``sum_{k>=n} C(k-1, n-1)/C(M, n) r_(k)`` (exactly unbiased for ``E[max of n]`` when ``M >= n``),
  ``SoftBestOfN(tau)`` with the plug-in ratio ``sum w r / sum w`` (``w = e^{r/tau}``; consistent,
  biased at finite ``M``), ``Mean`` with the sample mean. Standard errors are over prompts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from iama_kernels import group_values
from iama_kernels._checks import ESTIMATORS, check_choice, check_group_sizes
from iama_kernels.objectives import Criterion, Objective, Transform, as_objective

from .rollout import Generator, RewardFn, Rollout, completion_lengths, score

__all__ = [
    "CriterionValue",
    "Evaluation",
    "Evaluator",
    "Selection",
    "best_of_n",
    "evaluate",
    "soft_best_of_n",
]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    return list(prompts)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_generator(generator: object) -> Generator:
    if not callable(getattr(generator, "generate", None)):
        raise TypeError(f"generator must have a generate(prompts, group_size, ...) method (see "
                        f"iama.rollout.Generator), got {type(generator).__name__}")
    return generator  # type: ignore[return-value]


def _as_reward_fns(reward_fns: object, objective: Objective) -> dict[str, RewardFn]:
    """``{criterion name: fn}`` from a mapping, a sequence in criterion order, or one callable."""
    if callable(reward_fns) and not isinstance(reward_fns, Mapping):
        reward_fns = [reward_fns]
    if isinstance(reward_fns, Mapping):
        fns = dict(reward_fns)
    elif isinstance(reward_fns, Sequence) and not isinstance(reward_fns, str):
        if len(reward_fns) != len(objective):
            raise ValueError(f"reward_fns has {len(reward_fns)} functions but the objective has "
                             f"{len(objective)} criteria ({', '.join(objective.names)})")
        fns = dict(zip(objective.names, reward_fns, strict=True))
    else:
        raise TypeError("reward_fns must be a callable, a list of callables in criterion order, or "
                        f"a mapping from criterion name to callable; got {type(reward_fns).__name__}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"reward_fns[{name!r}] must be callable, got {type(fn).__name__}")
    return fns


# --------------------------------------------------------------------------------------------
# The inference-time algorithms
# --------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What an inference-time algorithm served for ``B`` prompts.

    Attributes:
        completions: ``[B]`` the chosen completion of each prompt.
        rewards: ``[B]`` float32, its reward.
        index: ``[B]`` int64, which of the ``n`` candidates was chosen.
        candidate_rewards: ``[B, n]`` float32 rewards of all candidates.
        rollout: the ``B * n`` candidates (group-major).
    """

    completions: list[str]
    rewards: torch.Tensor
    index: torch.Tensor
    candidate_rewards: torch.Tensor
    rollout: Rollout

    @property
    def completion_ids(self) -> list[list[int]]:
        """``[B]`` token ids of the chosen completions (EOS included when sampled)."""
        ids = self.rollout.completion_token_lists()
        n = self.rollout.group_size
        return [ids[b * n + int(j)] for b, j in enumerate(self.index)]


def _candidates(
    generator: Generator,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    rng: torch.Generator | None,
) -> tuple[Rollout, torch.Tensor]:
    generator = _check_generator(generator)
    prompts = _check_prompts(prompts)
    n = _check_int("n", n, 1)
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
    rollout = generator.generate(prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, generator=rng)
    objective = Objective([Criterion("reward")])
    rewards = score(rollout, {"reward": reward_fn}, objective)[..., 0].cpu()  # [B, n]
    return rollout, rewards


def _select(rollout: Rollout, rewards: torch.Tensor, index: torch.Tensor) -> Selection:
    n = rollout.group_size
    chosen = torch.arange(rewards.shape[0]) * n + index
    return Selection(
        completions=[rollout.completions[int(i)] for i in chosen],
        rewards=rewards.gather(1, index.unsqueeze(1)).squeeze(1),
        index=index,
        candidate_rewards=rewards,
        rollout=rollout,
    )


def best_of_n(
    generator: Generator,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    rng: torch.Generator | None = None,
) -> Selection:
    """Best-of-n: sample ``n`` completions per prompt and serve the highest-reward one.

    Args:
        generator: the policy's sampler (an :class:`iama.rollout.Generator`).
        prompts: ``B`` prompt strings.
        reward_fn: ``fn(prompts, completions, ids) -> [N]`` float rewards.
        n: candidates per prompt, ``>= 1``.
        max_new_tokens, temperature, top_p: passed to ``generator.generate``.
        rng: a ``torch.Generator`` that seeds the sampling (reproducible runs).

    Returns:
        a :class:`Selection`; ties go to the first candidate with the top reward.
    """
    rollout, rewards = _candidates(generator, prompts, reward_fn, n, max_new_tokens, temperature, top_p, rng)
    # argmax returns the first maximal index on CPU, which makes ties deterministic.
    return _select(rollout, rewards, rewards.argmax(dim=1))


def soft_best_of_n(
    generator: Generator,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    n: int,
    tau: float,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    rng: torch.Generator | None = None,
) -> Selection:
    """Soft Best-of-n: sample ``n`` completions per prompt and serve candidate ``j`` with
    probability ``softmax(r / tau)_j``. As ``n -> infinity`` this samples from ``pi e^{r/tau} / Z``
    (the :class:`~iama_kernels.objectives.SoftBestOfN` transform); ``tau -> 0`` is Best-of-n.

    Args:
        tau: temperature, finite and ``> 0``; the other arguments as in :func:`best_of_n`
            (``rng`` also drives the choice).

    Returns:
        a :class:`Selection`.
    """
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite float > 0, got {tau!r}")
    rollout, rewards = _candidates(generator, prompts, reward_fn, n, max_new_tokens, temperature, top_p, rng)
    probs = torch.softmax(rewards.double() / float(tau), dim=1)  # float64: small tau stays accurate
    # Inverse-CDF sampling with one uniform per prompt drawn from rng (on whatever device it lives).
    device = rng.device if rng is not None else torch.device("cpu")
    u = torch.rand(probs.shape[0], 1, generator=rng, device=device, dtype=torch.float64).cpu()
    index = (torch.searchsorted(probs.cumsum(1), u, right=True).squeeze(1)).clamp(max=probs.shape[1] - 1)
    return _select(rollout, rewards, index)


# --------------------------------------------------------------------------------------------
# Evaluation of R_i under each criterion's own transform
# --------------------------------------------------------------------------------------------


@dataclass
class CriterionValue:
    """The estimate of one criterion's ``R_i``.

    Attributes:
        name: the criterion's name.
        transform: its inference-time transform.
        value: the mean over prompts of the per-prompt estimates.
        stderr: their standard error over prompts (``nan`` with a single prompt).
        per_prompt: ``[B]`` float64 per-prompt estimates.
    """

    name: str
    transform: Transform
    value: float
    stderr: float
    per_prompt: torch.Tensor


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes:
        criteria: ``{name: CriterionValue}`` in criterion order.
        objective_value: ``g(R_1, ..., R_m)`` at the estimated values.
        rewards: ``[B, M, m]`` float32 rewards of every sample.
        rollout: the ``B * M`` samples (group-major).
    """

    criteria: dict[str, CriterionValue]
    objective_value: float
    rewards: torch.Tensor
    rollout: Rollout = field(repr=False)

    @property
    def values(self) -> dict[str, float]:
        """``{criterion name: estimated R_i}``."""
        return {name: c.value for name, c in self.criteria.items()}

    @property
    def stderrs(self) -> dict[str, float]:
        """``{criterion name: standard error of R_i}``."""
        return {name: c.stderr for name, c in self.criteria.items()}

    @property
    def lengths(self) -> torch.Tensor:
        """``[B*M]`` int64 completion lengths in tokens (EOS included when sampled)."""
        return completion_lengths(self.rollout).cpu()


def criterion_values(
    rewards: torch.Tensor, objective: Objective | Transform | Criterion, *, estimator: str = "unbiased"
) -> dict[str, CriterionValue]:
    """Estimate every criterion's ``R_i`` from rewards ``[B, M, m]`` (or ``[B, M]`` for one).

    ``estimator`` applies to ``BestOfN`` criteria (``"unbiased"`` needs ``M >= n``); ``Mean`` is
    the sample mean and ``SoftBestOfN`` the plug-in ratio whatever ``estimator`` says.
    """
    objective = as_objective(objective)
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() == 2:
        rewards = rewards.unsqueeze(-1)
    if rewards.dim() != 3 or rewards.shape[-1] != len(objective) or 0 in rewards.shape:
        raise ValueError(f"rewards must have shape [B, M, {len(objective)}] (B, M >= 1), "
                         f"got {tuple(rewards.shape)}")
    check_choice("estimator", estimator, ESTIMATORS)
    check_group_sizes(objective, estimator, rewards.shape[1])
    B = rewards.shape[0]
    out: dict[str, CriterionValue] = {}
    for i, criterion in enumerate(objective.criteria):
        per_prompt = group_values(rewards[..., i].double(), criterion.transform, estimator=estimator)
        value = float(per_prompt.mean())
        stderr = float(per_prompt.std(correction=1) / math.sqrt(B)) if B > 1 else math.nan
        out[criterion.name] = CriterionValue(criterion.name, criterion.transform, value, stderr, per_prompt)
    return out


@dataclass
class Evaluator:
    """Estimates ``R_i[pi]`` for every criterion under its own transform (see the module docstring).

    Args:
        objective: the criteria (their names key ``reward_fns``) and the aggregator ``g``.
        reward_fns: ``{criterion name: fn}``, a list in criterion order, or one function for a
            one-criterion objective.
        samples: ``M``, samples per prompt (``>= n`` for every ``BestOfN(n)`` with the unbiased
            estimator).
        max_new_tokens, temperature, top_p: passed to ``generator.generate``.
        estimator: ``"unbiased"`` (default) or ``"plugin"``, for ``BestOfN`` criteria.
        prompts_per_batch: prompts per ``generate`` call (``None``: all at once).
    """

    objective: Objective | Transform | Criterion
    reward_fns: Mapping[str, RewardFn] | Sequence[RewardFn] | RewardFn
    samples: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    estimator: str = "unbiased"
    prompts_per_batch: int | None = None

    def __post_init__(self) -> None:
        self.objective = as_objective(self.objective)
        self.reward_fns = _as_reward_fns(self.reward_fns, self.objective)
        missing = [n for n in self.objective.names if n not in self.reward_fns]
        if missing:
            raise ValueError(f"reward_fns: no reward function for criterion {missing[0]!r} "
                             f"(criteria: {list(self.objective.names)})")
        self.samples = _check_int("samples", self.samples, 1)
        self.max_new_tokens = _check_int("max_new_tokens", self.max_new_tokens, 1)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_group_sizes(self.objective, self.estimator, self.samples)
        if self.prompts_per_batch is not None:
            self.prompts_per_batch = _check_int("prompts_per_batch", self.prompts_per_batch, 1)

    def __call__(
        self, generator: Generator, prompts: Sequence[str], *, rng: torch.Generator | None = None
    ) -> Evaluation:
        """Sample ``M`` completions for each prompt, score them, and estimate every ``R_i``."""
        generator = _check_generator(generator)
        prompts = _check_prompts(prompts)
        step = len(prompts) if self.prompts_per_batch is None else self.prompts_per_batch
        rollouts, rewards = [], []
        for start in range(0, len(prompts), step):
            rollout = generator.generate(prompts[start:start + step], self.samples,
                                         max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                         top_p=self.top_p, generator=rng)
            asked = len(prompts[start:start + step])
            if len(rollout.prompts) != asked * self.samples or rollout.group_size != self.samples:
                raise ValueError(f"generator returned {len(rollout.prompts)} rows in groups of "
                                 f"{rollout.group_size} for {asked} prompts x {self.samples} samples")
            rewards.append(score(rollout, self.reward_fns, self.objective).cpu())
            rollouts.append(rollout)
        all_rewards = torch.cat(rewards, 0)
        values = criterion_values(all_rewards, self.objective, estimator=self.estimator)
        R = torch.tensor([v.value for v in values.values()], dtype=torch.float64)
        return Evaluation(
            criteria=values,
            objective_value=float(self.objective.aggregate.value(R)),
            rewards=all_rewards,
            rollout=rollouts[0] if len(rollouts) == 1 else _concat(rollouts),
        )


def evaluate(
    generator: Generator,
    prompts: Sequence[str],
    objective: Objective | Transform | Criterion,
    reward_fns: Mapping[str, RewardFn] | Sequence[RewardFn] | RewardFn,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    estimator: str = "unbiased",
    prompts_per_batch: int | None = None,
    rng: torch.Generator | None = None,
) -> Evaluation:
    """One-shot :class:`Evaluator`: ``Evaluator(objective, reward_fns, ...)(generator, prompts)``."""
    evaluator = Evaluator(objective, reward_fns, samples, max_new_tokens, temperature, top_p, estimator,
                          prompts_per_batch)
    return evaluator(generator, prompts, rng=rng)


def _pad_cat(tensors: list[torch.Tensor], value: int | bool, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = t.new_full((t.shape[0], width - t.shape[1]), value)
        out.append(torch.cat([pad, t] if left else [t, pad], 1))
    return torch.cat(out, 0)


def _concat(rollouts: list[Rollout]) -> Rollout:
    """Rollouts of consecutive prompt batches as one (prompts left-padded, completions right-padded)."""
    first = rollouts[0]
    # Reuse the id the generator pads with (any id works: padded positions are masked out).
    padded = first.completion_ids[~first.completion_mask]
    pad = int(padded[0]) if padded.numel() else 0
    return Rollout(
        prompts=[p for r in rollouts for p in r.prompts],
        prompt_ids=_pad_cat([r.prompt_ids for r in rollouts], pad, left=True),
        prompt_mask=_pad_cat([r.prompt_mask for r in rollouts], False, left=True),
        completion_ids=_pad_cat([r.completion_ids for r in rollouts], pad, left=False),
        completion_mask=_pad_cat([r.completion_mask for r in rollouts], False, left=False),
        completions=[c for r in rollouts for c in r.completions],
        group_size=first.group_size,
    )

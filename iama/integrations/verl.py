"""verl's PPO trainer trained for an inference-aware objective: the ``"iama"`` advantage estimator.

verl turns each response's outcome reward into an advantage through a registered *advantage
estimator* (``algorithm.adv_estimator``: ``"grpo"``, ``"rloo"``, ...), grouping the responses of
one prompt by their ``uid``. This module gives verl an estimator whose advantages are the
non-linear GRPO advantages of a transform (``Mean()``, ``BestOfN(n)``, ``SoftBestOfN(tau)``):
the first variation of the reward *after* the inference-time algorithm, centred and scaled per
group. Everything else (rollout, reward managers, critic-free PPO) stays verl's; the actor's
PPO loss can run on iama's fused kernel through the ``"iama"`` policy loss of
:mod:`iama.integrations.verl_loss`.

With iama installed, ``import verl`` registers the estimator ``"iama"`` (through verl's
``verl.plugins`` entry points; with ``VERL_USE_EXTERNAL_PLUGINS=none`` set, add
``VERL_USE_EXTERNAL_MODULES=iama.integrations.verl_plugin`` instead). It reads its settings
from the ``iama`` section of verl's ``algorithm`` config, added on the command line::

    python -m verl.trainer.main_ppo algorithm.adv_estimator=iama \\
        +algorithm.iama.transform=best_of_n +algorithm.iama.n=4 ...

Keys of ``algorithm.iama`` (see :func:`settings_from_config`): ``transform`` (``mean``,
``best_of_n`` or ``soft_best_of_n``), ``n`` (best_of_n), ``tau`` (soft_best_of_n), and the
optional ``estimator`` (``plugin``), ``scale`` (``group``), ``eps`` (``1e-4``), ``impl``
(``auto``) of :func:`iama_kernels.group_advantages`. An estimator with fixed settings comes from
:func:`register` with a transform, called in a module that every verl process imports (named
in ``VERL_USE_EXTERNAL_MODULES``): verl's trainer computes advantages in a Ray actor, not in the
process that launched it. If verl answers ``Unknown advantage estimator simply: iama``, the
plugin failed to import (verl logs that only at debug level): ``python -c "import
iama.integrations.verl_plugin"`` shows why.

verl hands a custom estimator one scalar score per response (the sum of ``token_level_rewards``,
as its GRPO does), so the objective is one transform of that score. A group with a single
response has nothing to be compared with and gets advantage 0 (verl's GRPO gives it its score).

verl's validation reports the served quantity itself: with sampled validation responses
(``actor_rollout_ref.rollout.val_kwargs.n=8 ...val_kwargs.do_sample=True
...val_kwargs.temperature=1.0``) it logs ``best@N/mean`` for N up to ``n``, the Best-of-N
reward this estimator trains for.

The module imports verl only in :func:`register`; :class:`VerlAdvantageEstimator` runs on torch
alone. Tested with verl 0.9.1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from iama_kernels import BestOfN, Criterion, Mean, Objective, SoftBestOfN
from iama_kernels._checks import ESTIMATORS, SCALES, check_choice
from iama_kernels._dispatch import IMPLS
from iama_kernels.objectives import Transform

from .flat import indexed_group_advantages

ESTIMATOR_NAME = "iama"
CONFIG_SECTION = "iama"
_TRANSFORMS = {"mean": (Mean, ()), "best_of_n": (BestOfN, ("n",)),
               "soft_best_of_n": (SoftBestOfN, ("tau",))}
_OPTIONS = {"estimator": "plugin", "scale": "group", "eps": 1e-4, "impl": "auto"}
# The single criterion's name: verl gives one score per response, whatever its reward functions.
_SCORE = "score"


@dataclass(frozen=True)
class Settings:
    """What the estimator computes: the transform of the score and the options of the advantages."""

    transform: Transform
    estimator: str = "plugin"
    scale: str = "group"
    eps: float = 1e-4
    impl: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.transform, (Mean, BestOfN, SoftBestOfN)):
            raise TypeError(
                "verl gives an advantage estimator one score per response, so its objective is one "
                f"transform: Mean(), BestOfN(n) or SoftBestOfN(tau); got {self.transform!r}"
            )
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_choice("scale", self.scale, SCALES)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) \
                or not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        check_choice("impl", self.impl, IMPLS)

    @property
    def objective(self) -> Objective:
        return Objective([Criterion(_SCORE, self.transform)])


def settings_from_config(section: Mapping[str, Any]) -> Settings:
    """:class:`Settings` from verl's ``algorithm.iama`` mapping (a ``DictConfig`` or a dict).

    ``{"transform": "best_of_n", "n": 4}``, ``{"transform": "soft_best_of_n", "tau": 0.5}`` or
    ``{"transform": "mean"}``, with the optional ``estimator``, ``scale``, ``eps``, ``impl``.
    Raises ``ValueError`` naming the key for a missing, unknown or bad entry.
    """
    if not isinstance(section, Mapping):
        raise TypeError(f"algorithm.{CONFIG_SECTION} must be a mapping, got {type(section).__name__}")
    entries = {str(k): section[k] for k in section}
    name = entries.pop("transform", None)
    if name not in _TRANSFORMS:
        raise ValueError(f"algorithm.{CONFIG_SECTION}.transform must be one of "
                         f"{sorted(_TRANSFORMS)}, got {name!r}")
    cls, params = _TRANSFORMS[name]
    missing = [p for p in params if entries.get(p) is None]
    if missing:
        raise ValueError(f"algorithm.{CONFIG_SECTION}.{missing[0]} is needed for transform={name}")
    unknown = sorted(set(entries) - set(params) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in algorithm.{CONFIG_SECTION} for transform={name} "
                         f"(known: {sorted((*params, *_OPTIONS))})")
    try:
        transform = cls(*(entries.pop(p) for p in params))
    except (TypeError, ValueError) as error:
        raise ValueError(f"algorithm.{CONFIG_SECTION}: {error}") from None
    return Settings(transform,
                    **{k: entries.get(k, default) for k, default in _OPTIONS.items()})


class VerlAdvantageEstimator:
    """A verl advantage estimator: ``(token_level_rewards, response_mask, index, ..., config)``.

    With ``settings`` it always computes those; without, it reads them from ``config.iama`` on
    every call (verl passes its ``algorithm`` config), which is how the registered ``"iama"``
    estimator is configured from verl's command line.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise TypeError(f"settings must be Settings or None, got {type(settings).__name__}")
        self.settings = settings

    def __repr__(self) -> str:
        return f"VerlAdvantageEstimator({self.settings!r})"

    def __eq__(self, other: object) -> bool:
        # verl refuses to register a name twice with different estimators; equal settings are one.
        return isinstance(other, VerlAdvantageEstimator) and other.settings == self.settings

    def __hash__(self) -> int:
        return hash(self.settings)

    def resolve(self, config: Any = None) -> Settings:
        """The settings of a call: the fixed ones, or those of ``config.iama``."""
        section = None if config is None else config.get(CONFIG_SECTION, None)
        if self.settings is not None:
            if section is not None:
                raise ValueError(
                    f"this estimator has fixed settings ({self.settings.transform!r}) "
                    f"but the algorithm config also has an '{CONFIG_SECTION}' section; keep one"
                )
            return self.settings
        if section is None:
            raise ValueError(
                f"the '{ESTIMATOR_NAME}' advantage estimator reads its objective from "
                f"algorithm.{CONFIG_SECTION}, which is missing: add for example "
                f"+algorithm.{CONFIG_SECTION}.transform=best_of_n +algorithm.{CONFIG_SECTION}.n=4"
            )
        return settings_from_config(section)

    def __call__(
        self,
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: Any = None,
        epsilon: float = 1e-6,
        norm_adv_by_std_in_grpo: bool = True,
        config: Any = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """IAMA advantages broadcast over each response's tokens.

        Args:
            token_level_rewards: ``[bs, T]`` floating rewards; a response's score is their sum.
            response_mask: ``[bs, T]`` (bool, int or float) mask of the response tokens.
            index: ``[bs]`` group id of each response (verl's ``uid``: a numpy array of
                strings, or any sequence of hashable ids, or an integer tensor).
            epsilon, norm_adv_by_std_in_grpo: verl's GRPO options, not used: the scaling is the
                settings' ``scale`` and ``eps``.
            config: verl's ``algorithm`` config; its ``iama`` section holds the settings of the
                registered ``"iama"`` estimator.

        Returns:
            ``(advantages, returns)``, both the same ``[bs, T]`` tensor in the rewards' dtype:
            each response's advantage times its mask (verl's convention for outcome rewards).
        """
        settings = self.resolve(config)
        scores = _response_scores(token_level_rewards, response_mask)
        if index is None:
            raise ValueError("index (verl's uid of each response's prompt) is needed to group the "
                             "responses; it is missing from the batch")
        with torch.no_grad():
            advantages, _ = indexed_group_advantages(
                scores.unsqueeze(-1), index, settings.objective, [_SCORE],
                estimator=settings.estimator, scale=settings.scale, eps=float(settings.eps),
                impl=settings.impl,
            )
            # The mask converted in place, then scaled: the same values as ``adv[:, None] * mask``
            # (verl's own GRPO) without the slower mixed-dtype multiply.
            dtype = torch.promote_types(token_level_rewards.dtype, response_mask.dtype)
            out = torch.empty(response_mask.shape, dtype=dtype, device=response_mask.device)
            out.copy_(response_mask).mul_(advantages.to(dtype).unsqueeze(-1))
        return out, out


def _response_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[bs]`` scores, the sum of each response's token rewards, checked finite."""
    for name, t in (("token_level_rewards", token_level_rewards), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if token_level_rewards.ndim != 2:
        raise ValueError(f"token_level_rewards must be [bs, T], got shape {tuple(token_level_rewards.shape)}")
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, token_level_rewards "
                         f"{tuple(token_level_rewards.shape)}")
    if not token_level_rewards.is_floating_point():
        raise TypeError(f"token_level_rewards must be floating, got {token_level_rewards.dtype}")
    scores = token_level_rewards.sum(-1)
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"response {row} has a non-finite score ({float(scores[row])}); the "
                         "reward manager must give every response a finite reward")
    return scores


def advantage_estimator(
    transform: Transform | None = None,
    *,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    impl: str = "auto",
) -> VerlAdvantageEstimator:
    """A verl advantage estimator for ``transform``, or one that reads ``algorithm.iama`` when
    ``transform`` is None (then the other arguments must stay at their defaults)."""
    if transform is None:
        given = {"estimator": estimator, "scale": scale, "eps": eps, "impl": impl}
        changed = [k for k, v in given.items() if v != _OPTIONS[k]]
        if changed:
            raise ValueError(f"{changed} given without a transform: without one, every setting "
                             f"comes from algorithm.{CONFIG_SECTION}")
        return VerlAdvantageEstimator()
    return VerlAdvantageEstimator(Settings(transform, estimator, scale, eps, impl))


def register(name: str = ESTIMATOR_NAME, transform: Transform | None = None,
             **options: Any) -> VerlAdvantageEstimator:
    """Register an IAMA advantage estimator in verl's registry under ``name``.

    ``register()`` is what ``import verl`` runs through the plugin: the ``"iama"`` estimator
    configured by ``algorithm.iama``. ``register("iama_bo4", BestOfN(4))`` adds one with fixed
    settings (``options``: ``estimator``, ``scale``, ``eps``, ``impl``). Registering a name
    again with the same settings is a no-op; with others it is a ``ValueError``.
    """
    from verl.trainer.ppo import core_algos

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    fn = advantage_estimator(transform, **options)
    known = core_algos.ADV_ESTIMATOR_REGISTRY.get(name)
    if known is not None and known != fn:
        raise ValueError(f"verl already has an advantage estimator named {name!r} ({known!r}); "
                         "choose another name")
    core_algos.register_adv_est(name)(fn)
    return fn

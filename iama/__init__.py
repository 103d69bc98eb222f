"""iama: inference-aware meta-alignment through non-linear GRPO.

The objective vocabulary and the public ops are re-exported from :mod:`iama_kernels`. The
trainer, rollout, rewards, evaluation and theory names load on first use, so that ``import iama``
does not import transformers.
"""

import importlib

from iama_kernels import (
    AdvantageOutput,
    BestOfN,
    Criterion,
    Mean,
    Min,
    NonlinearGRPOOutput,
    Objective,
    PolicyLossOutput,
    SmoothMin,
    SoftBestOfN,
    WeightedSum,
    first_variation,
    group_advantages,
    group_values,
    nonlinear_grpo_loss,
    policy_loss,
)

__all__ = [
    "AdvantageOutput",
    "BestOfN",
    "Criterion",
    "Mean",
    "Min",
    "NonlinearGRPOOutput",
    "Objective",
    "PolicyLossOutput",
    "SmoothMin",
    "SoftBestOfN",
    "WeightedSum",
    "first_variation",
    "group_advantages",
    "group_values",
    "nonlinear_grpo_loss",
    "policy_loss",
]
__version__ = "0.1.0"

_LAZY = {
    "NonLinearGRPOTrainer": "iama.trainer",
    "TrainerConfig": "iama.trainer",
    "HFGenerator": "iama.rollout",
    "Rollout": "iama.rollout",
    "LengthReward": "iama.rewards",
    "RewardModel": "iama.rewards",
    "Evaluator": "iama.evaluation",
    "best_of_n": "iama.evaluation",
    "soft_best_of_n": "iama.evaluation",
    "mirror_descent": "iama.theory",
    "objective_value": "iama.theory",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'iama' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

"""iama: inference-aware meta-alignment through non-linear GRPO.

The objective vocabulary and the public ops are re-exported from :mod:`iama_kernels`.
"""

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

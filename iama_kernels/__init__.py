"""iama_kernels: fused kernels for non-linear GRPO, with a float64 PyTorch reference.

Public functions (each takes ``impl="auto" | "reference" | "cpu" | "cuda" | "triton"``):
:func:`first_variation`, :func:`group_values`, :func:`group_advantages`, :func:`policy_loss`,
:func:`nonlinear_grpo_loss`, :func:`sequence_log_ratio`, :func:`rollout_correction` (the
train/rollout correction's token weights), :func:`covariance_top_k` and :func:`covariance_band`
(KL-Cov's and Clip-Cov's token selections; and :func:`vespo_phi`, plain PyTorch). The
objective vocabulary lives in :mod:`iama_kernels.objectives`.
"""

from ._checks import set_data_checks
from ._types import AdvantageOutput, NonlinearGRPOOutput, PolicyLossOutput, RolloutCorrectionOutput
from .advantages.api import first_variation, group_advantages, group_values
from .nonlinear_grpo.api import nonlinear_grpo_loss
from .objectives import (
    BestOfN,
    Criterion,
    Mean,
    Min,
    Objective,
    SmoothMin,
    SoftBestOfN,
    WeightedSum,
)
from .policy_loss.api import policy_loss
from .policy_loss.covariance import covariance_band, covariance_top_k
from .policy_loss.rollout_correction import rollout_correction
from .policy_loss.sequence_log_ratio import sequence_log_ratio
from .policy_loss.vespo import vespo_phi

__all__ = [
    "AdvantageOutput",
    "BestOfN",
    "Criterion",
    "Mean",
    "Min",
    "NonlinearGRPOOutput",
    "Objective",
    "PolicyLossOutput",
    "RolloutCorrectionOutput",
    "SmoothMin",
    "SoftBestOfN",
    "WeightedSum",
    "covariance_band",
    "covariance_top_k",
    "first_variation",
    "group_advantages",
    "group_values",
    "nonlinear_grpo_loss",
    "policy_loss",
    "rollout_correction",
    "sequence_log_ratio",
    "set_data_checks",
    "vespo_phi",
]
__version__ = "0.1.0"

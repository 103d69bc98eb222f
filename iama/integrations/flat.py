"""IAMA advantages for a flat reward matrix: ``[N, m]`` rows in groups of ``G`` consecutive rows.

This is the layout TRL's ``GRPOTrainer`` (and most GRPO loops) keep: each prompt's ``G``
completions are consecutive rows, one column per reward function, in the trainer's own order
of reward functions, with NaN where a reward function gave no score. :func:`flat_group_advantages`
maps the columns onto an :class:`~iama_kernels.Objective`'s criteria by name and calls
:func:`iama_kernels.group_advantages`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from iama_kernels import AdvantageOutput, Objective, group_advantages


def criterion_columns(objective: Objective, column_names: Sequence[str]) -> list[int]:
    """The column of each criterion of ``objective``, matched by name.

    Every column must be a criterion and every criterion a column, so that no reward function is
    silently left out of the objective. Raises ``ValueError`` naming both sides otherwise.
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an iama Objective, got {type(objective).__name__}")
    names = [str(n) for n in column_names]
    if len(set(names)) != len(names):
        raise ValueError(f"reward function names must be distinct to match criteria by name, got {names}")
    criteria = list(objective.names)
    if sorted(criteria) != sorted(names):
        missing = [c for c in criteria if c not in names]
        extra = [n for n in names if n not in criteria]
        raise ValueError(
            "the objective's criteria must be named after the reward functions, one each: "
            f"reward functions {names}, criteria {criteria}"
            + (f"; criteria without a reward function: {missing}" if missing else "")
            + (f"; reward functions without a criterion: {extra}" if extra else "")
        )
    return [names.index(c) for c in criteria]


def flat_group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    objective: Objective,
    column_names: Sequence[str],
    *,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    impl: str = "auto",
) -> tuple[torch.Tensor, AdvantageOutput]:
    """Advantages of ``[N, m]`` rewards in groups of ``group_size`` consecutive rows.

    Args:
        rewards: ``[N, m]`` floating rewards, ``N`` a multiple of ``group_size``; column ``k`` is
            the reward function ``column_names[k]``. A row that is NaN in every column is a
            completion no reward function scored: it is left out of every statistic and gets
            advantage 0 (the ``valid`` mask of :func:`iama_kernels.group_advantages`). A row with
            NaN in only some columns is an error: the objective needs every criterion.
        group_size: ``G``, the completions per prompt.
        objective: one criterion per column, named after it (in any order).
        estimator, scale, eps, impl: as in :func:`iama_kernels.group_advantages`.

    Returns:
        ``(advantages [N], output)``: the advantages flattened back to the rows' order (float32
        for float32 rewards), and the :class:`~iama_kernels.AdvantageOutput` with ``[B, G]``
        tensors and the ``values``/``criterion_weights`` in the objective's criterion order.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, m], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n_rows, m = rewards.shape
    if len(column_names) != m:
        raise ValueError(f"column_names has {len(column_names)} names for {m} reward columns")
    if n_rows == 0 or n_rows % group_size:
        raise ValueError(f"rewards has {n_rows} rows, which is not a positive multiple of "
                         f"group_size={group_size}")
    columns = criterion_columns(objective, column_names)
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating, got {rewards.dtype}")
    nan = torch.isnan(rewards)
    unscored = nan.all(dim=1)
    partial = nan.any(dim=1) & ~unscored
    if bool(partial.any()):
        row = int(partial.nonzero()[0, 0])
        gaps = [column_names[k] for k in range(m) if bool(nan[row, k])]
        raise ValueError(
            f"row {row} has no score from {gaps} but has one from the other reward functions; "
            "the objective needs every criterion of a scored completion (return None from every "
            "reward function to leave a completion out)"
        )
    grouped = rewards[:, columns].reshape(n_rows // group_size, group_size, m)
    valid = None
    if bool(unscored.any()):
        valid = ~unscored.reshape(n_rows // group_size, group_size)
        grouped = torch.where(valid.unsqueeze(-1), grouped, torch.zeros_like(grouped))
    out = group_advantages(grouped, objective, estimator=estimator, scale=scale, eps=eps,
                           valid=valid, impl=impl)
    return out.advantages.reshape(n_rows), out

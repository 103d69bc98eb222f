"""IAMA advantages for a flat reward matrix: ``[N, m]`` rows, one column per reward function.

:func:`flat_group_advantages` takes the layout TRL's ``GRPOTrainer`` (and most GRPO loops)
keep: each prompt's ``G`` completions are consecutive rows, one column per reward function in
the trainer's own order, NaN where a reward function gave no score. :func:`indexed_group_advantages`
takes rows in any order with a group id per row (a prompt's uid, as verl keeps them), groups of
any sizes. Both map the columns onto an :class:`~iama_kernels.Objective`'s criteria by name and
call :func:`iama_kernels.group_advantages`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

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
    rewards = _check_matrix(rewards, column_names)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n_rows, m = rewards.shape
    if n_rows % group_size:
        raise ValueError(f"rewards has {n_rows} rows, which is not a multiple of "
                         f"group_size={group_size}")
    columns = criterion_columns(objective, column_names)
    unscored = _unscored_rows(rewards, column_names)
    grouped = rewards[:, columns].reshape(n_rows // group_size, group_size, m)
    valid = None
    if bool(unscored.any()):
        valid = ~unscored.reshape(n_rows // group_size, group_size)
        grouped = torch.where(valid.unsqueeze(-1), grouped, torch.zeros_like(grouped))
    out = group_advantages(grouped, objective, estimator=estimator, scale=scale, eps=eps,
                           valid=valid, impl=impl)
    return out.advantages.reshape(n_rows), out


def indexed_group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable],
    objective: Objective,
    column_names: Sequence[str],
    *,
    estimator: str = "plugin",
    scale: str = "group",
    eps: float = 1e-4,
    impl: str = "auto",
) -> tuple[torch.Tensor, AdvantageOutput]:
    """Advantages of ``[N, m]`` rewards whose rows belong to groups given by ``group_ids``.

    Rows may come in any order and groups may have different sizes: the groups are padded to the
    largest one and the padding is left out of every statistic (the ``valid`` mask of
    :func:`iama_kernels.group_advantages`). Groups are numbered in the order their first row
    appears, rows within a group keep their order; the result does not depend on the rows' order
    beyond that of the floating-point sums.

    Args:
        rewards: ``[N, m]`` floating rewards; NaN rows as in :func:`flat_group_advantages`.
        group_ids: ``[N]`` group of each row: an integer tensor, or a sequence of hashable ids
            (prompt uids as strings, a numpy array of them).
        objective, column_names, estimator, scale, eps, impl: as in
            :func:`flat_group_advantages`. ``"unbiased"`` needs every group to have at least
            ``n`` scored rows.

    Returns:
        ``(advantages [N], output)``: advantages in the rows' order and the
        :class:`~iama_kernels.AdvantageOutput` over ``[number of groups, largest group]``.
    """
    rewards = _check_matrix(rewards, column_names)
    n_rows, m = rewards.shape
    codes = _group_codes(group_ids, n_rows, rewards.device)
    columns = criterion_columns(objective, column_names)
    unscored = _unscored_rows(rewards, column_names)
    n_groups = int(codes.max()) + 1
    sizes = torch.bincount(codes, minlength=n_groups)
    order = torch.sort(codes, stable=True).indices  # rows grouped, each group in row order
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.empty_like(codes)
    slot[order] = torch.arange(n_rows, device=codes.device) - starts[codes[order]]
    width = int(sizes.max())
    grouped = rewards.new_zeros(n_groups, width, m)
    valid = torch.zeros(n_groups, width, dtype=torch.bool, device=rewards.device)
    grouped[codes, slot] = torch.where(unscored.unsqueeze(1), 0.0, rewards[:, columns])
    valid[codes, slot] = ~unscored
    out = group_advantages(grouped, objective, estimator=estimator, scale=scale, eps=eps,
                           valid=None if bool(valid.all()) else valid, impl=impl)
    return out.advantages[codes, slot], out


def _check_matrix(rewards: torch.Tensor, column_names: Sequence[str]) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, m], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating, got {rewards.dtype}")
    if rewards.shape[0] == 0:
        raise ValueError("rewards has no rows")
    if len(column_names) != rewards.shape[1]:
        raise ValueError(f"column_names has {len(column_names)} names for {rewards.shape[1]} "
                         "reward columns")
    return rewards


def _group_codes(group_ids: torch.Tensor | Sequence[Hashable], n_rows: int,
                 device: torch.device) -> torch.Tensor:
    """Dense group numbers ``[N]`` (int64, on ``device``) in order of first appearance."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        if tuple(group_ids.shape) != (n_rows,):
            raise ValueError(f"group_ids must have one id per row ([{n_rows}]), got shape "
                             f"{tuple(group_ids.shape)}")
        return _tensor_group_codes(group_ids.to(device))
    if isinstance(group_ids, (str, bytes)) or not hasattr(group_ids, "__len__"):
        raise TypeError(f"group_ids must be a tensor or a sequence of ids, got {type(group_ids).__name__}")
    ids = list(group_ids)
    if len(ids) != n_rows:
        raise ValueError(f"group_ids must have one id per row ([{n_rows}]), got {len(ids)} ids")
    first: dict[Hashable, int] = {}
    try:
        codes = [first.setdefault(i, len(first)) for i in ids]
    except TypeError as error:
        raise TypeError(f"group_ids must be hashable ids: {error}") from None
    return torch.tensor(codes, dtype=torch.int64, device=device)


def _tensor_group_codes(ids: torch.Tensor) -> torch.Tensor:
    """:func:`_group_codes` of an integer tensor on its own device (no copy to the host): the
    sorted unique ids renumbered by the row where each first appears."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((unique.shape[0],), ids.shape[0], dtype=torch.int64, device=ids.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    number = torch.empty_like(first)
    number[torch.argsort(first)] = torch.arange(unique.shape[0], device=ids.device)
    return number[inverse]


def _unscored_rows(rewards: torch.Tensor, column_names: Sequence[str]) -> torch.Tensor:
    """``[N]`` bool: rows NaN in every column. A row NaN in only some columns is an error."""
    nan = torch.isnan(rewards)
    unscored = nan.all(dim=1)
    partial = nan.any(dim=1) & ~unscored
    if bool(partial.any()):
        row = int(partial.nonzero()[0, 0])
        gaps = [column_names[k] for k in range(rewards.shape[1]) if bool(nan[row, k])]
        raise ValueError(
            f"row {row} has no score from {gaps} but has one from the other reward functions; "
            "the objective needs every criterion of a scored completion (return None from every "
            "reward function to leave a completion out)"
        )
    return unscored

"""iama.integrations.flat: advantages of a flat [N, m] reward matrix, columns matched by name."""

from __future__ import annotations

import pytest
import torch

from iama.integrations.flat import criterion_columns, flat_group_advantages, indexed_group_advantages
from iama_kernels import BestOfN, Criterion, Mean, Objective, SoftBestOfN, WeightedSum, group_advantages

OBJECTIVE = Objective([Criterion("short", BestOfN(3)), Criterion("long", SoftBestOfN(0.5))])


def _rewards(n_groups: int, group: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (n_groups * group, m), generator=g).to(torch.float64) / 4


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_columns_in_another_order_are_matched_by_name(scale: str) -> None:
    rewards = _rewards(5, 7, 2)  # columns: long, short (reverse of the criteria)
    flat, out = flat_group_advantages(rewards, 7, OBJECTIVE, ["long", "short"], scale=scale,
                                      impl="reference")
    grouped = rewards[:, [1, 0]].reshape(5, 7, 2)
    expected = group_advantages(grouped, OBJECTIVE, scale=scale, impl="reference")
    torch.testing.assert_close(flat, expected.advantages.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(out.criterion_weights, expected.criterion_weights, rtol=0, atol=0)
    # Swapping the columns without the names changes the result: the match is not positional.
    swapped, _ = flat_group_advantages(rewards, 7, OBJECTIVE, ["short", "long"], scale=scale,
                                       impl="reference")
    assert not torch.equal(swapped, flat)


def test_rows_no_reward_function_scored_are_left_out() -> None:
    rewards = _rewards(4, 5, 2, seed=1)
    rewards[[3, 11, 12], :] = float("nan")
    flat, _ = flat_group_advantages(rewards, 5, OBJECTIVE, ["short", "long"], impl="reference")
    valid = ~torch.isnan(rewards).all(1).reshape(4, 5)
    expected = group_advantages(torch.nan_to_num(rewards).reshape(4, 5, 2), OBJECTIVE, valid=valid,
                                impl="reference")
    torch.testing.assert_close(flat, expected.advantages.reshape(-1), rtol=0, atol=0)
    assert torch.isfinite(flat).all()
    assert (flat[[3, 11, 12]] == 0).all()


def test_mean_criteria_give_the_weighted_sum_grpo_advantage() -> None:
    """Mean criteria under WeightedSum(w): (sum_k w_k r_k - group mean) / (group std + eps)."""
    rewards = _rewards(6, 8, 2, seed=2)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    objective = Objective([Criterion("a", Mean()), Criterion("b", Mean())], WeightedSum(w.tolist()))
    flat, _ = flat_group_advantages(rewards, 8, objective, ["a", "b"], impl="reference")
    combined = (rewards * w).sum(1).reshape(6, 8)
    expected = (combined - combined.mean(1, keepdim=True)) / (combined.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(flat, expected.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["auto", "cpu"])
def test_float32_matches_the_float64_reference(impl: str) -> None:
    rewards = _rewards(9, 6, 2, seed=3)
    flat32, _ = flat_group_advantages(rewards.float(), 6, OBJECTIVE, ["short", "long"], impl=impl)
    flat64, _ = flat_group_advantages(rewards, 6, OBJECTIVE, ["short", "long"], impl="reference")
    assert flat32.dtype == torch.float32
    torch.testing.assert_close(flat32.double(), flat64, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument() -> None:
    rewards = _rewards(2, 4, 2)
    names = ["short", "long"]
    with pytest.raises(ValueError, match=r"no score from \['long'\]"):
        bad = rewards.clone()
        bad[5, 1] = float("nan")
        flat_group_advantages(bad, 4, OBJECTIVE, names)
    with pytest.raises(ValueError, match="reward functions without a criterion: \\['extra'\\]"):
        criterion_columns(OBJECTIVE, ["short", "long", "extra"])
    with pytest.raises(ValueError, match="criteria without a reward function: \\['long'\\]"):
        criterion_columns(OBJECTIVE, ["short", "length"])
    with pytest.raises(ValueError, match="distinct"):
        criterion_columns(OBJECTIVE, ["short", "short"])
    with pytest.raises(TypeError, match="objective"):
        criterion_columns(BestOfN(2), names)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        flat_group_advantages(rewards, 3, OBJECTIVE, names)
    with pytest.raises(ValueError, match="group_size"):
        flat_group_advantages(rewards, 0, OBJECTIVE, names)
    with pytest.raises(ValueError, match=r"\[N, m\]"):
        flat_group_advantages(rewards[:, 0], 4, OBJECTIVE, names)
    with pytest.raises(ValueError, match="column_names has 1 names for 2"):
        flat_group_advantages(rewards, 4, OBJECTIVE, ["short"])
    with pytest.raises(TypeError, match="floating"):
        flat_group_advantages(rewards.long(), 4, OBJECTIVE, names)
    with pytest.raises(TypeError, match=r"rewards must be a torch\.Tensor"):
        flat_group_advantages(rewards.tolist(), 4, OBJECTIVE, names)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="G >= n"):  # BestOfN(3) with groups of 2
        flat_group_advantages(rewards, 2, OBJECTIVE, names, estimator="unbiased")


def _shuffled(rewards: torch.Tensor, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(rewards.shape[0], generator=torch.Generator().manual_seed(seed))
    ids = torch.arange(rewards.shape[0]) // group
    return perm, ids[perm]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_indexed_groups_in_any_row_order(scale: str) -> None:
    """Rows shuffled, groups given by id: the advantages of the contiguous layout, row for row."""
    rewards = _rewards(6, 5, 2, seed=4)
    contiguous, _ = flat_group_advantages(rewards, 5, OBJECTIVE, ["short", "long"], scale=scale,
                                          impl="reference")
    perm, ids = _shuffled(rewards, 5, seed=5)
    indexed, out = indexed_group_advantages(rewards[perm], ids * 7 + 3, OBJECTIVE,
                                            ["short", "long"], scale=scale, impl="reference")
    assert out.advantages.shape == (6, 5)
    torch.testing.assert_close(indexed, contiguous[perm], rtol=1e-12, atol=1e-12)
    # String ids (prompt uids) give the same groups.
    uids = [f"uid-{int(i)}" for i in ids]
    by_uid, _ = indexed_group_advantages(rewards[perm], uids, OBJECTIVE, ["short", "long"],
                                         scale=scale, impl="reference")
    torch.testing.assert_close(by_uid, indexed, rtol=0, atol=0)


def test_indexed_groups_of_different_sizes() -> None:
    """Ragged groups: each group's advantages as if it were alone (constant lambda: WeightedSum)."""
    objective = Objective([Criterion("short", BestOfN(2)), Criterion("long", SoftBestOfN(1.0))],
                          WeightedSum([0.3, 0.7]))
    sizes = [3, 7, 2, 5]
    rewards = _rewards(1, sum(sizes), 2, seed=6)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    perm, _ = _shuffled(rewards, 1, seed=7)
    indexed, out = indexed_group_advantages(rewards[perm], ids[perm], objective, ["short", "long"],
                                            impl="reference")
    assert out.advantages.shape == (4, 7)
    start = 0
    expected = torch.empty(sum(sizes), dtype=torch.float64)
    for size in sizes:
        alone = group_advantages(rewards[start:start + size].unsqueeze(0), objective,
                                 impl="reference")
        expected[start:start + size] = alone.advantages[0]
        start += size
    torch.testing.assert_close(indexed, expected[perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["auto", "cpu"])
def test_indexed_float32_with_unscored_rows(impl: str) -> None:
    rewards = _rewards(5, 6, 2, seed=8)
    rewards[[0, 7, 8, 29]] = float("nan")
    perm, ids = _shuffled(rewards, 6, seed=9)
    flat64, _ = flat_group_advantages(rewards, 6, OBJECTIVE, ["short", "long"], impl="reference")
    indexed32, _ = indexed_group_advantages(rewards[perm].float(), ids, OBJECTIVE,
                                            ["short", "long"], impl=impl)
    assert indexed32.dtype == torch.float32 and torch.isfinite(indexed32).all()
    torch.testing.assert_close(indexed32.double(), flat64[perm], rtol=1e-5, atol=1e-5)


def test_indexed_bad_group_ids() -> None:
    rewards = _rewards(2, 3, 2)
    names = ["short", "long"]
    with pytest.raises(ValueError, match=r"one id per row \(\[6\]\), got shape \(5,\)"):
        indexed_group_advantages(rewards, torch.zeros(5, dtype=torch.long), OBJECTIVE, names)
    with pytest.raises(ValueError, match=r"one id per row \(\[6\]\), got shape \(6, 1\)"):
        indexed_group_advantages(rewards, torch.zeros(6, 1, dtype=torch.long), OBJECTIVE, names)
    with pytest.raises(ValueError, match=r"one id per row \(\[6\]\), got 5 ids"):
        indexed_group_advantages(rewards, [0] * 5, OBJECTIVE, names)
    with pytest.raises(TypeError, match="integer tensor"):
        indexed_group_advantages(rewards, torch.zeros(6), OBJECTIVE, names)
    with pytest.raises(TypeError, match="hashable"):
        indexed_group_advantages(rewards, [[0]] * 6, OBJECTIVE, names)
    with pytest.raises(TypeError, match="sequence of ids"):
        indexed_group_advantages(rewards, "abcdef", OBJECTIVE, names)
    with pytest.raises(ValueError, match="at least n=3 valid samples per group, but group 1 has 2"):
        indexed_group_advantages(rewards, [0, 0, 0, 1, 1, 2], OBJECTIVE, names, estimator="unbiased")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_integer_tensor_ids_are_numbered_on_their_device_by_first_appearance(dtype) -> None:
    """The tensor path (no copy to the host) numbers groups as the Python path does."""
    from iama.integrations.flat import _group_codes

    g = torch.Generator().manual_seed(11)
    pool = torch.tensor([-7, 0, 3, 1000, -2**14, 2**14 - 1, 42], dtype=dtype)
    ids = pool[torch.randint(0, len(pool), (50,), generator=g)]
    codes = _group_codes(ids, 50, torch.device("cpu"))
    assert codes.dtype == torch.int64
    torch.testing.assert_close(codes, _group_codes(ids.tolist(), 50, torch.device("cpu")), rtol=0, atol=0)
    assert codes[0] == 0 and int(codes.max()) + 1 == len(ids.unique())
    rewards = _rewards(1, 50, 2, seed=12)
    by_tensor, _ = indexed_group_advantages(rewards, ids, OBJECTIVE, ["short", "long"], impl="reference")
    by_list, _ = indexed_group_advantages(rewards, ids.tolist(), OBJECTIVE, ["short", "long"],
                                          impl="reference")
    torch.testing.assert_close(by_tensor, by_list, rtol=0, atol=0)

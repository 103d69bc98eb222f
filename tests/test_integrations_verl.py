"""iama.integrations.verl: the "iama" advantage estimator, alone and inside verl 0.9's own code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iama.integrations.verl import (
    Settings,
    VerlAdvantageEstimator,
    advantage_estimator,
    register,
    settings_from_config,
)
from iama_kernels import BestOfN, Mean, SoftBestOfN
from iama_kernels.advantages.reference import group_advantages_ref

# Importing verl's trainer reports the engines it lacks here (Megatron, ...) and a Ray deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning",
                                        "ignore:Ray state API:DeprecationWarning")

TRANSFORMS = [Mean(), BestOfN(1), BestOfN(3), SoftBestOfN(0.5)]


def _batch(sizes: list[int], length: int = 6, seed: int = 0, dtype=torch.float32):
    """verl-like inputs: groups of ``sizes`` responses in shuffled order, uids as numpy strings.

    Each response's reward sits on its last response token (verl's reward managers), except some
    rows that spread it over two tokens; responses have 1 to ``length`` tokens. Rewards are on a
    coarse grid, so groups have ties.
    """
    g = torch.Generator().manual_seed(seed)
    group_of = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    perm = torch.randperm(len(group_of), generator=g)
    group_of = group_of[perm]
    bs = len(group_of)
    lengths = torch.randint(1, length + 1, (bs,), generator=g)
    mask = (torch.arange(length) < lengths.unsqueeze(1)).to(torch.int64)
    scores = torch.randint(0, 5, (bs,), generator=g).to(torch.float64) / 4
    token = torch.zeros(bs, length, dtype=torch.float64)
    token[torch.arange(bs), lengths - 1] = scores
    split = (lengths > 1) & (torch.arange(bs) % 3 == 0)
    token[split, lengths[split] - 1] = scores[split] - 0.125
    token[split, 0] += 0.125
    uid = np.array([f"prompt-{int(k)}" for k in group_of], dtype=object)
    return token.to(dtype), mask, uid, group_of, scores


def _expected(scores: torch.Tensor, group_of: torch.Tensor, transform, **options) -> torch.Tensor:
    """Per-row advantages from the float64 reference, one group at a time in row order."""
    out = torch.zeros_like(scores)
    objective = Settings(transform).objective
    for k in group_of.unique():
        rows = (group_of == k).nonzero().squeeze(1)
        if len(rows) < 2:
            continue  # a group of one is centred to 0
        ref = group_advantages_ref(scores[rows].view(1, -1, 1), objective, **options)
        out[rows] = ref.advantages[0]
    return out


@pytest.mark.parametrize("transform", TRANSFORMS, ids=repr)
@pytest.mark.parametrize("scale", ["group", "none"])
def test_matches_the_float64_reference_in_shuffled_groups(transform, scale: str) -> None:
    token, mask, uid, group_of, scores = _batch([8, 8, 8, 8, 8])
    fn = advantage_estimator(transform, scale=scale)
    advantages, returns = fn(token, mask, uid)
    assert advantages is returns and advantages.dtype == torch.float32
    expected = _expected(scores, group_of, transform, scale=scale, eps=1e-4)
    torch.testing.assert_close(advantages, (expected.unsqueeze(1) * mask).float(), rtol=1e-5, atol=1e-6)
    assert (advantages[mask == 0] == 0).all()


def test_groups_of_different_sizes_and_a_group_of_one() -> None:
    token, mask, uid, group_of, scores = _batch([5, 1, 3, 8], dtype=torch.float64)
    fn = advantage_estimator(BestOfN(2), scale="batch", impl="reference")
    advantages, _ = fn(token, mask, list(uid))
    # The batch std is over every sample of the padded groups: compare through the same path with
    # explicit padding, group by group in the order the uids first appear.
    first = list(dict.fromkeys(group_of.tolist()))
    width = 8
    grouped = torch.zeros(len(first), width, 1, dtype=torch.float64)
    valid = torch.zeros(len(first), width, dtype=torch.bool)
    where = {}
    for slot_g, k in enumerate(first):
        rows = (group_of == k).nonzero().squeeze(1)
        grouped[slot_g, : len(rows), 0] = scores[rows]
        valid[slot_g, : len(rows)] = True
        where[k] = (slot_g, rows)
    ref = group_advantages_ref(grouped, Settings(BestOfN(2)).objective, "plugin", "batch", 1e-4,
                               valid=valid)
    expected = torch.zeros_like(scores)
    for slot_g, rows in where.values():
        expected[rows] = ref.advantages[slot_g, : len(rows)]
    torch.testing.assert_close(advantages, expected.unsqueeze(1) * mask, rtol=1e-12, atol=1e-12)
    singleton = (group_of == 1).nonzero().squeeze(1)
    assert (advantages[singleton] == 0).all()


def test_group_ids_as_an_integer_tensor_give_the_same_advantages() -> None:
    token, mask, uid, group_of, _ = _batch([4, 4, 4], seed=3)
    fn = advantage_estimator(SoftBestOfN(0.3))
    by_uid, _ = fn(token, mask, uid)
    by_int, _ = fn(token, mask, group_of * 7 + 1)
    torch.testing.assert_close(by_uid, by_int, rtol=0, atol=0)


def test_config_section_is_read_on_every_call() -> None:
    token, mask, uid, group_of, scores = _batch([6, 6, 6], seed=4)
    fn = advantage_estimator()
    for section in ({"transform": "best_of_n", "n": 4}, {"transform": "soft_best_of_n", "tau": 2},
                    {"transform": "mean", "scale": "none", "eps": 0.0, "impl": "reference"}):
        got, _ = fn(token, mask, uid, config={"iama": section})
        settings = settings_from_config(section)
        fixed, _ = VerlAdvantageEstimator(settings)(token, mask, uid)
        torch.testing.assert_close(got, fixed, rtol=0, atol=0)
    expected = _expected(scores, group_of, Mean(), scale="none", eps=0.0)
    torch.testing.assert_close(got, (expected.unsqueeze(1) * mask).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("section", "message"), [
    ({"n": 4}, "transform must be one of"),
    ({"transform": "best_of"}, "transform must be one of"),
    ({"transform": "best_of_n"}, r"algorithm.iama.n is needed"),
    ({"transform": "soft_best_of_n", "tau": None}, r"algorithm.iama.tau is needed"),
    ({"transform": "best_of_n", "n": 4, "tau": 1.0}, r"unknown key\(s\) \['tau'\]"),
    ({"transform": "mean", "estimatr": "plugin"}, r"unknown key\(s\) \['estimatr'\]"),
    ({"transform": "best_of_n", "n": 0}, "n must be >= 1"),
    ({"transform": "best_of_n", "n": 2.5}, "n must be an integer"),
    ({"transform": "soft_best_of_n", "tau": -1}, "tau must be finite and > 0"),
    ({"transform": "mean", "scale": "std"}, "scale must be one of"),
    ({"transform": "mean", "estimator": "exact"}, "estimator must be one of"),
    ({"transform": "mean", "eps": -1e-4}, "eps must be a finite number >= 0"),
    ({"transform": "mean", "impl": "gpu"}, "impl must be one of"),
])
def test_bad_config_sections_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from_config(section)


def test_bad_inputs_raise_clear_errors() -> None:
    token, mask, uid, _, _ = _batch([4, 4])
    fn = advantage_estimator(BestOfN(2))
    with pytest.raises(ValueError, match="index"):
        fn(token, mask)
    with pytest.raises(ValueError, match="response_mask has shape"):
        fn(token, mask[:, :-1], uid)
    with pytest.raises(ValueError, match=r"token_level_rewards must be \[bs, T\]"):
        fn(token[:, 0], mask[:, 0], uid)
    with pytest.raises(TypeError, match="token_level_rewards must be floating"):
        fn(token.long(), mask, uid)
    with pytest.raises(TypeError, match=r"response_mask must be a torch\.Tensor"):
        fn(token, mask.numpy(), uid)
    with pytest.raises(ValueError, match="one id per row"):
        fn(token, mask, uid[:-1])
    bad = token.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(ValueError, match="response 5 has a non-finite score"):
        fn(bad, mask, uid)
    with pytest.raises(ValueError, match="has fixed settings"):
        fn(token, mask, uid, config={"iama": {"transform": "mean"}})
    with pytest.raises(ValueError, match=r"algorithm.iama, which is missing"):
        advantage_estimator()(token, mask, uid, config={"adv_estimator": "iama"})
    with pytest.raises(ValueError, match="given without a transform"):
        advantage_estimator(scale="batch")
    with pytest.raises(TypeError, match="one transform"):
        advantage_estimator("best_of_n")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="impl="):
        advantage_estimator(BestOfN(2), impl="cuda")(token, mask, uid)


def test_estimators_with_equal_settings_are_equal() -> None:
    assert advantage_estimator(BestOfN(4)) == advantage_estimator(BestOfN(4))
    assert advantage_estimator(BestOfN(4)) != advantage_estimator(BestOfN(4), scale="none")
    assert advantage_estimator() == advantage_estimator()
    assert hash(advantage_estimator(Mean())) == hash(advantage_estimator(Mean()))


# --- inside verl ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verl_algos():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    return core_algos


def test_import_verl_registers_the_iama_estimator(verl_algos) -> None:
    fn = verl_algos.get_adv_estimator_fn("iama")
    assert isinstance(fn, VerlAdvantageEstimator) and fn.settings is None


def test_register_fixed_settings_and_refuse_a_taken_name(verl_algos) -> None:
    fn = register("iama_test_bo2", BestOfN(2), scale="none")
    assert verl_algos.get_adv_estimator_fn("iama_test_bo2") is fn
    assert register("iama_test_bo2", BestOfN(2), scale="none") == fn  # same settings: a no-op
    with pytest.raises(ValueError, match="already has an advantage estimator named 'iama_test_bo2'"):
        register("iama_test_bo2", BestOfN(3))
    with pytest.raises(ValueError, match="already has an advantage estimator named 'grpo'"):
        register("grpo", BestOfN(3))


def test_verl_compute_advantage_runs_the_configured_estimator(verl_algos) -> None:
    """verl's own ``compute_advantage`` with ``adv_estimator="iama"`` and ``algorithm.iama``."""
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    token, mask, uid, group_of, scores = _batch([8, 8, 8, 8], seed=5)
    data = DataProto.from_dict(tensors={"token_level_rewards": token, "response_mask": mask},
                               non_tensors={"uid": uid})
    algorithm = OmegaConf.create({"adv_estimator": "iama", "gamma": 1.0, "lam": 1.0,
                                  "iama": {"transform": "best_of_n", "n": 4}})
    out = compute_advantage(data, adv_estimator=algorithm.adv_estimator, config=algorithm,
                            num_repeat=8)
    expected = _expected(scores, group_of, BestOfN(4), scale="group", eps=1e-4)
    torch.testing.assert_close(out.batch["advantages"], (expected.unsqueeze(1) * mask).float(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.batch["returns"], out.batch["advantages"], rtol=0, atol=0)


def test_mean_is_verl_grpo(verl_algos) -> None:
    """Mean(), group scale and verl's epsilon give verl's own GRPO advantages (groups of >= 2)."""
    token, mask, uid, _, _ = _batch([6, 6, 6, 6, 6], seed=6)
    ours, _ = advantage_estimator(Mean(), eps=1e-6)(token, mask, uid)
    theirs, _ = verl_algos.compute_grpo_outcome_advantage(token, mask, uid, epsilon=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # BestOfN(4) is not GRPO: the test can tell them apart.
    bon, _ = advantage_estimator(BestOfN(4), eps=1e-6)(token, mask, uid)
    assert (bon - theirs).abs().max() > 0.1


@pytest.mark.parametrize(("env", "registered"), [
    ({"VERL_USE_EXTERNAL_PLUGINS": "none"}, False),  # the entry point is what registers it...
    ({"VERL_USE_EXTERNAL_PLUGINS": "none",            # ...or verl's external-module variable
      "VERL_USE_EXTERNAL_MODULES": "iama.integrations.verl_plugin"}, True),
    ({"VERL_USE_EXTERNAL_PLUGINS": "iama"}, True),
], ids=["plugins-off", "external-module", "plugin-by-name"])
def test_a_fresh_verl_process_finds_the_estimator(verl_algos, env: dict, registered: bool) -> None:
    import os
    import subprocess
    import sys

    code = ("import verl.trainer.ppo.core_algos as c; "
            "print(type(c.ADV_ESTIMATOR_REGISTRY.get('iama')).__name__, "
            "type(c.POLICY_LOSS_REGISTRY.get('iama')).__name__)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    want = ["VerlAdvantageEstimator", "VerlPolicyLoss"] if registered else ["NoneType", "NoneType"]
    assert done.stdout.split()[-2:] == want


def test_the_estimator_benchmark_runs(verl_algos, capsys, benchmark_script) -> None:
    """benchmarks/verl_estimators.py at a tiny size (it checks iama's Mean against verl's GRPO)."""
    module = benchmark_script("verl_estimators")
    assert module.main(["--shapes", "5x4x4,2x7x9", "--rounds", "3", "--no-write"]) == 0
    table = capsys.readouterr().out
    assert table.count("iama BestOfN(4) unbiased") == 4  # two progress lines and two table rows

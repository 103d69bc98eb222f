"""iama.integrations.trl: TRL's GRPOTrainer with IAMA advantages, on the tiny model.

Each test trains for one step (two prompts, four completions each, up to six tokens): TRL's own
generation, reward and loss code runs; only the advantages are iama's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from iama.integrations.flat import flat_group_advantages  # noqa: E402
from iama.integrations.trl import IAMAGRPOTrainer  # noqa: E402
from iama.rewards import LengthReward  # noqa: E402
from iama.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from iama_kernels import (  # noqa: E402
    BestOfN,
    Criterion,
    Mean,
    Min,
    Objective,
    SoftBestOfN,
    WeightedSum,
    policy_loss,
    vespo_phi,
)

GROUP = 4
PROMPTS = ["tell a story about the cat", "tell a story about the sun"]


def short(prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
    return LengthReward(2, 2)(prompts, completions, completion_ids).tolist()


def long(prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
    return LengthReward(6, 3)(prompts, completions, completion_ids).tolist()


def _config(tmp_path: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=1, seed=0, data_seed=0, max_steps=1,
        per_device_train_batch_size=len(PROMPTS) * GROUP, num_generations=GROUP,
        steps_per_generation=1, gradient_accumulation_steps=1, max_completion_length=6,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-2, beta=0.0, loss_type="grpo",
        scale_rewards="group",
    )
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def _train(trainer_cls: type, tmp_path: Path, config_overrides: dict | None = None,
           **kwargs: Any) -> Any:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, max_positions=64)
    trainer = trainer_cls(
        model=model, reward_funcs=[short, long], args=_config(tmp_path, **(config_overrides or {})),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    return trainer


def _logged(trainer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [N, 2] in TRL's column order short, long; advantages [N]) of the last step."""
    logs = trainer._logs
    rewards = torch.tensor([list(logs["rewards"]["short"]), list(logs["rewards"]["long"])],
                           dtype=torch.float64).T
    return rewards, torch.tensor(list(logs["advantages"]), dtype=torch.float64)


def test_mean_criteria_reproduce_trl_advantages(tmp_path: Path) -> None:
    """WeightedSum(w) of Mean criteria is TRL's own rule with reward_weights=w."""
    w = [0.25, 0.75]
    plain = _train(trl.GRPOTrainer, tmp_path / "trl", {"reward_weights": w})
    objective = Objective([Criterion("long", Mean()), Criterion("short", Mean())],
                          WeightedSum(w[::-1]))
    ours = _train(IAMAGRPOTrainer, tmp_path / "iama", objective=objective)
    trl_rewards, trl_adv = _logged(plain)
    rewards, adv = _logged(ours)
    torch.testing.assert_close(rewards, trl_rewards, rtol=0, atol=0)  # same completions
    assert rewards.shape == (len(PROMPTS) * GROUP, 2)
    assert trl_adv.abs().max() > 0.1  # the groups are not all ties: the comparison has content
    torch.testing.assert_close(adv, trl_adv, rtol=1e-5, atol=1e-5)


def test_best_of_n_advantages_reach_the_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objective = Objective([Criterion("short", BestOfN(2)), Criterion("long", SoftBestOfN(0.5))])
    seen: list[torch.Tensor] = []
    compute_loss = trl.GRPOTrainer._compute_loss

    def spy(self: Any, model: Any, inputs: dict) -> torch.Tensor:
        seen.append(inputs["advantages"].detach().clone())
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", spy)
    trainer = _train(IAMAGRPOTrainer, tmp_path, objective=objective)
    rewards, adv = _logged(trainer)
    expected, out = flat_group_advantages(rewards, GROUP, objective, ["short", "long"],
                                          impl="reference")
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)
    # The loss saw the same advantages (TRL may shuffle the rows within the generation batch).
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].double().sort().values, expected.sort().values,
                               rtol=1e-5, atol=1e-5)
    history = trainer.state.log_history[0]
    for i, name in enumerate(objective.names):
        assert history[f"iama/lambda/{name}"] == pytest.approx(float(out.criterion_weights[i]),
                                                               rel=1e-5)
        assert history[f"iama/value/{name}"] == pytest.approx(float(out.values[:, i].mean()),
                                                              rel=1e-5)


def test_settings_that_contradict_the_objective_are_refused(tmp_path: Path) -> None:
    objective = Objective([Criterion("short", BestOfN(8)), Criterion("long", Mean())])
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, max_positions=64)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})

    def make(objective: Any = objective, **overrides: Any) -> Any:
        kwargs = {k: overrides.pop(k) for k in ("estimator", "advantage_impl") if k in overrides}
        return IAMAGRPOTrainer(model=model, reward_funcs=[short, long],
                               args=_config(tmp_path, **overrides), train_dataset=dataset,
                               processing_class=tokenizer, objective=objective, **kwargs)

    with pytest.raises(ValueError, match="reward_weights"):
        make(reward_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        make(multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match=r"unbiased.*num_generations >= .* \(8\), got 4"):
        make(estimator="unbiased")
    with pytest.raises(ValueError, match="criteria without a reward function: \\['length'\\]"):
        make(Objective([Criterion("short", Mean()), Criterion("length", Mean())]))
    with pytest.raises(TypeError, match="objective must be an iama Objective"):
        make(BestOfN(2))
    with pytest.raises(ValueError, match="estimator"):
        make(estimator="exact")
    assert make().objective is objective  # the plug-in estimator takes n > G


def test_a_trl_that_skips_the_reward_hook_is_an_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """If TRL stops calling _calculate_rewards, the trainer must fail, not train on TRL's rule."""
    original = trl.GRPOTrainer._generate_and_score_completions

    def without_hook(self: Any, inputs: list) -> dict:
        calculate = type(self)._calculate_rewards
        type(self)._calculate_rewards = trl.GRPOTrainer._calculate_rewards
        try:
            return original(self, inputs)
        finally:
            type(self)._calculate_rewards = calculate

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", without_hook)
    objective = Objective([Criterion("short", BestOfN(2)), Criterion("long", Mean())])
    with pytest.raises(RuntimeError, match=r"without calling GRPOTrainer\._calculate_rewards"):
        _train(IAMAGRPOTrainer, tmp_path, objective=objective)


CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
SEQUENCE_CLIP_METRICS = ("clip_ratio/low_min", "clip_ratio/high_max")  # extremes over sequences
LOSS_METRICS = ("kl", "entropy", *CLIP_METRICS, *SEQUENCE_CLIP_METRICS, "cispo_clip_ratio",
                "vespo/phi_seq_mean", "policy_loss", "entropy_coef")
BONUS_METRICS = {"policy_loss", "entropy_coef"}  # with an entropy bonus (entropy_coef at each optimizer step)


def _expected_metrics(loss_type: str, beta: float) -> set[str]:
    """The metrics TRL logs for a loss type (and iama with it)."""
    clip = {"cispo": {"cispo_clip_ratio"}, "sapo": set(), "vespo": {"vespo/phi_seq_mean"}}.get(
        loss_type, {*CLIP_METRICS, *SEQUENCE_CLIP_METRICS})
    return {"entropy", *clip, *(("kl",) if beta else ())}


class _BothLosses(IAMAGRPOTrainer):
    """Computes iama's loss and TRL's on the same inputs at every step; trains on iama's."""

    records: list[dict[str, Any]]
    token_advantages = False  # give both losses per-token advantages [S, T] (TRL takes them too)
    # vLLM's importance sampling mode to stand in for: both losses read the same ratios, made up here
    # (without vLLM there are no sampling log-probs to compute them from), with zeros for the mask modes
    vllm_is: str | None = None

    def _compute_loss(self, model: Any, inputs: dict) -> torch.Tensor:
        if self.token_advantages:
            T = inputs["completion_ids"].shape[1]
            factor = 1 + 0.5 * torch.sin(torch.arange(T, dtype=torch.float32))
            inputs = dict(inputs, advantages=inputs["advantages"][:, None] * factor)
        if self.vllm_is is not None:
            S, T = inputs["completion_ids"].shape
            g = torch.Generator().manual_seed(len(self.records))
            width = 1 if self.vllm_is.startswith("sequence") else T
            ratio = torch.exp(0.4 * torch.randn(S, width, generator=g))
            if self.vllm_is.endswith("mask"):
                ratio = torch.where((ratio > 0.6) & (ratio < 1.6), ratio, 0.0)
            inputs = dict(inputs, importance_sampling_ratio=ratio)
            self.use_vllm, self.vllm_importance_sampling_correction = True, True
            self.vllm_importance_sampling_mode = self.vllm_is
        params = [p for p in model.parameters() if p.requires_grad]
        metrics = self._metrics["train"]
        before = {k: len(metrics[k]) for k in LOSS_METRICS}
        # the adaptive entropy controller's state: each loss starts from the same and updates it once
        names = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")
        state = [getattr(self, name) for name in names]
        ours = super()._compute_loss(model, inputs)
        ours_grad = torch.autograd.grad(ours, params, retain_graph=True)
        ours_metrics = {k: metrics[k][-1] for k in LOSS_METRICS if len(metrics[k]) > before[k]}
        ours_state = [getattr(self, name) for name in names]
        for name, value in zip(names, state, strict=True):
            setattr(self, name, value)
        impl, self.loss_impl = self.loss_impl, None
        before = {k: len(metrics[k]) for k in LOSS_METRICS}
        try:
            theirs = super()._compute_loss(model, inputs)
        finally:
            self.loss_impl = impl
        theirs_metrics = {k: metrics[k][-1] for k in LOSS_METRICS if len(metrics[k]) > before[k]}
        theirs_state = [getattr(self, name) for name in names]
        theirs_grad = torch.autograd.grad(theirs, params)
        self.records.append({
            "loss": (ours.detach(), theirs.detach()),
            "grad": (torch.cat([g.flatten() for g in ours_grad]),
                     torch.cat([g.flatten() for g in theirs_grad])),
            "metrics": (ours_metrics, theirs_metrics),  # what each call logged
            "old": inputs.get("old_per_token_logps") is not None,
            "padded": bool((inputs["completion_mask"] == 0).any()),
            "entropy_state": (ours_state, theirs_state),
        })
        self.use_vllm = False  # the next generation runs without vLLM again
        return ours


@pytest.mark.parametrize(
    ("loss_type", "beta", "accumulation", "steps_per_generation", "corrected", "delta"), [
    ("grpo", 0.0, 1, 1, False, None), ("grpo", 0.1, 2, 2, False, None), ("bnpo", 0.0, 2, 2, False, None),
    ("dr_grpo", 0.1, 1, 1, False, None), ("dapo", 0.0, 1, 1, False, None), ("dapo", 0.1, 2, 2, False, None),
    ("dapo", 0.0, 2, 1, False, None),
    # TRL's default use_bias_correction_kl=True: the KL term is rho * k3
    ("grpo", 0.1, 2, 2, True, None), ("bnpo", 0.1, 1, 1, True, None), ("dr_grpo", 0.1, 1, 1, True, None),
    ("dapo", 0.1, 2, 1, True, None),
    # TRL's two-sided clip (INTELLECT-2's delta), the kernel's dual clip; at or below 1 + epsilon_high
    # the kernel's upper clip bound for A > 0 and a dual clip at 1 + epsilon_high for A < 0
    ("dapo", 0.1, 2, 2, True, 1.25), ("dapo", 0.1, 2, 2, True, 1.1), ("grpo", 0.0, 2, 2, False, 1.2)])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_iama_loss_equals_trl_loss(tmp_path: Path, loss_type: str, beta: float, accumulation: int,
                                   steps_per_generation: int, corrected: bool, delta: float | None,
                                   impl: str, level: str = "token", **extra: Any) -> None:
    """Loss, gradient and metrics of loss_impl against TRL's own, over two optimizer steps of
    ``accumulation`` micro-batches each. Every generation is used for ``num_iterations``
    micro-batches spanning both steps, so the second step's ratio is not 1. TRL's normalisers
    divide by the accumulation steps, and DAPO's by the generation batch's share of one step;
    with ``use_bias_correction_kl`` TRL weights the KL by the ratio."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = build_tiny_tokenizer()
    model_dir = tmp_path / "tiny"  # TRL builds the reference model (beta > 0) from a path
    build_tiny_model(tokenizer, seed=0, max_positions=64).save_pretrained(model_dir)
    objective = Objective([Criterion("short", BestOfN(2)), Criterion("long", Mean())])
    _BothLosses.records = []
    config = _config(tmp_path, max_steps=2, loss_type=loss_type, beta=beta, delta=delta,
                     importance_sampling_level=level,
                     use_bias_correction_kl=corrected, learning_rate=5e-2, max_completion_length=12,
                     per_device_train_batch_size=len(PROMPTS) * GROUP // accumulation,
                     gradient_accumulation_steps=accumulation,
                     steps_per_generation=steps_per_generation,
                     num_iterations=2 * accumulation // steps_per_generation, **extra)
    trainer = _BothLosses(
        model=str(model_dir), reward_funcs=[short, long], args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
        objective=objective, loss_impl=impl,
    )
    trainer.train()
    records = _BothLosses.records
    assert len(records) == 2 * accumulation and all(r["old"] for r in records)
    assert any(r["padded"] for r in records)  # some completion ended early: the mask has zeros
    for record in records:
        ours, theirs = record["loss"]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
        g_ours, g_theirs = record["grad"]
        assert g_theirs.abs().max() > 0
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5 * g_theirs.abs().max().item())
        m_ours, m_theirs = record["metrics"]
        assert set(m_ours) == set(m_theirs)
        assert set(m_ours) - BONUS_METRICS == _expected_metrics(loss_type, beta)
        assert m_ours == pytest.approx(m_theirs, rel=1e-5, abs=1e-7)
        ours_state, theirs_state = record["entropy_state"]
        assert ours_state[:2] == pytest.approx(theirs_state[:2], rel=1e-6)
        assert (ours_state[2] is None) == (theirs_state[2] is None)
        if ours_state[2] is not None:
            torch.testing.assert_close(ours_state[2], theirs_state[2], rtol=1e-5, atol=1e-6)
    # The second step's ratio moved off 1: the clip and the KL terms were exercised.
    m_last = records[-1]["metrics"][1]
    no_clip = {"cispo": "cispo_clip_ratio", "sapo": None, "vespo": None}
    clipped = no_clip.get(loss_type, "clip_ratio/region_mean")
    if clipped is not None:
        assert m_last[clipped] > 0
    if loss_type == "vespo":  # the sequences' weights moved off phi(1) = 1
        assert abs(m_last["vespo/phi_seq_mean"] - 1) > 1e-3
    if beta:
        assert m_last["kl"] > 0


@pytest.mark.parametrize(("loss_type", "delta"), [("dapo", 1.25), ("vespo", None)])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_iama_loss_equals_trl_loss_on_token_advantages(tmp_path: Path, loss_type: str, delta: float | None,
                                                       impl: str) -> None:
    """Per-token advantages [S, T] (a subclass's, e.g. for tool turns): TRL broadcasts only a 1-D
    one, so both losses read the same per-token values (VESPO's weight then has each token's
    advantage sign, and its metric is a mean over tokens)."""
    _BothLosses.token_advantages = True
    try:
        test_iama_loss_equals_trl_loss(tmp_path, loss_type, 0.1, 2, 2, True, delta, impl)
    finally:
        _BothLosses.token_advantages = False


@pytest.mark.parametrize(("loss_type", "beta", "corrected", "extra", "vllm_is"), [
    ("grpo", 0.0, False, {"top_entropy_quantile": 0.5}, None),
    ("dapo", 0.0, False, {"off_policy_mask_threshold": 0.0}, None),
    ("bnpo", 0.0, False, {}, "token_truncate"), ("dapo", 0.0, False, {}, "sequence_mask"),
    ("dr_grpo", 0.0, False, {"top_entropy_quantile": 0.6}, "token_mask"),
    ("cispo", 0.0, False, {"epsilon_high": 1.02, "top_entropy_quantile": 0.5}, "token_truncate"),
    ("sapo", 0.0, False, {"off_policy_mask_threshold": 0.0}, "sequence_truncate"),
    # with a KL term, which TRL leaves unweighted (plain and ratio-weighted)
    ("dapo", 0.1, True, {"top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.0}, "token_mask"),
    ("grpo", 0.1, False, {}, "sequence_truncate"),
    # VESPO: vLLM's ratios go into each sequence's weight (TRL's get_gamma_weights), the masks onto the loss
    ("vespo", 0.0, False, {}, "token_truncate"), ("vespo", 0.0, False, {"top_entropy_quantile": 0.5}, None),
    ("vespo", 0.1, True, {"top_entropy_quantile": 0.5}, "token_truncate")])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_iama_loss_equals_trl_loss_with_policy_weights(tmp_path: Path, loss_type: str, beta: float,
                                                       corrected: bool, extra: dict, vllm_is: str | None,
                                                       impl: str) -> None:
    """TRL's weights of the policy term (the entropy mask, the off-policy sequence mask, vLLM's
    importance sampling ratio in each mode, alone and together), folded into the advantages:
    TRL's loss, gradient and metrics (its clip counts taken whatever a token's weight)."""
    _BothLosses.vllm_is = vllm_is
    try:
        test_iama_loss_equals_trl_loss(tmp_path, loss_type, beta, 2, 2, corrected, None, impl, **extra)
    finally:
        _BothLosses.vllm_is = None


@pytest.mark.parametrize(("loss_type", "extra"), [
    ("grpo", {"entropy_coef": 0.05}), ("dapo", {"entropy_coef": 0.05, "top_entropy_quantile": 0.5}),
    # adaptive (Skywork-OR1): a target above the entropy, so the coefficient rises and the bonus acts
    ("bnpo", {"use_adaptive_entropy": True, "entropy_coef": 0.02, "entropy_target": 10.0}),
    ("dapo", {"use_adaptive_entropy": True, "entropy_coef": 0.02, "entropy_target": 0.1})])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_iama_loss_equals_trl_loss_with_an_entropy_bonus(tmp_path: Path, loss_type: str, extra: dict,
                                                        impl: str) -> None:
    """TRL's entropy bonus, static and adaptive (its coefficient, gate and window as TRL's): TRL's
    loss, gradient, metrics (policy_loss, entropy_coef) and controller state."""
    test_iama_loss_equals_trl_loss(tmp_path, loss_type, 0.0, 2, 2, False, None, impl, **extra)
    records = _BothLosses.records
    assert any("entropy_coef" in r["metrics"][0] for r in records)
    coefs = [r["entropy_state"][1][0] for r in records]
    if extra.get("use_adaptive_entropy"):  # the controller moved the coefficient
        assert coefs[-1] != extra["entropy_coef"]


def test_gspo_takes_sequence_weights(tmp_path: Path) -> None:
    """At the sequence level: the off-policy mask and vLLM's sequence-level ratios (one weight per
    sequence) are covered."""
    _BothLosses.vllm_is = "sequence_truncate"
    try:
        test_iama_loss_equals_trl_loss(tmp_path, "grpo", 0.0, 1, 1, False, None, "auto", level="sequence",
                                       off_policy_mask_threshold=0.02)
    finally:
        _BothLosses.vllm_is = None


@pytest.mark.parametrize(("loss_type", "beta", "accumulation", "steps_per_generation", "delta"), [
    ("grpo", 0.0, 2, 2, None), ("bnpo", 0.1, 1, 1, None), ("dr_grpo", 0.0, 1, 1, 1.25),
    ("dapo", 0.1, 2, 2, 1.25), ("dapo", 0.1, 2, 2, 1.1)])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_iama_loss_equals_trl_loss_at_the_sequence_level(tmp_path: Path, loss_type: str, beta: float,
                                                         accumulation: int, steps_per_generation: int,
                                                         delta: float | None, impl: str) -> None:
    """GSPO (importance_sampling_level="sequence"): TRL differentiates its sequence ratio through
    every token of the sequence; the kernel's ratio_level="sequence" gives the same loss and
    gradient, and the clip metrics are TRL's means over sequences (beta > 0 with the plain KL)."""
    test_iama_loss_equals_trl_loss(tmp_path, loss_type, beta, accumulation, steps_per_generation, False,
                                   delta, impl, level="sequence")


@pytest.mark.parametrize(("loss_type", "beta", "corrected", "level", "extra"), [
    # CISPO: TRL bounds the weight by epsilon_high itself (low, to see it clip); delta is ignored
    ("cispo", 0.0, False, "token", {"epsilon_high": 1.02, "delta": 1.1}),
    ("cispo", 0.1, True, "token", {"epsilon_high": 1.02}),
    ("cispo", 0.1, False, "sequence", {"epsilon_high": 1.02}),
    ("sapo", 0.0, False, "token", {}),
    ("sapo", 0.1, True, "token", {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.5}),
    ("sapo", 0.1, False, "sequence", {}),
    ("luspo", 0.0, False, "sequence", {"epsilon": 0.4}),  # wider: a micro-batch not wholly clipped
    ("luspo", 0.1, True, "token", {"delta": 1.25}),
    # VESPO: TRL's gamma weight of each sequence's ratio, defaults and others (k_neg < 0 keeps a
    # weight that grows as the ratio falls)
    ("vespo", 0.0, False, "token", {}),
    ("vespo", 0.1, True, "token", {"vespo_k_pos": 1.5, "vespo_lambda_pos": 0.5, "vespo_k_neg": -1.0}),
    ("vespo", 0.1, False, "sequence", {"vespo_lambda_neg": 1e-6}),
])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_iama_loss_equals_trl_cispo_sapo_luspo_and_vespo(tmp_path: Path, loss_type: str, beta: float,
                                                         corrected: bool, level: str, extra: dict,
                                                         impl: str) -> None:
    """TRL's CISPO (the kernel's surrogate="cispo", range [0, epsilon_high]), SAPO (its soft gate,
    TRL's temperatures), LUSPO (the clipped surrogate summed over each sequence) and VESPO (the
    sequence's gamma weight on a REINFORCE term), against TRL's own loss, gradient and metrics."""
    extra = dict(extra)
    delta = extra.pop("delta", None)
    test_iama_loss_equals_trl_loss(tmp_path, loss_type, beta, 2, 2, corrected, delta, impl, level=level,
                                   **extra)


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("per_token", [False, True])
def test_vespo_weights_equal_trls(per_token: bool, impl: str) -> None:
    """The kernel's VESPO weights (read off its gradient, ``-phi A / tokens``, and from its log
    weights through vespo_phi, as the metric) against TRL's get_gamma_weights, where its clamps
    act: token log-ratios past +-20, sums past log(1e-8) and 20, both advantage signs, NaN padding
    under the mask (not read), a k that makes some weights non-finite (0) and a rate below TRL's
    floor of 1e-4 (clamped to it)."""
    g = torch.Generator().manual_seed(0)
    S, T = 12, 9
    logps = -torch.rand(S, T, generator=g)
    old = logps + torch.randn(S, T, generator=g) * torch.linspace(0.01, 8.0, S)[:, None]
    old[0, :3] = logps[0, :3] + 30.0  # token log-ratios clamped at -20, the sum at log(1e-8)
    old[1, :3] = logps[1, :3] - 30.0  # ... at +20, the sum at 20
    mask = torch.rand(S, T, generator=g) < 0.8
    mask[:, 0] = True
    advantages = torch.randn((S, T) if per_token else (S,), generator=g)
    advantages[0] = -advantages[0].abs()  # with k_neg = -6: phi(1e-8) = exp(110) overflows, so 0
    padded_logps = torch.where(mask, logps, torch.nan)
    A = advantages if per_token else advantages[:, None]
    for k_pos, lambda_pos, k_neg, lambda_neg in ((2.0, 3.0, 3.0, 2.0), (1.5, 0.5, -6.0, -1.0)):
        trainer = SimpleNamespace(args=SimpleNamespace(vespo_k_pos=k_pos, vespo_lambda_pos=lambda_pos,
                                                       vespo_k_neg=k_neg, vespo_lambda_neg=lambda_neg))
        options = IAMAGRPOTrainer._vespo_options(trainer)
        x = padded_logps.clone().requires_grad_(True)
        out = policy_loss(x, old, None, advantages, mask, loss_type="token", surrogate="vespo", impl=impl,
                          **options)
        (grad,) = torch.autograd.grad(out.loss, x)
        theirs = trl.GRPOTrainer.get_gamma_weights(
            A, logps - old, mask.float(), None,
            k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg).expand(S, T)
        assert theirs.abs().max() > 0 and (theirs == 0).any()
        from_grad = -grad * mask.sum() / A.expand(S, T)
        # phi's relative error is |k - lambda w| times the sum's absolute one (a float32 sum in
        # TRL, float64 or by tiles in ours): up to ~1e-5 at these ratios
        torch.testing.assert_close(from_grad[mask], theirs[mask], rtol=1e-4, atol=1e-30)
        log_w = out.sequence_log_ratio if not per_token else out.sequence_log_ratio[:, None]
        metric = vespo_phi(log_w, advantages, **{k.removeprefix("vespo_"): v for k, v in options.items()})
        metric = metric if per_token else metric[:, None]
        torch.testing.assert_close(metric.expand(S, T)[mask], theirs[mask], rtol=1e-4, atol=1e-30)
    none = policy_loss(logps, None, None, advantages, mask, surrogate="vespo", impl=impl)
    assert none.sequence_log_ratio.eq(0).all()  # no old log-probs: every ratio is 1, phi(1) = 1


def test_loss_settings_iama_does_not_cover_are_refused(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, max_positions=64)
    objective = Objective([Criterion("short", Mean()), Criterion("long", Mean())])

    def make(loss_impl: Any = "auto", **overrides: Any) -> Any:
        return IAMAGRPOTrainer(model=model, reward_funcs=[short, long],
                               args=_config(tmp_path, **overrides),
                               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                               processing_class=tokenizer, objective=objective, loss_impl=loss_impl)

    for overrides, message in [
        ({"loss_type": "cispo"}, "loss_type='cispo' with epsilon_high=0.2 < 1"),
        ({"delta": 1.0}, "delta=1.0 (covered when delta > 1)"),
        ({"off_policy_mask_threshold": 0.5, "top_entropy_quantile": 0.5,
          "importance_sampling_level": "sequence"},
         "top_entropy_quantile=0.5 and off_policy_mask_threshold=0.5 with "
         "importance_sampling_level='sequence'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            make(**overrides)
    with pytest.raises(TypeError, match="loss_impl must be None or a str"):
        make(loss_impl=1)
    # vLLM's per-token ratios against one ratio per sequence
    weighted = make()
    weighted.top_entropy_quantile = 0.5
    weighted._check_loss_settings()
    weighted.use_vllm = weighted.vllm_importance_sampling_correction = True
    weighted.vllm_importance_sampling_mode = "token_mask"
    weighted.importance_sampling_level = "sequence"
    with pytest.raises(ValueError, match=re.escape("vllm_importance_sampling_mode='token_mask' with "
                                                   "importance_sampling_level='sequence'")):
        weighted._check_loss_settings()
    assert make(loss_impl=None, top_entropy_quantile=0.5).loss_impl is None  # TRL's loss: anything goes
    later = make()  # a loss type of a later TRL
    later.loss_type = "new_loss"
    with pytest.raises(ValueError, match=re.escape("loss_type='new_loss' (supported: ['bnpo', 'cispo'")):
        later._check_loss_settings()
    assert make(loss_type="cispo", epsilon_high=5.0, delta=1.1).loss_impl == "auto"  # delta: not CISPO's
    # Sequence ratios with per-token advantages: TRL couples every token of a row to the row's
    # advantages through its ratio; refused at the loss, before the model runs.
    gspo = make(importance_sampling_level="sequence")
    with pytest.raises(ValueError, match=r"one advantage per completion, got advantages of shape \(2, 3\)"):
        gspo._compute_loss(gspo.model, {"advantages": torch.zeros(2, 3)})
    # TRL's sequence weight on the KL term (beta > 0: TRL builds the reference model from a path)
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    with pytest.raises(ValueError, match=re.escape(
            "importance_sampling_level='sequence' with use_bias_correction_kl=True and beta=0.1")):
        IAMAGRPOTrainer(model=str(model_dir), reward_funcs=[short, long],
                        args=_config(tmp_path, importance_sampling_level="sequence", beta=0.1,
                                     use_bias_correction_kl=True),
                        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                        processing_class=tokenizer, objective=objective, loss_impl="auto")


def test_evaluation_uses_the_eval_group_size(tmp_path: Path) -> None:
    """evaluate(): groups of num_generations_eval, the IAMA advantages and iama's loss."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, max_positions=64)
    objective = Objective([Criterion("short", BestOfN(2)), Criterion("long", Mean())])
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = IAMAGRPOTrainer(
        model=model, reward_funcs=[short, long],
        args=_config(tmp_path, num_generations_eval=2, per_device_eval_batch_size=4,
                     eval_strategy="no"),
        train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
        objective=objective, loss_impl="auto",
    )
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert "eval_iama/lambda/short" in metrics and "eval_iama/value/long" in metrics
    rewards, adv = _logged(trainer)
    assert rewards.shape == (len(PROMPTS) * 2, 2)
    expected, _ = flat_group_advantages(rewards, 2, objective, ["short", "long"], impl="reference")
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


def test_completions_no_reward_function_scored(tmp_path: Path) -> None:
    """None from every reward function: advantage 0, left out of the statistics and lambda."""
    unscored = {1, 4, 5, 6, 7}  # one completion of the first group, all of the second

    def gaps(fn: Any) -> Any:
        def call(prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list:
            scores = fn(prompts, completions, completion_ids)  # + 0.1 i: no group of ties
            return [None if i in unscored else s + 0.1 * i for i, s in enumerate(scores)]

        call.__name__ = fn.__name__
        return call

    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, max_positions=64)
    objective = Objective([Criterion("short", BestOfN(2)), Criterion("long", SoftBestOfN(0.5))],
                          Min())
    trainer = IAMAGRPOTrainer(
        model=model, reward_funcs=[gaps(short), gaps(long)], args=_config(tmp_path),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
        objective=objective, loss_impl="auto",
    )
    trainer.train()
    rewards, adv = _logged(trainer)
    assert torch.isnan(rewards[sorted(unscored)]).all()
    expected, out = flat_group_advantages(rewards, GROUP, objective, ["short", "long"],
                                          impl="reference")
    assert (adv[sorted(unscored)] == 0).all() and adv.abs().max() > 0.1
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)
    history = trainer.state.log_history[0]
    for i, name in enumerate(objective.names):  # the empty second group is not averaged in
        assert history[f"iama/value/{name}"] == pytest.approx(float(out.values[0, i]), rel=1e-5)
        assert history[f"iama/lambda/{name}"] == pytest.approx(float(out.criterion_weights[i]),
                                                               rel=1e-5)


def test_the_loss_benchmark_runs(capsys: pytest.CaptureFixture[str], benchmark_script) -> None:
    """benchmarks/trl_loss.py at a tiny size (it checks iama's gradient against TRL's first)."""
    module = benchmark_script("trl_loss")
    configs = "grpo:0:sequence,dapo:0.1:corrected,cispo:0,sapo:0.1,vespo:0.1:corrected"
    assert module.main(["--shapes", "6x5", "--configs", configs, "--rounds", "2", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert out.count("iama loss_impl=auto") == 10  # five progress lines and five table rows

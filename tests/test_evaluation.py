"""Inference-time algorithms and the evaluator, on a fake generator with a known distribution.

The fake policy draws completion lengths from a fixed discrete distribution, so every quantity the
evaluator estimates has an exact value computed independently here by enumeration.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from iama.evaluation import Evaluator, best_of_n, criterion_values, evaluate, soft_best_of_n
from iama.plots import length_histograms, pareto_front, pareto_plot
from iama.rewards import LengthReward
from iama.rollout import Rollout
from iama_kernels import BestOfN, Criterion, Mean, Objective, SoftBestOfN, WeightedSum

TOKEN = 7  # every completion token; the length is all that matters
PAD = 0


class FakeGenerator:
    """Samples completion lengths i.i.d. from ``probs`` over ``lengths`` (``fixed=True``: sample
    ``g`` of every group has length ``lengths[g]``, deterministically)."""

    def __init__(self, lengths: list[int], probs: list[float] | None = None, *, fixed: bool = False):
        self.lengths = torch.tensor(lengths)
        self.probs = None if probs is None else torch.tensor(probs, dtype=torch.float64)
        self.fixed = fixed

    def generate(self, prompts, group_size, *, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
        N = len(prompts) * group_size
        if self.fixed:
            lens = self.lengths[:group_size].repeat(len(prompts))
        else:
            lens = self.lengths[torch.multinomial(self.probs, N, replacement=True, generator=generator)]
        lens = lens.clamp(max=max_new_tokens)
        T = max(int(lens.max()), 1)
        mask = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
        ids = torch.where(mask, TOKEN, PAD)
        return Rollout(
            prompts=[p for p in prompts for _ in range(group_size)],
            prompt_ids=torch.ones(N, 1, dtype=torch.long),
            prompt_mask=torch.ones(N, 1, dtype=torch.bool),
            completion_ids=ids,
            completion_mask=mask,
            completions=[" ".join(["w"] * int(k)) for k in lens],
            group_size=group_size,
        )


LENGTHS = [2, 5, 9, 14, 20]
PROBS = [0.3, 0.25, 0.2, 0.15, 0.1]
SHORT = LengthReward(target=4, scale=8)
LONG = LengthReward(target=16, scale=8)


def _reward_of_length(fn: LengthReward, k: int) -> float:
    return -(((k - fn.target) / fn.scale) ** 2)


def _exact_best_of(fn: LengthReward, n: int) -> float:
    """E[max of n i.i.d. rewards] by enumerating all n-tuples of outcomes."""
    total = 0.0
    for tup in itertools.product(range(len(LENGTHS)), repeat=n):
        p = math.prod(PROBS[i] for i in tup)
        total += p * max(_reward_of_length(fn, LENGTHS[i]) for i in tup)
    return total


def _exact_mean(fn: LengthReward) -> float:
    return sum(p * _reward_of_length(fn, k) for p, k in zip(PROBS, LENGTHS, strict=True))


def _exact_tilted(fn: LengthReward, tau: float) -> float:
    r = [_reward_of_length(fn, k) for k in LENGTHS]
    w = [p * math.exp(x / tau) for p, x in zip(PROBS, r, strict=True)]
    return sum(wi * x for wi, x in zip(w, r, strict=True)) / sum(w)


# ---------------------------------------------------------------------------------------------
# The evaluator's estimators
# ---------------------------------------------------------------------------------------------


def _repeat(evaluator: Evaluator, repeats: int, prompts: int, seed: int) -> tuple[dict, dict]:
    rng = torch.Generator().manual_seed(seed)
    gen = FakeGenerator(LENGTHS, PROBS)
    runs = [evaluator(gen, [f"p{i}" for i in range(prompts)], rng=rng) for _ in range(repeats)]
    names = list(runs[0].criteria)
    values = {n: torch.tensor([r.values[n] for r in runs], dtype=torch.float64) for n in names}
    stderrs = {n: torch.tensor([r.stderrs[n] for r in runs], dtype=torch.float64) for n in names}
    return values, stderrs


def test_unbiased_estimators_match_enumeration() -> None:
    objective = Objective(
        [Criterion("short", BestOfN(4)), Criterion("long", BestOfN(2)), Criterion("mean", Mean())]
    )
    evaluator = Evaluator(
        objective, {"short": SHORT, "long": LONG, "mean": SHORT}, samples=5, max_new_tokens=32
    )
    values, stderrs = _repeat(evaluator, repeats=200, prompts=16, seed=1)
    exact = {"short": _exact_best_of(SHORT, 4), "long": _exact_best_of(LONG, 2), "mean": _exact_mean(SHORT)}
    for name, v in values.items():
        se = float(v.std() / math.sqrt(len(v)))  # standard error of the mean of 200 evaluations
        assert abs(float(v.mean()) - exact[name]) < 4 * se, (name, float(v.mean()), exact[name], se)
        # The reported per-evaluation standard error matches the spread across evaluations (compared
        # as variances: stderr^2 is unbiased for the variance, stderr itself is skewed low here).
        ratio = float((stderrs[name] ** 2).mean().sqrt() / v.std())
        assert 0.8 < ratio < 1.25, (name, ratio)
    # BestOfN(4) from 5 samples is far from a plain mean: the estimator does pick the top.
    assert _exact_best_of(SHORT, 4) - _exact_mean(SHORT) > 50 * float(values["short"].std() / math.sqrt(200))


def test_plugin_estimator_is_biased_where_unbiased_is_not() -> None:
    # The same data through the plug-in formula misses E[max of 4] by many standard errors: the
    # unbiasedness test above can tell the two estimators apart.
    evaluator = Evaluator(BestOfN(4), SHORT, samples=5, max_new_tokens=32, estimator="plugin")
    values, _ = _repeat(evaluator, repeats=200, prompts=16, seed=1)
    v = values["reward"]
    se = float(v.std() / math.sqrt(len(v)))
    assert abs(float(v.mean()) - _exact_best_of(SHORT, 4)) > 10 * se


def test_soft_best_of_n_plugin_is_consistent() -> None:
    tau = 0.5
    evaluation = evaluate(
        FakeGenerator(LENGTHS, PROBS),
        [f"p{i}" for i in range(8)],
        SoftBestOfN(tau),
        SHORT,
        samples=2000,
        max_new_tokens=32,
        rng=torch.Generator().manual_seed(2),
    )
    c = evaluation.criteria["reward"]
    exact = _exact_tilted(SHORT, tau)
    # The ratio estimator's bias is O(1/M) (a few 1e-4 here), well below 4 standard errors.
    assert abs(c.value - exact) < 4 * c.stderr + 1e-3, (c.value, exact, c.stderr)
    assert abs(_exact_mean(SHORT) - exact) > 20 * c.stderr  # tilting matters at this tau


def test_evaluation_fields_and_batching() -> None:
    objective = Objective(
        [Criterion("short", BestOfN(2)), Criterion("long", BestOfN(2))], WeightedSum([0.25, 0.75])
    )
    prompts = [f"p{i}" for i in range(5)]
    whole = evaluate(
        FakeGenerator(LENGTHS, fixed=True), prompts, objective, [SHORT, LONG], samples=4, max_new_tokens=32
    )
    batched = evaluate(
        FakeGenerator(LENGTHS, fixed=True),
        prompts,
        objective,
        [SHORT, LONG],
        samples=4,
        max_new_tokens=32,
        prompts_per_batch=2,
    )
    assert whole.rewards.shape == (5, 4, 2) and batched.rewards.shape == (5, 4, 2)
    torch.testing.assert_close(whole.rewards, batched.rewards)
    assert whole.lengths.tolist() == LENGTHS[:4] * 5 == batched.lengths.tolist()
    # Each group holds lengths 2, 5, 9, 14: the unbiased BestOfN(2) value of 4 fixed rewards is
    # the average over the 6 pairs of the larger reward, identical for every prompt.
    for name, fn in (("short", SHORT), ("long", LONG)):
        r = [_reward_of_length(fn, k) for k in LENGTHS[:4]]
        pairs = [max(a, b) for a, b in itertools.combinations(r, 2)]
        assert whole.values[name] == pytest.approx(sum(pairs) / 6, abs=1e-6)
        assert whole.stderrs[name] == pytest.approx(0.0, abs=1e-6)
    expected_g = 0.25 * whole.values["short"] + 0.75 * whole.values["long"]
    assert whole.objective_value == pytest.approx(expected_g, abs=1e-9)
    single = evaluate(
        FakeGenerator(LENGTHS, fixed=True), ["p"], BestOfN(2), SHORT, samples=4, max_new_tokens=32
    )
    assert math.isnan(single.criteria["reward"].stderr)


def test_criterion_values_direct() -> None:
    rewards = torch.tensor([[[1.0], [3.0], [2.0]], [[0.0], [0.0], [6.0]]])  # [B=2, M=3, m=1]
    out = criterion_values(rewards, BestOfN(2))["reward"]
    # unbiased E[max of 2] from 3 samples: mean of pairwise maxima
    torch.testing.assert_close(
        out.per_prompt, torch.tensor([(3 + 2 + 3) / 3, (0 + 6 + 6) / 3], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="G >= n"):
        criterion_values(rewards, BestOfN(4))
    with pytest.raises(ValueError, match="shape"):
        criterion_values(rewards, Objective([Criterion("a"), Criterion("b")]))


# ---------------------------------------------------------------------------------------------
# Bad reward functions name the criterion and the prompt
# ---------------------------------------------------------------------------------------------


def _raises_on(bad_prompt: str):
    def fn(prompts, completions, ids):
        if bad_prompt in prompts:
            raise RuntimeError("boom")
        return torch.zeros(len(prompts))

    return fn


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_raises_on("p2"), r"criterion 'long' raised RuntimeError: boom.*'p2'"),
        (lambda p, c, i: torch.zeros(len(p) + 1), r"criterion 'long' returned shape"),
        (lambda p, c, i: torch.tensor([0.0 if q != "p3" else math.nan for q in p]), r"'long'.*nan.*'p3'"),
        (lambda p, c, i: torch.tensor([0.0 if q != "p1" else math.inf for q in p]), r"'long'.*inf.*'p1'"),
    ],
)
def test_bad_reward_functions_are_named(fn, match: str) -> None:
    objective = Objective([Criterion("short", Mean()), Criterion("long", BestOfN(2))])
    with pytest.raises(ValueError, match=match):
        evaluate(
            FakeGenerator(LENGTHS, fixed=True),
            [f"p{i}" for i in range(4)],
            objective,
            {"short": SHORT, "long": fn},
            samples=3,
            max_new_tokens=32,
        )


def test_evaluator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="G >= n"):
        Evaluator(BestOfN(4), SHORT, samples=3, max_new_tokens=8)
    with pytest.raises(ValueError, match="no reward function for criterion 'b'"):
        Evaluator(Objective([Criterion("a"), Criterion("b")]), {"a": SHORT}, samples=3, max_new_tokens=8)
    with pytest.raises(ValueError, match="2 functions"):
        Evaluator(Mean(), [SHORT, LONG], samples=3, max_new_tokens=8)
    with pytest.raises(ValueError, match="samples"):
        Evaluator(Mean(), SHORT, samples=0, max_new_tokens=8)
    with pytest.raises(TypeError, match="generate"):
        evaluate(object(), ["p"], Mean(), SHORT, samples=2, max_new_tokens=8)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(FakeGenerator(LENGTHS, PROBS), [], Mean(), SHORT, samples=2, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------
# best_of_n and soft_best_of_n
# ---------------------------------------------------------------------------------------------


def test_best_of_n_serves_the_maximum() -> None:
    rng = torch.Generator().manual_seed(3)
    prompts = [f"p{i}" for i in range(200)]
    sel = best_of_n(FakeGenerator(LENGTHS, PROBS), prompts, SHORT, 4, max_new_tokens=32, rng=rng)
    assert sel.candidate_rewards.shape == (200, 4) and sel.rewards.shape == (200,)
    torch.testing.assert_close(sel.rewards, sel.candidate_rewards.max(1).values, rtol=0, atol=0)
    # Independent check from the text: the served completion's own length gives its reward.
    for text, ids, r in zip(sel.completions, sel.completion_ids, sel.rewards, strict=True):
        assert len(text.split()) == len(ids)
        assert r.item() == pytest.approx(_reward_of_length(SHORT, len(ids)), abs=1e-6)
    # Lengths 5 (reward -1/64) and 2 (-4/64) are nearest the target 4; one of them wins whenever drawn.
    assert sel.rewards.mean() > sel.candidate_rewards.mean() + 0.1
    ties = best_of_n(FakeGenerator([5, 5, 3], fixed=True), ["a"], SHORT, 3, max_new_tokens=32)
    assert ties.index.tolist() == [0]  # ties go to the first candidate
    assert ties.rollout.completion_token_lists()[0] == ties.completion_ids[0]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.9 % quantile of the chi-square distribution with 3 degrees of freedom.
CHI2_3DF_999 = 16.266


def test_soft_best_of_n_frequencies_follow_softmax() -> None:
    tau = 0.4
    cands = [2, 5, 9, 14]
    prompts = [f"p{i}" for i in range(4000)]
    sel = soft_best_of_n(
        FakeGenerator(cands, fixed=True),
        prompts,
        SHORT,
        4,
        tau,
        max_new_tokens=32,
        rng=torch.Generator().manual_seed(4),
    )
    r = torch.tensor([_reward_of_length(SHORT, k) for k in cands], dtype=torch.float64)
    probs = torch.softmax(r / tau, 0)
    counts = torch.bincount(sel.index, minlength=4).double()
    assert _chi_square(counts, probs) < CHI2_3DF_999, (counts / counts.sum(), probs)
    # The statistic does reject wrong distributions: uniform choice, or the hard maximum.
    assert _chi_square(counts, torch.full((4,), 0.25, dtype=torch.float64)) > 10 * CHI2_3DF_999
    torch.testing.assert_close(sel.rewards, r.float()[sel.index])
    hard = soft_best_of_n(
        FakeGenerator(cands, fixed=True),
        prompts[:50],
        SHORT,
        4,
        1e-6,
        max_new_tokens=32,
        rng=torch.Generator().manual_seed(5),
    )
    assert hard.index.tolist() == [1] * 50  # tau -> 0 is Best-of-n
    with pytest.raises(ValueError, match="tau"):
        soft_best_of_n(FakeGenerator(cands, fixed=True), prompts[:1], SHORT, 4, 0.0, max_new_tokens=32)


def test_selection_is_reproducible_from_rng() -> None:
    def run(seed: int):
        return soft_best_of_n(
            FakeGenerator(LENGTHS, PROBS),
            ["a", "b", "c"],
            SHORT,
            3,
            0.3,
            max_new_tokens=32,
            rng=torch.Generator().manual_seed(seed),
        )

    a, b = run(9), run(9)
    assert a.completions == b.completions and torch.equal(a.index, b.index)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def test_pareto_front() -> None:
    points = {
        "a": (0.0, 1.0),
        "b": (1.0, 0.0),
        "c": (0.5, 0.5),
        "d": (0.4, 0.4),
        "e": (0.5, 0.5),
        "f": (-1.0, 1.0),
    }
    assert pareto_front(points) == ["a", "c", "e", "b"]
    with pytest.raises(ValueError, match="finite"):
        pareto_front({"a": (math.nan, 0.0)})
    with pytest.raises(TypeError, match="pair"):
        pareto_front({"a": (1.0,)})


def test_plots_are_written(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n"
    p = pareto_plot(
        {
            "GRPO": (-0.30, -0.28),
            "IAMA BoN(4)": (-0.05, -0.06),
            "IAMA soft": (-0.08, -0.04),
            "base": (-0.5, -0.6),
        },
        xlabel="R_short (BestOfN(4))",
        ylabel="R_long (BestOfN(4))",
        path=tmp_path / "sub" / "pareto.png",
        title="length task",
        errors={"GRPO": (0.01, 0.02), "base": (math.nan, math.nan)},
    )
    assert p.read_bytes()[:8] == png and p.stat().st_size > 5000
    gen = torch.Generator().manual_seed(0)
    h = length_histograms(
        {
            "GRPO": (24 + torch.randint(-3, 4, (512,), generator=gen)).tolist(),
            "IAMA": torch.cat(
                [
                    12 + torch.randint(-4, 5, (256,), generator=gen),
                    36 + torch.randint(-4, 5, (256,), generator=gen),
                ]
            ),
        },
        targets={"short": 12, "long": 36},
        path=tmp_path / "lengths.png",
    )
    assert h.read_bytes()[:8] == png and h.stat().st_size > 5000
    with pytest.raises(ValueError, match="lengths"):
        length_histograms({}, targets={}, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="targets"):
        length_histograms({"a": [1]}, targets={"t": math.inf}, path=tmp_path / "x.png")

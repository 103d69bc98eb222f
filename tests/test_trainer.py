"""NonLinearGRPOTrainer: smoke run, construction-time validation, normalisers, adaptive beta,
checkpoint/resume bit-identity (also after a SIGINT)."""

from __future__ import annotations

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from iama.tiny import build_tiny_model, build_tiny_tokenizer
from iama.trainer import NonLinearGRPOTrainer, TrainerConfig
from iama_kernels import BestOfN, Criterion, Mean, Objective, SmoothMin


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's operations are so small that a second thread only adds synchronisation
    (and contention on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

PROMPTS = ["tell a story about the cat", "tell a story about the dog", "write", "say one two three"]
OBJECTIVE = Objective([Criterion("short", BestOfN(2)), Criterion("long", BestOfN(2))])


def length_reward(target: float):
    def fn(prompts, completions, ids):
        return torch.tensor([-((len(i) - target) / 8.0) ** 2 for i in ids])
    return fn


def noisy_length_reward(target: float):
    """Draws from Python's and NumPy's global RNGs, so resuming must restore them too."""
    def fn(prompts, completions, ids):
        noise = [0.01 * random.random() + 0.01 * float(np.random.rand()) for _ in ids]
        return torch.tensor([-((len(i) - target) / 8.0) ** 2 + e for i, e in zip(ids, noise, strict=True)])
    return fn


REWARDS = {"short": length_reward(3), "long": length_reward(10)}


def make(tmp_path, *, model_seed=0, tokenizer=None, objective=OBJECTIVE, rewards=REWARDS, prompts=PROMPTS,
         **overrides):
    tokenizer = build_tiny_tokenizer() if tokenizer is None else tokenizer
    model = build_tiny_model(tokenizer, seed=model_seed, max_positions=64)
    options = dict(group_size=4, prompts_per_step=2, max_new_tokens=12, learning_rate=3e-3, max_steps=2,
                   output_dir=str(tmp_path), progress=False, seed=1)
    options.update(overrides)
    return NonLinearGRPOTrainer(model, tokenizer, objective, rewards, prompts, TrainerConfig(**options))


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


LOG_KEYS = {"step", "loss", "reward/short", "reward/long", "value/short", "value/long", "lambda/short",
            "lambda/long", "objective", "kl", "beta", "clip_fraction", "ratio_mean", "completion_length/mean",
            "completion_length/min", "completion_length/max", "grad_norm", "lr", "step_time", "tokens_per_s"}


def test_two_step_smoke(tmp_path):
    trainer = make(tmp_path, beta=0.01)
    before = params(trainer.model)
    records = trainer.train()
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    after = params(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line, record in zip(lines, records, strict=True):
        logged = json.loads(line)
        assert set(logged) >= LOG_KEYS
        assert logged["step"] == record["step"]
        assert all(math.isfinite(logged[k]) for k in LOG_KEYS)
    assert records[0]["lambda/short"] == 0.5 and records[0]["kl"] == 0.0  # the policy starts at ref
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000002"
    # Parameters of the reference copy stay frozen.
    ref = trainer.ref_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())


def test_tokenizer_without_pad_token_trains(tmp_path):
    tokenizer = build_tiny_tokenizer(pad_token=False)
    trainer = make(tmp_path, tokenizer=tokenizer, max_steps=1)
    assert math.isfinite(trainer.train()[0]["loss"])
    assert tokenizer.pad_token_id is None


def test_construction_errors(tmp_path):
    with pytest.raises(ValueError, match=r"G >= n.*'short'"):
        make(tmp_path, objective=Objective([Criterion("short", BestOfN(5)), Criterion("long")]),
             estimator="unbiased", group_size=4)
    make(tmp_path, objective=Objective([Criterion("short", BestOfN(4)), Criterion("long")]),
         estimator="unbiased", group_size=4)  # G == n is fine
    with pytest.raises(ValueError, match=r"prompts\[1\].*context of 64 tokens"):
        make(tmp_path, prompts=["write", " ".join(["cat"] * 60)])
    with pytest.raises(ValueError, match="missing \\['long'\\]"):
        make(tmp_path, rewards={"short": REWARDS["short"]})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        make(tmp_path, rewards={**REWARDS, "extra": REWARDS["short"]})
    with pytest.raises(ValueError, match="multiple of"):
        make(tmp_path, prompts_per_step=3, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="group_size"):
        TrainerConfig(group_size=1)
    with pytest.raises(ValueError, match="beta must be > 0 when kl_target"):
        TrainerConfig(beta=0.0, kl_target=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        TrainerConfig(loss_type="sum")
    with pytest.raises(ValueError, match="ratio_level"):
        TrainerConfig(ratio_level="sentence")
    with pytest.raises(ValueError, match="surrogate must be one of"):
        TrainerConfig(surrogate="ppo")
    with pytest.raises(ValueError, match="tau_neg must be a finite float > 0"):
        TrainerConfig(tau_neg=0.0)
    with pytest.raises(ValueError, match=r"TrainerConfig\.vespo_lambda_neg must be a finite float > 0"):
        TrainerConfig(vespo_lambda_neg=0.0)
    with pytest.raises(ValueError, match="surrogate='vespo' takes ratio_level='token'"):
        TrainerConfig(surrogate="vespo", ratio_level="sequence")
    with pytest.raises(ValueError, match="surrogate='gmpo' takes ratio_level='token'"):
        TrainerConfig(surrogate="gmpo", ratio_level="sequence")
    with pytest.raises(ValueError, match="eps_low must be <= 1"):
        TrainerConfig(eps_low=1.5)
    TrainerConfig(surrogate="gmpo", eps_low=1.5)  # GMPO's bounds are on the log-ratio


def test_reward_error_names_criterion_and_prompt(tmp_path):
    def broken(prompts, completions, ids):
        return torch.full((len(ids),), math.nan) if "write" in prompts else torch.zeros(len(ids))

    trainer = make(tmp_path, rewards={"short": REWARDS["short"], "long": broken}, prompts=["write"])
    with pytest.raises(ValueError, match=r"criterion 'long'.*prompt 'write'"):
        trainer.train_step()


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
def test_gradient_accumulation_matches_one_batch(tmp_path, loss_type):
    """Micro-batches rescaled to the batch normaliser give the one-batch update (SGD, lr 1: the
    weight change is the gradient); a wrong normaliser would be off by a factor of ~2."""
    objective = Objective([Criterion("short", BestOfN(2)), Criterion("long", Mean())],
                          SmoothMin([0.5, 0.5], 4.0))
    runs = []
    for accumulation in (1, 2):
        trainer = make(tmp_path / str(accumulation), objective=objective, optimizer="sgd", learning_rate=1.0,
                       max_grad_norm=None, prompts_per_step=4, beta=0.05, loss_type=loss_type,
                       gradient_accumulation_steps=accumulation)
        before = params(trainer.model)
        trainer.train(1)
        runs.append({k: v - before[k] for k, v in params(trainer.model).items()})
    assert max(float(d.abs().max()) for d in runs[0].values()) > 1e-3
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], atol=1e-6, rtol=1e-5)


def test_sequence_ratio_changes_the_second_inner_epoch(tmp_path):
    """ratio_level="sequence" (GSPO) reaches the loss: the first inner epoch has ratio 1 at either
    level, the second does not, so the two levels' updates differ (SGD, no clipping of the norm)."""
    updates = {}
    for level in ("token", "sequence"):
        trainer = make(tmp_path / level, optimizer="sgd", learning_rate=1.0, max_grad_norm=None,
                       prompts_per_step=4, inner_epochs=2, eps_low=0.01, eps_high=0.01, ratio_level=level)
        before = params(trainer.model)
        trainer.train(1)
        updates[level] = torch.cat([(v - before[k]).flatten() for k, v in params(trainer.model).items()])
    assert float(updates["token"].abs().max()) > 1e-3
    assert not torch.allclose(updates["sequence"], updates["token"], rtol=1e-3, atol=1e-6)


def test_surrogate_reaches_the_loss(tmp_path):
    """CISPO, SAPO, VESPO and GMPO change the second inner epoch's update (the first has ratio 1, where
    every surrogate's gradient is PPO's); SAPO's temperature and VESPO's rates act."""
    updates = {}
    for name, extra in (("clip", {}), ("cispo", {"surrogate": "cispo"}), ("sapo", {"surrogate": "sapo"}),
                        ("sapo-hot", {"surrogate": "sapo", "tau_pos": 4.0, "tau_neg": 4.0}),
                        ("vespo", {"surrogate": "vespo"}), ("gmpo", {"surrogate": "gmpo"}),
                        ("vespo-steep", {"surrogate": "vespo", "vespo_lambda_pos": 40.0, "vespo_k_pos": 40.0,
                                         "vespo_lambda_neg": 40.0, "vespo_k_neg": 40.0})):
        trainer = make(tmp_path / name, optimizer="sgd", learning_rate=1.0, max_grad_norm=None,
                       prompts_per_step=4, inner_epochs=2, eps_low=0.01, eps_high=0.01, **extra)
        before = params(trainer.model)
        trainer.train(1)
        updates[name] = torch.cat([(v - before[k]).flatten() for k, v in params(trainer.model).items()])
    assert float(updates["clip"].abs().max()) > 1e-3
    for a, b in (("cispo", "clip"), ("sapo", "clip"), ("sapo-hot", "sapo"), ("cispo", "sapo"),
                 ("vespo", "cispo"), ("vespo-steep", "vespo"), ("gmpo", "clip"), ("gmpo", "cispo")):
        assert not torch.allclose(updates[a], updates[b], rtol=1e-3, atol=1e-6), (a, b)


def test_kl_estimator_reaches_the_loss(tmp_path):
    """The KL term's estimator reaches the update: "k3+" and "k2" have the same gradient (equal
    updates, bit for bit), k1's gradient is beta per token even where the policy is the reference
    (an update of its own)."""
    updates = {}
    for est in ("k3", "k1", "k2", "k3+"):
        trainer = make(tmp_path / est, optimizer="sgd", learning_rate=1.0, max_grad_norm=None,
                       prompts_per_step=4, inner_epochs=2, beta=0.5, kl_estimator=est)
        before = params(trainer.model)
        trainer.train(1)
        updates[est] = torch.cat([(v - before[k]).flatten() for k, v in params(trainer.model).items()])
    assert torch.equal(updates["k3+"], updates["k2"])
    assert not torch.allclose(updates["k1"], updates["k3"], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        TrainerConfig(kl_estimator="mse")


def test_adaptive_beta_follows_the_controller(tmp_path):
    trainer = make(tmp_path, beta=0.05, kl_target=0.02, kl_gain=0.3, max_steps=3)
    records = trainer.train()
    betas = [r["beta"] for r in records] + [trainer.beta]
    for r, new in zip(records, betas[1:], strict=True):
        error = max(-1.0, min(1.0, (r["kl"] - 0.02) / 0.02))
        assert new == pytest.approx(r["beta"] * math.exp(0.3 * error), rel=1e-12)
    assert betas[1] < betas[0]  # KL is 0 at the first step: beta goes down


def _resume_config(**extra):
    return dict(beta=0.02, kl_target=0.01, inner_epochs=2, warmup_steps=2, save_every=2,
                rewards={"short": noisy_length_reward(3), "long": noisy_length_reward(10)}, **extra)


def test_resume_is_bit_identical(tmp_path):
    full = make(tmp_path / "full", max_steps=4, **_resume_config())
    full.train()
    # Interrupted after 2 steps, then a fresh trainer from the same base resumes from "latest".
    first = make(tmp_path / "split", max_steps=4, **_resume_config())
    first.train(2)
    random.seed(123)  # state that a resume must overwrite
    np.random.seed(123)
    torch.manual_seed(123)
    second = make(tmp_path / "split", max_steps=4, **_resume_config())
    second.train(resume_from="latest")
    for (name, a), b in zip(full.model.named_parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert full.beta == second.beta and second.step == 4
    logs = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs] == [1, 2, 3, 4]
    full_logs = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [x["reward/short"] for x in logs] == [x["reward/short"] for x in full_logs]


def test_sigint_writes_checkpoint_and_resume_matches(tmp_path):
    calls = {"n": 0}

    def interrupting(prompts, completions, ids):
        calls["n"] += 1
        if calls["n"] == 2:  # during step 2: the step finishes, then the trainer stops
            os.kill(os.getpid(), signal.SIGINT)
        return length_reward(3)(prompts, completions, ids)

    full = make(tmp_path / "full", max_steps=3)
    full.train()
    stopped = make(tmp_path / "stop", max_steps=3, rewards={"short": interrupting, "long": length_reward(10)})
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert stopped.step == 2
    assert (tmp_path / "stop" / "checkpoints" / "step-000002" / "trainer.pt").exists()
    resumed = make(tmp_path / "stop", max_steps=3)
    resumed.train(resume_from=tmp_path / "stop" / "checkpoints" / "step-000002")
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_two_step_smoke_on_cuda(tmp_path):
    trainer = make(tmp_path, beta=0.01, device="cuda", inner_epochs=2)
    before = {k: v.cpu() for k, v in params(trainer.model).items()}
    records = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in records)
    assert next(trainer.model.parameters()).is_cuda
    assert any(not torch.equal(before[k], v.cpu()) for k, v in params(trainer.model).items())

"""``NonLinearGRPOTrainer``: the thin loop around :func:`iama_kernels.nonlinear_grpo_loss`.

One step: sample prompts, generate ``G`` completions per prompt, score every criterion, compute
old/reference log-probs without grad, call the fused loss, backward, optimizer step, adapt beta.

Distributed training (``torchrun``; gloo on CPU, nccl on GPU) keeps every group whole on one rank.
The values from which ``lambda = dg/dR`` is computed, and the token/sequence counts that normalise
the loss, are all-reduced, so that the averaged DDP gradient equals the gradient of one process on
the same global batch.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from iama_kernels import group_values, nonlinear_grpo_loss
from iama_kernels._checks import (
    ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    RATIO_LEVELS,
    SCALES,
    SURROGATES,
    check_group_sizes,
    check_vespo,
)
from iama_kernels.objectives import Criterion, Objective, Transform, as_objective

from .rollout import Generator, HFGenerator, RewardFn, Rollout, score, sequence_logprobs

__all__ = ["NonLinearGRPOTrainer", "TrainerConfig"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
_OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainerConfig:
    """Every knob of a non-linear GRPO run (validated on construction).

    Attributes:
        group_size: ``G``, completions sampled per prompt (>= 2).
        prompts_per_step: ``B``, prompts (groups) per step over all ranks; a multiple of
            ``world_size * gradient_accumulation_steps``.
        max_new_tokens: completion budget in tokens (EOS included); also the ``dr_grpo`` normaliser.
        temperature, top_p: sampling; log-probs are computed at the same temperature.
        optimizer: ``"adamw"`` (default) or ``"sgd"``; ``learning_rate``, ``weight_decay``,
            ``adam_betas``, ``adam_eps`` configure it.
        warmup_steps: linear learning-rate warm-up, then constant.
        max_steps: training steps run by :meth:`NonLinearGRPOTrainer.train`.
        inner_epochs: optimizer updates per sampled batch; with more than one the ratio is taken
            against log-probs computed before the first update (``old_logp``).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        beta: KL coefficient (the initial one when ``kl_target`` is set).
        kl_estimator: the KL term's estimator (``"k3"``, ``"k2"``, ``"k1"``, ``"abs"``, or
            ``"k3+"``, ``"k1+"``, ``"abs+"``: that value with k2's gradient), as in
            :func:`iama_kernels.policy_loss`; ``kl_target`` adapts beta on its value.
        kl_target: if set, beta is adapted after every step: ``log beta += kl_gain *
            clip((KL - kl_target) / kl_target, -1, 1)``, then clamped to ``[beta_min, beta_max]``.
        loss_type, estimator, scale, eps: passed to :func:`iama_kernels.nonlinear_grpo_loss`.
        ratio_level: ``"token"`` (PPO's per-token ratios) or ``"sequence"`` (GSPO's ratio per
            completion, the exp of its mean log-ratio); matters from the second inner epoch on.
        surrogate, tau_pos, tau_neg: the policy term (``"clip"``, ``"cispo"``, ``"sapo"``,
            ``"vespo"``, ``"dppo_tv"``, ``"dppo_kl"``, ``"gmpo"``) and SAPO's temperatures, as in
            :func:`iama_kernels.policy_loss`.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's shapes and rates
            (``surrogate="vespo"``, token-level ratios), as in :func:`iama_kernels.policy_loss`.
        gradient_accumulation_steps: each step's groups are split into this many micro-batches
            (whole groups) whose gradients are accumulated into one optimizer update.
        max_grad_norm: gradient clipping (``None`` for none).
        seed: prompt order, sampling and everything else random derive from it.
        log_every: write a JSONL line every this many steps (1 = every step).
        save_every: write a checkpoint every this many steps (0 = only at the end).
        output_dir: where ``log.jsonl`` and ``checkpoints/`` go.
        device: ``None`` picks ``cuda:<local rank>`` when CUDA is available, else ``cpu``.
        dtype: ``None`` keeps the model's dtype, else one of float32/float64/bfloat16/float16.
        impl: backend of the loss op (``"auto"`` or an explicit name).
        logprob_batch_size: rows per forward pass for old/reference log-probs (``None``: all).
        progress: show a tqdm progress bar (rank 0 only).
    """

    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    optimizer: str = "adamw"
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 100
    inner_epochs: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_target: float | None = None
    kl_gain: float = 0.1
    beta_min: float = 1e-6
    beta_max: float = 10.0
    loss_type: str = "grpo"
    ratio_level: str = "token"
    surrogate: str = "clip"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    estimator: str = "plugin"
    scale: str = "group"
    eps: float = 1e-4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 1
    save_every: int = 0
    output_dir: str = "runs/iama"
    device: str | None = None
    dtype: str | None = None
    impl: str = "auto"
    logprob_batch_size: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"TrainerConfig.{name} must be an int >= {minimum}, got {v!r}")

        for name in ("prompts_per_step", "max_new_tokens", "inner_epochs", "gradient_accumulation_steps",
                     "log_every"):
            positive_int(name)
        positive_int("group_size", 2)
        positive_int("max_steps", 0)
        positive_int("warmup_steps", 0)
        positive_int("save_every", 0)
        if self.logprob_batch_size is not None:
            positive_int("logprob_batch_size")
        for name in ("learning_rate", "eps_low", "eps_high", "beta", "weight_decay", "eps", "kl_gain"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainerConfig.{name} must be a finite float >= 0, got {v!r}")
        if not self.temperature >= 0:
            raise ValueError(f"TrainerConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"TrainerConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.eps_low > 1 and self.surrogate != "gmpo":  # (GMPO's bounds are on the log-ratio)
            raise ValueError(f"TrainerConfig.eps_low must be <= 1, got {self.eps_low}")
        for name in ("tau_pos", "tau_neg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"TrainerConfig.{name} must be a finite float > 0, got {v!r}")
        for name, choices in (("loss_type", LOSS_TYPES), ("estimator", ESTIMATORS), ("scale", SCALES),
                              ("optimizer", _OPTIMIZERS), ("ratio_level", RATIO_LEVELS),
                              ("surrogate", SURROGATES), ("kl_estimator", KL_ESTIMATORS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainerConfig.{name} must be one of {choices}, "
                                 f"got {getattr(self, name)!r}")
        check_vespo(self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg,
                    prefix="TrainerConfig.vespo_")
        if self.surrogate in ("vespo", "gmpo") and self.ratio_level != "token":
            raise ValueError(f"TrainerConfig.surrogate={self.surrogate!r} takes ratio_level='token' (its "
                             f"weight or ratio is already one per completion), got {self.ratio_level!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"TrainerConfig.dtype must be None or one of {tuple(_DTYPES)}, "
                             f"got {self.dtype!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainerConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.kl_target is not None:
            if not self.kl_target > 0:
                raise ValueError(f"TrainerConfig.kl_target must be > 0 or None, got {self.kl_target}")
            if not self.beta > 0:
                raise ValueError("TrainerConfig.beta must be > 0 when kl_target is set (beta is "
                                 "adapted in log space and cannot start at 0)")
            if not 0 < self.beta_min <= self.beta_max:
                raise ValueError(f"TrainerConfig needs 0 < beta_min <= beta_max, got "
                                 f"{self.beta_min}, {self.beta_max}")
        self.adam_betas = tuple(self.adam_betas)


def _distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; initialises the process group under ``torchrun``."""
    if not dist.is_available():
        return 0, 1, 0
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # Tear down what we set up, so that the backend does not abort at interpreter exit.
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    if not dist.is_initialized():
        return 0, 1, 0
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))


class NonLinearGRPOTrainer:
    """Non-linear GRPO / IAMA training of a causal LM.

    Args:
        model: an ``AutoModelForCausalLM`` (the policy; trained in place).
        tokenizer: its tokenizer (one without a pad token is fine).
        objective: the :class:`~iama_kernels.Objective` (a bare transform or criterion means one
            criterion).
        reward_fns: one reward function per criterion, keyed by ``Criterion.name`` (see
            :mod:`iama.rollout` for the signature).
        prompts: the training prompts; each step draws ``prompts_per_step`` of them (with
            replacement) from a generator seeded with ``config.seed``.
        config: a :class:`TrainerConfig`.
        ref_model: the reference policy of the KL term; by default a frozen copy of ``model`` as
            given, made when ``beta > 0`` (construct the trainer from the same base model when
            resuming, so that the reference is the same).
        generator: the sampling engine (default :class:`~iama.rollout.HFGenerator`).

    Raises:
        ValueError: on an inconsistent setup, found at construction: a criterion without reward
            function, ``estimator="unbiased"`` with ``G < n``, a prompt that does not fit the
            model's context together with ``max_new_tokens``, a batch that does not split over
            the ranks, ``scale="batch"`` with micro-batches or several ranks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        objective: Objective | Transform | Criterion,
        reward_fns: Mapping[str, RewardFn],
        prompts: Sequence[str],
        config: TrainerConfig | None = None,
        *,
        ref_model: torch.nn.Module | None = None,
        generator: Generator | None = None,
    ) -> None:
        self.config = config = TrainerConfig() if config is None else config
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        self.objective = as_objective(objective)
        self.reward_fns = dict(reward_fns)
        missing = [n for n in self.objective.names if n not in self.reward_fns]
        extra = [n for n in self.reward_fns if n not in self.objective.names]
        if missing or extra:
            raise ValueError(f"reward_fns must have exactly one function per criterion "
                             f"{list(self.objective.names)}; missing {missing}, unexpected {extra}")
        for name, fn in self.reward_fns.items():
            if not callable(fn):
                raise TypeError(f"reward_fns[{name!r}] must be callable, got {type(fn).__name__}")
        check_group_sizes(self.objective, config.estimator, config.group_size)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty sequence of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
        self.prompts = list(prompts)

        self.rank, self.world_size, local_rank = _distributed()
        B, A = config.prompts_per_step, config.gradient_accumulation_steps
        if B % (self.world_size * A):
            raise ValueError(f"prompts_per_step={B} must be a multiple of world_size * "
                             f"gradient_accumulation_steps = {self.world_size} * {A}")
        if config.scale == "batch" and self.world_size * A > 1:
            raise ValueError("scale='batch' needs the whole batch in one loss call; it is not "
                             "supported with several ranks or gradient_accumulation_steps > 1")
        if config.device is not None:
            self.device = torch.device(config.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")

        self.tokenizer = tokenizer
        self._check_prompt_lengths(model)
        dtype = None if config.dtype is None else _DTYPES[config.dtype]
        self.model = model.to(device=self.device, dtype=dtype)
        needs_ref = config.beta > 0 or config.kl_target is not None
        if ref_model is None and needs_ref:
            ref_model = copy.deepcopy(self.model)
        self.ref_model = None if ref_model is None else ref_model.to(device=self.device, dtype=dtype)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids)
        else:
            self.train_model = self.model
        self.generator = HFGenerator(self.model, tokenizer) if generator is None else generator
        if not isinstance(self.generator, Generator):
            raise TypeError("generator must have a generate(prompts, group_size, ...) method")

        params = [p for p in self.model.parameters() if p.requires_grad]
        if config.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.learning_rate,
                                             weight_decay=config.weight_decay)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0)

        self.step = 0
        self.beta = float(config.beta)
        # Global RNGs (used by reward functions, dropout, user code) start from the seed too.
        random.seed(config.seed + self.rank)
        np.random.seed((config.seed + self.rank) % 2**32)
        torch.manual_seed(config.seed + self.rank)
        # Prompt choice is shared by all ranks (same seed); sampling differs per rank.
        self.prompt_rng = torch.Generator().manual_seed(config.seed)
        self.sample_rng = torch.Generator().manual_seed(config.seed * 1_000_003 + 7919 * (self.rank + 1))
        self.output_dir = Path(config.output_dir)
        self.log_path = self.output_dir / "log.jsonl"
        self._stop_requested = False

    # ------------------------------------------------------------------ setup checks
    def _check_prompt_lengths(self, model: torch.nn.Module) -> None:
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if context is None:
            return
        budget = int(context) - self.config.max_new_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens={self.config.max_new_tokens} leaves no room for a prompt "
                             f"in the model's context of {context} tokens")
        for i, p in enumerate(self.prompts):
            n = len(self.tokenizer(p)["input_ids"])
            if n > budget:
                raise ValueError(f"prompts[{i}] has {n} tokens; with max_new_tokens="
                                 f"{self.config.max_new_tokens} it exceeds the model's context of "
                                 f"{context} tokens (prompt {p[:60]!r})")

    # ------------------------------------------------------------------ distributed helpers
    def _all_reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.world_size > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
            buf = t.to(dev)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op)
            return buf.to(t.device)
        return t

    # ------------------------------------------------------------------ one step
    def _draw_prompts(self) -> list[str]:
        """This rank's prompts: a slice of the global batch drawn from the shared generator."""
        B = self.config.prompts_per_step
        index = torch.randint(len(self.prompts), (B,), generator=self.prompt_rng).tolist()
        per_rank = B // self.world_size
        return [self.prompts[i] for i in index[self.rank * per_rank:(self.rank + 1) * per_rank]]

    def _batch_weights(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduced mean per-criterion values ``[m]`` (float64) and ``lambda = dg/dR`` ``[m]``."""
        cfg = self.config
        local = torch.stack([
            group_values(rewards[..., i], c.transform, estimator=cfg.estimator, impl=cfg.impl)
            for i, c in enumerate(self.objective.criteria)
        ], -1).to(torch.float64)  # [B_local, m]
        sums = torch.cat([local.sum(0), local.new_tensor([local.shape[0]])])
        sums = self._all_reduce(sums)
        values = sums[:-1] / sums[-1]
        return values, self.objective.aggregate.gradient(values)

    def _micro_batches(self, n_groups: int) -> list[list[int]]:
        per = n_groups // self.config.gradient_accumulation_steps
        return [list(range(i * per, (i + 1) * per)) for i in range(self.config.gradient_accumulation_steps)]

    @torch.no_grad()
    def _logprobs_no_grad(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        return sequence_logprobs(model, rollout, batch_size=self.config.logprob_batch_size,
                                 temperature=self.config.temperature)

    def train_step(self) -> dict[str, Any]:
        """Run one training step; returns its metrics (the JSONL record)."""
        cfg = self.config
        start = time.perf_counter()
        G, W = cfg.group_size, self.world_size
        prompts = self._draw_prompts()
        rollout = self.generator.generate(prompts, G, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.temperature, top_p=cfg.top_p,
                                          generator=self.sample_rng)
        if len(rollout.prompts) != len(prompts) * G or rollout.group_size != G:
            raise ValueError(f"generator returned {len(rollout.prompts)} rows for {len(prompts)} "
                             f"prompts x G={G}")
        rollout = _to_device(rollout, self.device)
        rewards = score(rollout, self.reward_fns, self.objective)  # [B_local, G, m]
        values, lam = self._batch_weights(rewards)

        mask = rollout.completion_mask
        lengths = mask.sum(-1).to(torch.float64)
        # Global normalisers: sequences and tokens over every rank.
        counts = torch.tensor([float(mask.shape[0]), float(mask.sum())], dtype=torch.float64)
        counts = self._all_reduce(counts)
        n_seq, n_tok = float(counts[0]), float(counts[1])

        old_logp = self._logprobs_no_grad(self.model, rollout) if cfg.inner_epochs > 1 else None
        # With a reference model the KL is measured (and logged) even when beta is 0.
        ref_logp = None if self.ref_model is None else self._logprobs_no_grad(self.ref_model, rollout)
        groups = self._micro_batches(rewards.shape[0])
        sums = torch.zeros(4, dtype=torch.float64)  # loss, kl*tok, clip*tok, ratio*tok (first epoch)
        grad_norm = None
        self.train_model.train()
        lr = self.scheduler.get_last_lr()[0]
        for epoch in range(cfg.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for j, index in enumerate(groups):
                sub = rollout.select_groups(index)
                rows = torch.tensor([b * G + g for b in index for g in range(G)], device=self.device)
                sync = j == len(groups) - 1
                ctx = contextlib.nullcontext() if sync or W == 1 else self.train_model.no_sync()
                with ctx:
                    logp = sequence_logprobs(self.train_model, sub, temperature=cfg.temperature)
                    out = nonlinear_grpo_loss(
                        logp,
                        None if old_logp is None else old_logp.index_select(0, rows),
                        None if ref_logp is None else ref_logp.index_select(0, rows),
                        sub.completion_mask,
                        rewards[index],
                        self.objective,
                        estimator=cfg.estimator, scale=cfg.scale, eps=cfg.eps,
                        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=self.beta,
                        loss_type=cfg.loss_type, criterion_weights=lam,
                        max_completion_length=cfg.max_new_tokens, ratio_level=cfg.ratio_level,
                        surrogate=cfg.surrogate, tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg,
                        kl_estimator=cfg.kl_estimator,
                        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos,
                        vespo_k_neg=cfg.vespo_k_neg, vespo_lambda_neg=cfg.vespo_lambda_neg,
                        impl=cfg.impl,
                    )
                    tokens = float(sub.completion_mask.sum())
                    # The op normalises over its own rows; rescale to the global batch. DDP then
                    # averages over ranks, hence the factor W.
                    rows_here = sub.completion_mask.shape[0]
                    share = tokens / n_tok if cfg.loss_type == "token" else rows_here / n_seq
                    (out.loss * (W * share)).backward()
                if epoch == 0:
                    sums += torch.tensor([float(out.loss.detach()) * share, float(out.kl) * tokens,
                                          float(out.clip_fraction) * tokens, float(out.ratio_mean) * tokens],
                                         dtype=torch.float64)
            if cfg.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
            self.optimizer.step()
        self.scheduler.step()

        stats = self._all_reduce(torch.cat([
            sums, rewards.to(torch.float64).sum((0, 1)).cpu(), lengths.sum().cpu().reshape(1)]))
        max_len = self._all_reduce(lengths.max().cpu().reshape(1), dist.ReduceOp.MAX if W > 1 else None)
        min_len = self._all_reduce(lengths.min().cpu().reshape(1), dist.ReduceOp.MIN if W > 1 else None)
        loss = float(stats[0])
        kl = float(stats[1]) / n_tok
        beta_used = self.beta
        if cfg.kl_target is not None:
            error = max(-1.0, min(1.0, (kl - cfg.kl_target) / cfg.kl_target))
            self.beta = min(cfg.beta_max, max(cfg.beta_min, self.beta * math.exp(cfg.kl_gain * error)))
        self.step += 1
        elapsed = time.perf_counter() - start
        m = len(self.objective)
        record: dict[str, Any] = {"step": self.step, "loss": loss}
        for i, name in enumerate(self.objective.names):
            record[f"reward/{name}"] = float(stats[4 + i]) / n_seq
            record[f"value/{name}"] = float(values[i])
            record[f"lambda/{name}"] = float(lam[i])
        record.update({
            "objective": float(self.objective.aggregate.value(values)),
            "kl": kl,
            "beta": beta_used,
            "clip_fraction": float(stats[2]) / n_tok,
            "ratio_mean": float(stats[3]) / n_tok,
            "completion_length/mean": float(stats[4 + m]) / n_seq,
            "completion_length/min": float(min_len[0]),
            "completion_length/max": float(max_len[0]),
            "grad_norm": grad_norm,
            "lr": lr,
            "step_time": elapsed,
            "tokens_per_s": n_tok / elapsed if elapsed > 0 else None,
        })
        return record

    # ------------------------------------------------------------------ loop, logging, checkpoints
    def train(self, max_steps: int | None = None, *, resume_from: str | os.PathLike | None = None
              ) -> list[dict[str, Any]]:
        """Train until ``max_steps`` (default ``config.max_steps``) steps in total have run.

        Args:
            max_steps: total number of steps (counting those before a resume).
            resume_from: a checkpoint directory, or ``"latest"`` for the newest one in
                ``output_dir/checkpoints``.

        Returns:
            the metrics of the steps run by this call.

        A first Ctrl-C (SIGINT) finishes the current step, writes a checkpoint and raises
        ``KeyboardInterrupt``; a second one interrupts at once.
        """
        cfg = self.config
        total = cfg.max_steps if max_steps is None else int(max_steps)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_log()
        records = []
        bar = tqdm(total=total, initial=self.step, disable=not cfg.progress or self.rank != 0,
                   desc="iama", dynamic_ncols=True)
        try:
            with self._interruptible():
                while self.step < total:
                    record = self.train_step()
                    records.append(record)
                    if self.rank == 0 and self.step % cfg.log_every == 0:
                        with self.log_path.open("a") as f:
                            f.write(json.dumps(record) + "\n")
                    bar.update(1)
                    bar.set_postfix({k.split("/")[-1] if k.startswith("value/") else k: f"{record[k]:.3g}"
                                     for k in (*[f"value/{n}" for n in self.objective.names], "kl")})
                    if self._should_stop():
                        self.save_checkpoint()
                        raise KeyboardInterrupt(f"interrupted; checkpoint written at step {self.step}")
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                        self.save_checkpoint()
        finally:
            bar.close()
        self.save_checkpoint()
        return records

    def request_stop(self) -> None:
        """Ask the loop to checkpoint and stop after the current step (what SIGINT does)."""
        self._stop_requested = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        # Every rank must agree, or the ranks would deadlock in the next collective.
        return bool(self._all_reduce(flag, dist.ReduceOp.MAX if self.world_size > 1 else None)[0] > 0)

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self._stop_requested = False

    def _truncate_log(self) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be run again)."""
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= self.step]
        if len(kept) != len(lines):
            self.log_path.write_text("".join(line + "\n" for line in kept))

    def checkpoint_dir(self, step: int | None = None) -> Path:
        return self.output_dir / "checkpoints" / f"step-{self.step if step is None else step:06d}"

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write model, optimizer, scheduler, beta, step and every RNG state.

        Layout: ``trainer.pt`` (written by rank 0) and ``rng-rank<r>.pt`` (one per rank); the
        file ``checkpoints/latest`` names the newest directory.
        """
        path = self.checkpoint_dir() if path is None else Path(path)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            torch.save({
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "beta": self.beta,
                "step": self.step,
                "prompt_rng": self.prompt_rng.get_state(),
                "config": dataclasses.asdict(self.config),
            }, path / "trainer.pt")
        if self.world_size > 1:
            dist.barrier()
        path.mkdir(parents=True, exist_ok=True)
        torch.save({
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "sample_rng": self.sample_rng.get_state(),
        }, path / f"rng-rank{self.rank}.pt")
        if self.world_size > 1:
            dist.barrier()
        if self.rank == 0:
            (path.parent / "latest").write_text(path.name + "\n")
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore what :meth:`save_checkpoint` wrote (``"latest"``: the newest checkpoint)."""
        if str(path) == "latest":
            pointer = self.output_dir / "checkpoints" / "latest"
            if not pointer.exists():
                raise FileNotFoundError(f"no checkpoint to resume from in {pointer.parent}")
            path = pointer.parent / pointer.read_text().strip()
        path = Path(path)
        if not (path / "trainer.pt").exists():
            raise FileNotFoundError(f"{path} holds no trainer.pt checkpoint")
        state = torch.load(path / "trainer.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.beta = float(state["beta"])
        self.step = int(state["step"])
        self.prompt_rng.set_state(state["prompt_rng"].cpu())
        rng_file = path / f"rng-rank{self.rank}.pt"
        if not rng_file.exists():
            raise FileNotFoundError(f"{rng_file} missing: resume with the same number of ranks")
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        self.sample_rng.set_state(rng["sample_rng"])


def _to_device(rollout: Rollout, device: torch.device) -> Rollout:
    if rollout.completion_ids.device == device:
        return rollout
    return dataclasses.replace(
        rollout,
        prompt_ids=rollout.prompt_ids.to(device), prompt_mask=rollout.prompt_mask.to(device),
        completion_ids=rollout.completion_ids.to(device),
        completion_mask=rollout.completion_mask.to(device),
    )

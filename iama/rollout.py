"""Rollouts: sample G completions per prompt, score them per criterion, compute their log-probs.

The trainer and the evaluator only talk to a :class:`Generator` (a one-method protocol), so a
faster engine can replace :class:`HFGenerator` (batched ``model.generate`` with a KV cache).
Rows are always group-major: row ``b * G + g`` is sample ``g`` of prompt ``b``, the layout
:func:`iama_kernels.nonlinear_grpo_loss` expects.

Reward functions are plain callables, one per criterion, keyed by ``Criterion.name``::

    def reward(prompts: list[str], completions: list[str], ids: list[list[int]]) -> torch.Tensor

``ids[i]`` are the completion's token ids up to and including the first EOS (exactly the tokens
under ``completion_mask``); the result is ``[N]`` float, one reward per completion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from iama_kernels.objectives import Criterion, Objective, Transform, as_objective

__all__ = [
    "Generator",
    "HFGenerator",
    "RewardFn",
    "Rollout",
    "completion_lengths",
    "eos_token_ids",
    "pad_token_id",
    "score",
    "sequence_logprobs",
]

RewardFn = Callable[[list[str], list[str], list[list[int]]], torch.Tensor]


@dataclass
class Rollout:
    """G sampled completions for each of B prompts, group-major (row ``b * G + g``).

    Attributes:
        prompts: ``[B*G]`` prompt strings, each repeated ``G`` times.
        prompt_ids: ``[B*G, P]`` int64 prompt token ids, left-padded.
        prompt_mask: ``[B*G, P]`` bool, True on real prompt tokens.
        completion_ids: ``[B*G, T]`` int64 completion token ids, right-padded after the first EOS.
        completion_mask: ``[B*G, T]`` bool, True on tokens up to and including the first EOS.
        completions: ``[B*G]`` decoded completions (special tokens skipped).
        group_size: ``G``.
    """

    prompts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    completions: list[str]
    group_size: int

    @property
    def num_groups(self) -> int:
        """``B``, the number of prompts."""
        return len(self.prompts) // self.group_size

    def completion_token_lists(self) -> list[list[int]]:
        """The completion ids under the mask, one list per row (EOS included when sampled)."""
        return [ids[m].tolist() for ids, m in zip(self.completion_ids, self.completion_mask, strict=True)]

    def select_groups(self, groups: Sequence[int] | slice) -> Rollout:
        """The rollout restricted to some groups (whole groups only; rows stay group-major)."""
        G = self.group_size
        index = range(self.num_groups)[groups] if isinstance(groups, slice) else list(groups)
        rows = [b * G + g for b in index for g in range(G)]
        t = torch.tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        return Rollout(
            prompts=[self.prompts[r] for r in rows],
            prompt_ids=self.prompt_ids.index_select(0, t),
            prompt_mask=self.prompt_mask.index_select(0, t),
            completion_ids=self.completion_ids.index_select(0, t),
            completion_mask=self.completion_mask.index_select(0, t),
            completions=[self.completions[r] for r in rows],
            group_size=G,
        )


@runtime_checkable
class Generator(Protocol):
    """Anything that samples ``group_size`` completions per prompt and returns a :class:`Rollout`."""

    def generate(
        self,
        prompts: list[str],
        group_size: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout: ...


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def eos_token_ids(model: torch.nn.Module, tokenizer: object) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids plus the tokenizer's."""
    ids: list[int] = []
    config = getattr(_unwrap(model), "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("tokenizer: no EOS token (neither the tokenizer nor the model's "
                         "generation_config define eos_token_id); completions could never end")
    return ids


def pad_token_id(tokenizer: object, eos_ids: Sequence[int]) -> int:
    """The tokenizer's pad id, or the first EOS id when it has none (the tokenizer is not changed)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(eos_ids[0]) if pad is None else int(pad)


def first_eos_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """``[N, T]`` bool: True on tokens up to and including the first EOS of each row."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS strictly before this token
    return eos_before == 0


def completion_lengths(rollout: Rollout) -> torch.Tensor:
    """``[B*G]`` int64 number of tokens under ``completion_mask`` (EOS included when sampled)."""
    return rollout.completion_mask.sum(-1)


@contextlib.contextmanager
def _seeded_global_rng(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run a block that draws from the global torch RNG (as ``model.generate`` does) under a seed
    taken from ``generator``, leaving the global RNG state untouched; without a generator the
    global RNG is used and advanced as usual."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


class HFGenerator:
    """Batched sampling with a Hugging Face causal LM's ``generate`` (KV cache on).

    Args:
        model: an ``AutoModelForCausalLM`` (a DDP wrapper is unwrapped).
        tokenizer: its tokenizer. One without a pad token is handled (the first EOS id pads,
            and the tokenizer itself is not modified).
        device: where the prompts go; defaults to the model's device.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: object, *,
                 device: torch.device | str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._device = None if device is None else torch.device(device)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        return next(_unwrap(self.model).parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``[len(prompts), P]`` int64 ids and bool mask (special tokens as the
        tokenizer adds them)."""
        encoded = [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompts[{i}] = {prompts[i]!r} encodes to no token")
        P = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), P), dtype=torch.bool)
        for i, row in enumerate(encoded):
            ids[i, P - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, P - len(row):] = True
        return ids.to(self.device), mask.to(self.device)

    def generate(
        self,
        prompts: list[str],
        group_size: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample ``group_size`` completions per prompt.

        Args:
            prompts: ``B`` prompt strings.
            group_size: ``G >= 1``.
            max_new_tokens: at most this many completion tokens (EOS included).
            temperature: ``> 0`` samples at this temperature; ``0`` decodes greedily.
            top_p: nucleus sampling threshold in ``(0, 1]``.
            generator: if given, the sampling seed is drawn from it (and the global torch RNG is
                left as it was), so a run is reproducible from the generator's state alone.

        Returns:
            a group-major :class:`Rollout` with ``T <= max_new_tokens`` completion columns.
        """
        if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        prompts = list(prompts)
        ids, mask = self.encode_prompts(prompts)
        ids = ids.repeat_interleave(group_size, 0)  # group-major: b*G + g
        mask = mask.repeat_interleave(group_size, 0)
        model = _unwrap(self.model)
        sampling = temperature > 0
        options = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0) \
            if sampling else dict(do_sample=False)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _seeded_global_rng(generator, ids.device):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask.long(),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_ids,
                    use_cache=True,
                    **options,
                )
        finally:
            model.train(was_training)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        completion_ids = sequences[:, ids.shape[1]:].contiguous()
        completion_mask = first_eos_mask(completion_ids, self.eos_ids)
        completion_ids = completion_ids.masked_fill(~completion_mask, self.pad_id)
        # Drop the columns no row uses (every row ended earlier).
        width = int(completion_mask.sum(-1).max().item()) if completion_mask.numel() else 0
        completion_ids = completion_ids[:, :max(width, 1)]
        completion_mask = completion_mask[:, :max(width, 1)]
        texts = self.tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(completion_ids, completion_mask, strict=True)],
            skip_special_tokens=True
        )
        return Rollout(
            prompts=[p for p in prompts for _ in range(group_size)],
            prompt_ids=ids,
            prompt_mask=mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            completions=list(texts),
            group_size=group_size,
        )


def score(
    rollout: Rollout,
    reward_fns: Mapping[str, RewardFn],
    objective: Objective | Transform | Criterion,
) -> torch.Tensor:
    """Call one reward function per criterion and stack the results.

    Args:
        rollout: the samples to score (``N = B*G`` rows).
        reward_fns: ``{criterion name: fn(prompts, completions, completion_ids) -> [N] float}``;
            must hold a function for every criterion of ``objective``.
        objective: the training objective; its criteria order the last axis.

    Returns:
        ``[B, G, m]`` float32 rewards on the rollout's device.

    Raises:
        ValueError: a missing function, a function that raises, returns the wrong shape, or
            returns NaN/inf; the message names the criterion and the offending prompt.
    """
    objective = as_objective(objective)
    missing = [n for n in objective.names if n not in reward_fns]
    if missing:
        raise ValueError(f"reward_fns: no reward function for criterion {missing[0]!r} "
                         f"(criteria: {list(objective.names)}, functions: {list(reward_fns)})")
    N = len(rollout.prompts)
    G = rollout.group_size
    ids = rollout.completion_token_lists()
    columns = []
    for name in objective.names:
        try:
            r = reward_fns[name](list(rollout.prompts), list(rollout.completions), ids)
        except Exception as error:
            raise _locate_failure(reward_fns[name], name, rollout, ids, error) from error
        try:
            r = torch.as_tensor(r)
        except Exception as error:
            raise ValueError(f"reward function for criterion {name!r} returned {type(r).__name__}, "
                             f"not a tensor of {N} floats") from error
        if r.dim() == 2 and r.shape[-1] == 1:
            r = r.squeeze(-1)
        if tuple(r.shape) != (N,):
            raise ValueError(f"reward function for criterion {name!r} returned shape {tuple(r.shape)}, "
                             f"expected [{N}] (one reward per completion; prompt {rollout.prompts[0]!r})")
        if r.is_complex() or r.dtype == torch.bool:
            raise ValueError(f"reward function for criterion {name!r} returned dtype {r.dtype}, "
                             "expected real numbers")
        r = r.detach().to(device=rollout.completion_ids.device, dtype=torch.float32)
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"reward function for criterion {name!r} returned {r[i].item()} for "
                             f"prompt {rollout.prompts[i]!r} (completion {rollout.completions[i]!r}, "
                             f"row {i}); rewards must be finite")
        columns.append(r)
    return torch.stack(columns, -1).reshape(N // G, G, len(columns))


def _locate_failure(fn: RewardFn, name: str, rollout: Rollout, ids: list[list[int]],
                    error: Exception) -> ValueError:
    """The error for a reward function that raised on a batch: re-run it one group at a time (only
    on this failure path) so that the message can name the prompt it fails on."""
    G = rollout.group_size
    for b in range(rollout.num_groups):
        rows = slice(b * G, (b + 1) * G)
        try:
            fn(rollout.prompts[rows], rollout.completions[rows], ids[rows])
        except Exception as inner:
            return ValueError(f"reward function for criterion {name!r} raised {type(inner).__name__}: "
                              f"{inner} (on prompt {rollout.prompts[b * G]!r})")
    return ValueError(f"reward function for criterion {name!r} raised {type(error).__name__}: {error} "
                      f"(on a batch of {rollout.num_groups} prompts starting with {rollout.prompts[0]!r}; "
                      "each prompt alone succeeds)")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch, as ``generate`` computes them from the mask."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(
    model: torch.nn.Module,
    rollout: Rollout,
    *,
    batch_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs of the sampled completion tokens under ``model``.

    Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for old/reference log-probs).

    Args:
        model: a causal LM (or a DDP wrapper of one) returning ``.logits``.
        rollout: the samples.
        batch_size: rows per forward pass (default: all at once).
        temperature: logits are divided by it first (use the sampling temperature so that the
            ratio is with respect to the distribution that sampled; ``0`` counts as 1).

    Returns:
        ``[B*G, T]`` float32 log-probs; entries outside ``completion_mask`` are meaningless.
    """
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    # Attend to every completion column: tokens after EOS only affect positions we ignore.
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_mask)], 1)
    positions = _positions(mask)
    P = rollout.prompt_ids.shape[1]
    T = rollout.completion_ids.shape[1]
    N = ids.shape[0]
    step = N if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inv_temperature = 1.0 / temperature if temperature > 0 else 1.0
    pieces = []
    for start in range(0, N, step):
        sl = slice(start, start + step)
        logits = model(input_ids=ids[sl], attention_mask=mask[sl].long(), position_ids=positions[sl],
                       use_cache=False).logits
        # The logit at position P-1+t predicts completion token t.
        logits = logits[:, P - 1:P - 1 + T].float()
        if inv_temperature != 1.0:
            logits = logits * inv_temperature
        target = rollout.completion_ids[sl].unsqueeze(-1)
        pieces.append(logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, -1))
    return torch.cat(pieces, 0)

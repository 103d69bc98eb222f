"""Reward functions: the paper's length reward and a wrapper around a learned reward model.

Both follow the reward-function convention of :mod:`iama.rollout`::

    reward(prompts: list[str], completions: list[str], ids: list[list[int]]) -> torch.Tensor  # [N]

where ``ids[i]`` are completion ``i``'s token ids up to and including its first EOS.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["LENGTH_UNITS", "LengthReward", "RewardModel"]

LENGTH_UNITS = ("tokens", "characters", "words")


def _check_batch(prompts: object, completions: object, completion_ids: object, *, need_ids: bool) -> int:
    """Validate the three reward-function arguments; returns ``N``."""
    for name, value in (("prompts", prompts), ("completions", completions)):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"prompts has {len(prompts)} entries but completions has {n}")
    if need_ids and completion_ids is None:
        raise ValueError("completion_ids is needed (the token ids of each completion), got None")
    if completion_ids is not None:
        if isinstance(completion_ids, (str, torch.Tensor)) or not isinstance(completion_ids, Sequence):
            raise TypeError("completion_ids must be a list of token-id lists, got "
                            f"{type(completion_ids).__name__}")
        if len(completion_ids) != n:
            raise ValueError(f"completion_ids has {len(completion_ids)} entries but completions has {n}")
    return n


class LengthReward:
    """The length reward of the paper's Sec. 6.1: ``r = -((len - target) / scale)^2``.

    Args:
        target: the preferred length ``L`` (in ``unit``), a finite float.
        scale: the length scale, a finite float > 0 (the paper uses 256 tokens).
        unit: how the length of a completion is measured: ``"tokens"`` (the number of completion
            token ids, EOS included when it was sampled: exactly the tokens the policy produced),
            ``"characters"`` (``len`` of the decoded text) or ``"words"`` (whitespace-separated
            words of the decoded text).

    Calling it returns ``[N]`` float32 rewards, all ``<= 0`` with 0 exactly at ``len == target``.
    """

    def __init__(self, target: float, scale: float = 256.0, unit: str = "tokens") -> None:
        for name, value in (("target", target), ("scale", scale)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"LengthReward: {name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"LengthReward: {name} must be finite, got {value}")
        if scale <= 0:
            raise ValueError(f"LengthReward: scale must be > 0, got {scale}")
        if unit not in LENGTH_UNITS:
            raise ValueError(f"LengthReward: unit must be one of {LENGTH_UNITS}, got {unit!r}")
        self.target = float(target)
        self.scale = float(scale)
        self.unit = unit

    def __repr__(self) -> str:
        return f"LengthReward(target={self.target:g}, scale={self.scale:g}, unit={self.unit!r})"

    def lengths(
        self, completions: Sequence[str], completion_ids: Sequence[Sequence[int]] | None
    ) -> list[int]:
        """The length of each completion in ``self.unit`` (``completion_ids`` needed for tokens)."""
        if self.unit == "tokens":
            if completion_ids is None:
                raise ValueError("LengthReward(unit='tokens') needs completion_ids")
            return [len(ids) for ids in completion_ids]
        if self.unit == "characters":
            return [len(text) for text in completions]
        return [len(text.split()) for text in completions]

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """``[N]`` float32 rewards ``-((len - target) / scale)^2``."""
        _check_batch(prompts, completions, completion_ids, need_ids=self.unit == "tokens")
        # float64 for the arithmetic so that the float32 result is the correctly rounded value.
        lengths = torch.tensor(self.lengths(completions, completion_ids), dtype=torch.float64)
        return (-((lengths - self.target) / self.scale) ** 2).to(torch.float32)


class RewardModel:
    """A sequence-classification reward model as a reward function.

    ``RewardModel(model, tokenizer)(prompts, completions, ids)`` scores each (prompt, completion)
    pair with one forward pass of ``model`` (batched, under ``torch.inference_mode``) and returns
    the logit of class ``label_index``.

    Args:
        model: an ``AutoModelForSequenceClassification`` (anything whose output has ``.logits`` of
            shape ``[batch, num_labels]``). It is put in eval mode.
        tokenizer: its tokenizer. Without a pad token, the EOS token (else UNK) pads, and the
            model's ``config.pad_token_id`` is set to it when unset, because Hugging Face
            sequence classifiers locate the last real token through that id.
        label_index: which logit is the reward (``0`` for the usual one-label reward models).
        batch_size: pairs per forward pass.
        chat_template: ``True`` formats each pair as a user turn (the prompt) and an assistant
            turn (the completion) with the tokenizer's chat template; ``False`` scores the plain
            concatenation ``prompt + separator + completion`` (tokenised with special tokens).
        separator: inserted between prompt and completion when ``chat_template=False``.
        max_length: if set, longer inputs keep their last ``max_length`` tokens (the end of the
            completion is where a causal reward model reads its score).
        device: where inputs go; defaults to the model's device.

    Returns (on call):
        ``[N]`` float32 rewards on the CPU.

    Note:
        Inputs are right-padded with the pad id. As in every Hugging Face sequence classifier, a
        text whose own last token equals the pad id is read at its last token that is not the
        pad id; pick a pad token that texts do not end with when this matters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        *,
        label_index: int = 0,
        batch_size: int = 16,
        chat_template: bool = False,
        separator: str = "",
        max_length: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"RewardModel: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"RewardModel: tokenizer must be a Hugging Face tokenizer, got {tokenizer!r}")
        for name, value, low in (("label_index", label_index, 0), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"RewardModel: {name} must be an int >= {low}, got {value!r}")
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels is not None and label_index >= num_labels:
            raise ValueError(f"RewardModel: label_index={label_index} but the model has {num_labels} labels")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"RewardModel: max_length must be None or an int >= 1, got {max_length!r}")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("RewardModel: chat_template=True but the tokenizer has no chat template")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label_index = int(label_index)
        self.batch_size = int(batch_size)
        self.chat_template = bool(chat_template)
        self.separator = str(separator)
        self.max_length = max_length
        self._device = None if device is None else torch.device(device)
        self.pad_id = self._resolve_pad_id()

    def _resolve_pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            for fallback in ("eos_token_id", "unk_token_id"):
                pad = getattr(tok, fallback, None)
                if isinstance(pad, (list, tuple)):
                    pad = pad[0] if pad else None
                if pad is not None:
                    break
        config = getattr(self.model, "config", None)
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        if pad is None:
            raise ValueError("RewardModel: the tokenizer has no pad, EOS or UNK token and the model "
                             "config has no pad_token_id; set tokenizer.pad_token first")
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = int(pad)  # the classifier finds the last real token through it
        return int(pad)

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        param = next(self.model.parameters(), None)
        return torch.device("cpu") if param is None else param.device

    def encode(self, prompt: str, completion: str) -> list[int]:
        """The token ids the model scores for one (prompt, completion) pair."""
        if self.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.tokenizer(prompt + self.separator + completion)["input_ids"])
        if not ids:
            raise ValueError(f"RewardModel: prompt {prompt!r} with completion {completion!r} encodes to "
                             "no token")
        if self.max_length is not None and len(ids) > self.max_length:
            ids = ids[-self.max_length:]
        return ids

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """``[N]`` float32 rewards (the ``label_index`` logit) on the CPU; ``completion_ids`` unused."""
        n = _check_batch(prompts, completions, completion_ids, need_ids=False)
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        # Batch similar lengths together: less padding, and the result does not depend on order.
        order = sorted(range(n), key=lambda i: len(encoded[i]))
        out = torch.empty(n, dtype=torch.float32)
        device = self.device
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                rows = order[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for k, i in enumerate(rows):  # right padding: positions are the natural ones
                    ids[k, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[k, :len(encoded[i])] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                if logits.dim() != 2 or logits.shape[0] != len(rows):
                    raise ValueError("RewardModel: the model returned logits of shape "
                                     f"{tuple(logits.shape)}, expected [{len(rows)}, num_labels]")
                out[torch.tensor(rows)] = logits[:, self.label_index].float().cpu()
        return out

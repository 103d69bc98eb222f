"""LengthReward against its formula; RewardModel against a hand-computed forward pass of tiny,
randomly initialised sequence classifiers (Llama: rotary positions; GPT-2: absolute positions)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from iama.rewards import LengthReward, RewardModel
from iama.tiny import build_tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# LengthReward
# ---------------------------------------------------------------------------------------------


def test_length_reward_tokens_matches_formula() -> None:
    ids = [[5] * k for k in (0, 1, 12, 50, 77, 300)]
    completions = ["x"] * len(ids)
    reward = LengthReward(target=50, scale=256)
    r = reward(["p"] * len(ids), completions, ids)
    expected = torch.tensor([-((k - 50) / 256) ** 2 for k in (0, 1, 12, 50, 77, 300)], dtype=torch.float64)
    assert r.shape == (6,) and r.dtype == torch.float32
    torch.testing.assert_close(r, expected.float(), rtol=0, atol=0)  # correctly rounded from float64
    assert r[3].item() == 0.0 and bool((r <= 0).all())


def test_length_reward_characters_and_words() -> None:
    completions = ["", "ab", "one two  three", " spaced   words here "]
    prompts = ["p"] * 4
    chars = LengthReward(4, scale=2, unit="characters")(prompts, completions, None)
    words = LengthReward(2, scale=1, unit="words")(prompts, completions)
    torch.testing.assert_close(chars, torch.tensor([-(((len(c) - 4) / 2) ** 2) for c in completions]))
    torch.testing.assert_close(words, torch.tensor([-4.0, -1.0, -1.0, -1.0]))
    assert LengthReward(2, unit="words").lengths(completions, None) == [0, 1, 3, 3]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(target=10, scale=0), ValueError),
        (dict(target=10, scale=-1), ValueError),
        (dict(target=float("nan")), ValueError),
        (dict(target="10"), TypeError),
        (dict(target=10, unit="bytes"), ValueError),
    ],
)
def test_length_reward_rejects_bad_arguments(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        LengthReward(**kwargs)


def test_length_reward_rejects_bad_batches() -> None:
    reward = LengthReward(3)
    with pytest.raises(ValueError, match="completion_ids"):
        reward(["p"], ["c"], None)  # tokens need ids
    with pytest.raises(ValueError, match="prompts has 2"):
        reward(["p", "q"], ["c"], [[1]])
    with pytest.raises(ValueError, match="completion_ids has 2"):
        reward(["p"], ["c"], [[1], [2]])
    with pytest.raises(TypeError, match="completions"):
        reward(["p"], "c", [[1]])


# ---------------------------------------------------------------------------------------------
# RewardModel
# ---------------------------------------------------------------------------------------------

PROMPTS = ["tell a story about the cat", "say one", "write a poem about the big blue sea and the sun",
           "look", "tell a story about the cat"]
COMPLETIONS = ["the cat runs fast", "two three", "red", "the dog and the bird sing about a green tree",
               "the cat runs fast"]


def _llama(tokenizer, num_labels: int = 2) -> LlamaForSequenceClassification:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(config)


def _gpt2(tokenizer, num_labels: int = 1) -> GPT2ForSequenceClassification:
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    return GPT2ForSequenceClassification(config)


def _oracle(model, tokenizer, prompt: str, completion: str, label: int, separator: str = "") -> float:
    """Score one pair by hand: backbone on the unpadded ids, classifier head on the last position."""
    ids = torch.tensor([tokenizer(prompt + separator + completion)["input_ids"]])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, -1]
        return float(model.score(hidden)[0, label])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_reward_model_matches_unpadded_forward(arch: str, batch_size: int) -> None:
    tok = build_tiny_tokenizer()
    model = _llama(tok) if arch == "llama" else _gpt2(tok)
    label = 1 if arch == "llama" else 0
    reward = RewardModel(model, tok, label_index=label, batch_size=batch_size, separator=" ")
    r = reward(PROMPTS, COMPLETIONS, [[0]] * len(PROMPTS))
    expected = torch.tensor([_oracle(model, tok, p, c, label, " ")
                             for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    assert r.shape == (len(PROMPTS),) and r.dtype == torch.float32 and r.device.type == "cpu"
    # float32 forward passes of different batch shapes: agreement to rounding error.
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-5)
    # The same pair scores the same (to rounding) wherever it sits in the batch.
    torch.testing.assert_close(r[0], r[4], rtol=1e-6, atol=1e-6)
    gaps = (r[:4, None] - r[None, :4]).abs() + torch.eye(4)
    assert bool((gaps > 1e-4).all())  # a random model tells different texts apart


def test_reward_model_without_pad_token_uses_eos() -> None:
    tok = build_tiny_tokenizer(pad_token=False)
    assert tok.pad_token_id is None
    model = _llama(tok)
    assert model.config.pad_token_id is None
    reward = RewardModel(model, tok, batch_size=8, separator=" ")
    assert reward.pad_id == tok.eos_token_id and model.config.pad_token_id == tok.eos_token_id
    r = reward(PROMPTS, COMPLETIONS)
    expected = torch.tensor([_oracle(model, tok, p, c, 0, " ")
                             for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    torch.testing.assert_close(r, expected, rtol=1e-5, atol=1e-5)


def test_reward_model_chat_template_and_truncation() -> None:
    tok = build_tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}say {% else %}tell {% endif %}"
                         "{{ m['content'] }} {% endfor %}")
    model = _gpt2(tok)
    reward = RewardModel(model, tok, chat_template=True)
    expected_ids = tok("say the cat tell a dog", add_special_tokens=False)["input_ids"]
    assert reward.encode("the cat", "a dog") == expected_ids
    truncated = RewardModel(model, tok, chat_template=True, max_length=3)
    assert truncated.encode("the cat", "a dog") == expected_ids[-3:]
    r = reward(["the cat", "one"], ["a dog", "two three"])
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([expected_ids])).last_hidden_state[:, -1]
    torch.testing.assert_close(r[0], model.score(hidden)[0, 0].detach(), rtol=1e-5, atol=1e-5)


def test_reward_model_rejects_bad_arguments() -> None:
    tok = build_tiny_tokenizer()
    model = _llama(tok, num_labels=2)
    with pytest.raises(ValueError, match="label_index=2"):
        RewardModel(model, tok, label_index=2)
    with pytest.raises(ValueError, match="batch_size"):
        RewardModel(model, tok, batch_size=0)
    with pytest.raises(ValueError, match="chat template"):
        RewardModel(model, tok, chat_template=True)
    with pytest.raises(TypeError, match="model"):
        RewardModel("model", tok)
    with pytest.raises(ValueError, match="prompts has 1"):
        RewardModel(model, tok)(["a"], ["b", "c"])

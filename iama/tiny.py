"""A tiny Llama-style causal LM and a word-level tokenizer, built locally (no download).

Used by the tests and by ``iama demo length``: one token is one word, so a completion's length in
tokens is its number of words (plus the EOS it ends with).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["WORDS", "build_tiny_model", "build_tiny_tokenizer"]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# A small closed vocabulary: prompts and completions are made of these words.
WORDS = (
    "the", "a", "one", "two", "three", "red", "blue", "green", "cat", "dog", "bird", "fish",
    "tree", "sun", "moon", "star", "sky", "sea", "run", "jump", "sing", "talk", "walk", "look",
    "big", "small", "fast", "slow", "write", "say", "tell", "about", "story", "poem",
)


def build_tiny_tokenizer(words: tuple[str, ...] | list[str] = WORDS, *, pad_token: bool = True
                         ) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` plus ``<pad> <s> </s> <unk>``.

    Encoding prepends ``<s>``; decoding joins words with spaces. With ``pad_token=False`` the
    tokenizer has no pad token (to exercise the code paths for such tokenizers).
    """
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    kwargs = dict(bos_token=BOS, eos_token=EOS, unk_token=UNK)
    if pad_token:
        kwargs["pad_token"] = PAD
    return PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-style model sized for ``tokenizer`` (float32, CPU).

    Initialisation draws from a private generator seeded with ``seed``, so the same arguments
    always give the same weights and the global RNG is left alone.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model

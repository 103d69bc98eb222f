"""The CUDA device a Triton launch goes to."""

from __future__ import annotations

import contextlib

import torch


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for the launches inside the ``with`` block.

    Triton launches a kernel on the *current* CUDA device and that device's current stream, not on
    the device of the tensors passed to it (triton-lang/triton#2441): with ``cuda:0`` current,
    tensors on ``cuda:1`` would be handed to a kernel running on the wrong device. PyTorch's own
    ops follow their tensors' device, so the Triton ops do too. CPU tensors (the interpreter) need
    nothing.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()

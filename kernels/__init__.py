"""Triton kernels of mmfast, one per file, each with its PyTorch reference beside it.

Installed as ``mmfast.kernels``. Kernels are defined lazily by their modules so that importing
mmfast never requires Triton; set TRITON_INTERPRET=1 before importing a kernel module to run it
on the CPU under Triton's interpreter.
"""
import contextlib

import torch


def on_device(device: torch.device):
    """The context every kernel launch runs under: Triton launches on the *current* CUDA device
    and its current stream, so the tensors' device is made current (logits on cuda:1 while cuda:0
    is current would otherwise run on the wrong device, unordered with the tensors' stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

"""Which implementation runs an op: Triton, the native extension, or plain PyTorch.

- Ops of the native extension (``mmfast._C``, e.g. ``grad_modulate_``) are torch custom ops:
  torch's dispatcher picks their CPU or CUDA kernel from the tensors' device.
- Ops with a Triton kernel (``mmfast.kernels``) take
  ``backend="auto" | "triton" | "native" | "torch"``: ``auto`` runs Triton on CUDA tensors and
  the extension's CPU kernel on CPU tensors (PyTorch where neither exists); ``triton`` forces the
  Triton kernel, which on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` set
  before ``mmfast.kernels`` is first imported; slow, for tests); ``native`` forces the C++
  kernel; ``torch`` forces the vectorised PyTorch path (the kernels' reference, runs anywhere).
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "native", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """Whether Triton kernels are (to be) defined for the interpreter, which runs on the CPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose_backend(op: str, device: torch.device, backend: str = "auto", *,
                   native_devices: tuple[str, ...] = ("cpu",)) -> str:
    """'triton', 'native' or 'torch' for running `op` on tensors on `device`; `native_devices`
    lists the device types the op's C++ kernels cover. Raises ValueError naming the op when the
    requested backend cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    has_native = device.type in native_devices
    on_gpu = device.type == "cuda"
    if backend == "torch":
        return "torch"
    if backend == "native":
        if not has_native:
            raise ValueError(f"{op}: backend='native' has kernels for {native_devices} tensors, not {device}")
        return "native"
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend='triton' needs the triton package")
        if not (on_gpu or triton_interpreted()):
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                             f"mmfast.kernels is imported (got tensors on {device})")
        return "triton"
    if on_gpu and triton_available():
        return "triton"
    return "native" if has_native else "torch"

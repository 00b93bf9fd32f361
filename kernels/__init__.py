"""Triton kernels of mmfast, one per file, each with its PyTorch reference beside it.

Installed as ``mmfast.kernels``. Kernels are defined lazily by their modules so that importing
mmfast never requires Triton; set TRITON_INTERPRET=1 before importing a kernel module to run it
on the CPU under Triton's interpreter.
"""

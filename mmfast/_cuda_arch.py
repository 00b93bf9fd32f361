"""Which CUDA architectures the extension is compiled for (TORCH_CUDA_ARCH_LIST), by default.

Loaded by setup.py from its path (before mmfast is importable) and by the tests; depends on
nothing but torch, imported lazily.

Default: the architectures of the installed torch's own build, so that mmfast runs wherever
torch does ("no kernel image" otherwise: sm_90 code does not run on an A100, L4 or RTX 30/40),
with PTX of the newest for GPUs newer than all of them. torch reports its list even without a
GPU (torch.cuda.get_arch_list() returns [] then, the underlying flags do not).
"""
from __future__ import annotations

import os
import re

ENV = "TORCH_CUDA_ARCH_LIST"
# Ampere (A100; RTX 30, A10), Ada (L4, RTX 40), Hopper, Blackwell (B200; RTX 50), + PTX.
FALLBACK = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def parse_arch_flags(flags: str) -> list[str]:
    """['7.5', '9.0', '10.0', '9.0a', ...] from torch's arch flags ('sm_75 sm_90 sm_100 sm_90a
    compute_120'), ordered by version; compute_* (PTX) entries are left out."""
    archs = set()
    for flag in flags.split():
        match = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", flag)
        if match:
            archs.add((int(match[1]), int(match[2]), match[3]))
    return [f"{major}.{minor}{suffix}" for major, minor, suffix in sorted(archs)]


def torch_arch_list() -> list[str]:
    """The architectures the installed torch was compiled for ([] for a CPU-only torch)."""
    import torch

    if torch.version.cuda is None:
        return []
    try:
        flags = torch._C._cuda_getArchFlags()
    except (AttributeError, RuntimeError):
        return []
    return parse_arch_flags(flags or "")


def default_arch_list() -> tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST value, where it came from: 'env', 'torch' or 'fallback')."""
    override = os.environ.get(ENV, "").strip()
    if override:
        return override, "env"
    archs = torch_arch_list()
    if archs:
        # PTX of the newest plain architecture ('a' variants have no forward-compatible PTX).
        plain = [a for a in archs if a[-1].isdigit()]
        if plain:
            archs[archs.index(plain[-1])] += "+PTX"
        return ";".join(archs), "torch"
    return FALLBACK, "fallback"

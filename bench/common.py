"""Shared helpers of the bench scripts: timing, machine description, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int = 3, repeat: int = 20) -> dict:
    """Median and spread of fn()'s wall time in milliseconds (synchronising CUDA around it)."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "repeat": repeat}


def vector_isa() -> str:
    """"AVX-512" or "AVX2" (x86; the noise kernel runs about 2x slower on AVX2), else the
    architecture: figures from the two kinds of x86 machine differ, so every report names it."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    return "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else platform.machine()


def describe(m: dict) -> str:
    """One line naming the machine of a report (markdown tables' header)."""
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    return f"{m['cpu']}, {m['cores']} cores, {m.get('vector_isa', '?')}, torch {m['torch']}, {gpu}"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "vector_isa": vector_isa(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")

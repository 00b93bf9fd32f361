"""Fused OGM-GE gradient modulation vs the research code's per-tensor PyTorch loop.

Gradients: the conv weights of two ResNet-18 encoders (audio: 1 input channel, visual: 3), the
tensors the reference method modulates, contiguous and in channels_last (the layout of a model
trained with torch.channels_last). Both implementations run in this one process, side by side, on
the same tensors; the speedup is the ratio of their median times. The fused op is also timed with
its step counter as a device tensor (the form a compiled or CUDA-graph-captured step uses).

    python bench/grad_modulation.py [--device cpu|cuda] [--dtype float32] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_fn, write_json  # noqa: E402

import mmfast  # noqa: E402
from mmfast.models import resnet18_encoder  # noqa: E402
from mmfast.ops import grad_modulate_  # noqa: E402


def encoder_conv_grads(device, dtype):
    """Random gradients shaped like the conv weights of an audio and a visual ResNet-18."""
    gen = torch.Generator().manual_seed(0)
    grads, index = [], []
    for m, channels in enumerate((1, 3)):
        for p in resnet18_encoder(channels).parameters():
            if p.dim() == 4:
                grads.append((1e-3 * torch.randn(p.shape, generator=gen)).to(device=device, dtype=dtype))
                index.append(m)
    return grads, index


def naive_ogm_ge(grads, coeffs_host, index):
    """The research code's update: one std (with .item()) and one normal_ call per tensor."""
    for i, (g, m) in enumerate(zip(grads, index)):
        grads[i] = g * coeffs_host[m] + torch.zeros_like(g).normal_(0, g.std().item() + 1e-8)


def naive_scale(grads, coeffs_host, index):
    for g, m in zip(grads, index):
        g.mul_(coeffs_host[m])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    grads, index = encoder_conv_grads(device, dtype)
    grads_cl = [g.to(memory_format=torch.channels_last) for g in grads]
    numel = sum(g.numel() for g in grads)
    coeffs = torch.tensor([0.4, 1.0], device=device)
    coeffs_host = coeffs.tolist()
    step = [0]
    step_tensor = torch.zeros((), dtype=torch.int64, device=device)

    def fused(gs):
        step[0] += 1
        grad_modulate_(gs, coeffs, index, seed=0, step=step[0])

    def fused_tensor_step():
        grad_modulate_(grads, coeffs, index, seed=0, step=step_tensor, increment_step=True)

    def fused_scale():
        grad_modulate_(grads, coeffs, index, noise=False)

    # Each case modulates the same list in place; values stay bounded since k <= 1 and the noise
    # has the gradient's own scale, so repeated calls measure the same work.
    timed = {
        "naive_noise": lambda: naive_ogm_ge(grads, coeffs_host, index),
        "fused_noise": lambda: fused(grads),
        "fused_noise_tensor_step": fused_tensor_step,
        "naive_noise_channels_last": lambda: naive_ogm_ge(grads_cl, coeffs_host, index),
        "fused_noise_channels_last": lambda: fused(grads_cl),
        "naive_scale": lambda: naive_scale(grads, coeffs_host, index),
        "fused_scale": fused_scale,
    }
    cases = {name: time_fn(fn, device, repeat=args.repeat) for name, fn in timed.items()}
    elem = grads[0].element_size()
    for name, r in cases.items():
        passes = 2 if name.endswith("scale") else 3  # passes over the gradients' bytes
        r["effective_GBps"] = passes * numel * elem / (r["median_ms"] * 1e-3) / 1e9
    result = {
        "benchmark": "grad_modulation", "device": str(device), "dtype": args.dtype,
        "tensors": len(grads), "elements": numel, "machine": machine(),
        "build": mmfast.build_info(), "cases": cases,
        "speedup_noise": cases["naive_noise"]["median_ms"] / cases["fused_noise"]["median_ms"],
        "speedup_scale": cases["naive_scale"]["median_ms"] / cases["fused_scale"]["median_ms"],
        "speedup_noise_channels_last": (cases["naive_noise_channels_last"]["median_ms"]
                                        / cases["fused_noise_channels_last"]["median_ms"]),
    }
    print(f"grad modulation: {len(grads)} tensors, {numel:,} elements, {args.dtype} on {device} "
          f"({result['machine']['cpu'] if device.type == 'cpu' else result['machine']['gpu']}, "
          f"{torch.get_num_threads()} threads, cpu isa {result['build']['cpu_isa']})")
    print(f"{'case':<27}{'median ms':>11}{'min ms':>9}{'GB/s':>8}")
    for name, r in cases.items():
        print(f"{name:<27}{r['median_ms']:>11.2f}{r['min_ms']:>9.2f}{r['effective_GBps']:>8.1f}")
    print(f"speedup with noise (OGM-GE): {result['speedup_noise']:.2f}x   "
          f"channels_last: {result['speedup_noise_channels_last']:.2f}x   "
          f"scale only (OGM): {result['speedup_scale']:.2f}x")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

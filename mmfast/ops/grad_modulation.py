"""OGM-GE gradient modulation (docs/methods/ogm.md), fused.

For each gradient tensor g of modality m, in place:

    sd = std(g) + eps            # unbiased, as torch.std, of the *unscaled* gradient
    g <- coeffs[m] * g + sd * z  # z ~ N(0, 1) elementwise; noise=False: g <- coeffs[m] * g

Computed in float32 and rounded once to g's dtype; the std is accumulated in float64 partial
sums over fixed chunks (so it does not depend on the thread count). A tensor with fewer than two
elements has std NaN, as in torch, and so does one holding NaN/Inf; then that tensor (only that
one) becomes NaN when noise is on.

Noise z is a counter-based stream: Philox4x32-10 with key = seed (64 bits) and counter =
(j, position, step_lo, step_hi), where `position` is the tensor's index in `grads`, then
Box-Muller. Element e of a tensor, counted in memory order (the flat index for a contiguous
tensor; see memory_order), is lane (e % 1024) // 256 of counter (e // 1024) * 256 + e % 256;
lanes are (r cos t, r sin t) of the pairs (x0, x1) and (x2, x3), r = sqrt(-2 log u), t = 2 pi u',
u = x * 2^-32 + 2^-33. The stream depends only on (seed, step, position, e): not on threads,
grid layout or device. seed and step are Python ints or 0-dim int64 device tensors that the
kernels read where they run (the form a compiled or CUDA-graph-captured step needs). The native kernels are in csrc/; this module holds their Python API and
the slow references used by the tests.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch

def grad_modulate_(
    grads: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    modality_index: Sequence[int],
    *,
    noise: bool = True,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    eps: float = 1e-8,
    increment_step: bool = False,
) -> None:
    """Scale every gradient by its modality's coefficient and add Gaussian noise, in place.

    Args:
        grads: gradient tensors (float32/float16/bfloat16, any size, on one device), each dense
            and non-overlapping: contiguous in some memory format (channels_last conv-weight
            gradients included), not a strided slice or an expanded view. Disjoint views of one
            buffer (DDP buckets, flattened optimizer buffers) are fine; tensors that overlap in
            memory are refused. Element e of the noise goes to the e-th element in memory order.
        coeffs: float32 tensor [M] on the gradients' device; read by the kernel, never by the host.
        modality_index: one Python int in [0, M) per gradient (a list, tuple or range).
        noise: add N(0, (std(g) + eps)^2) noise (OGM-GE); False only scales (OGM).
        seed, step: select the noise stream; the same (seed, step) gives bitwise the same noise.
            Python ints (seed taken modulo 2^64, step in [0, 2^63)), or 0-dim int64 tensors on the
            gradients' device, read by the kernels where they run (no host read). Use the tensor
            form for a step that is compiled (``torch.compile``) or captured in a CUDA graph: a
            Python int is baked into the graph, so the noise would never change.
        eps: added to the std.
        increment_step: with a tensor ``step``, add one to it on the device after the noise is
            drawn (the op's own step counter).

    One call covers all tensors in a fixed number of passes (CPU: chunks over threads; CUDA:
    three launches); it does not synchronise with the device. Like torch's in-place ops, it
    bumps the version counter of every tensor it writes.
    """
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Iterable):
        raise TypeError("grad_modulate_: grads must be a list of tensors, not "
                        + ("a single tensor" if isinstance(grads, torch.Tensor) else type(grads).__name__))
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"grad_modulate_: coeffs must be a torch.Tensor, got {type(coeffs).__name__}")
    index = _check_modality_index(modality_index)
    grads = list(grads)
    seed_int, seed_tensor = _counter_arg("seed", seed, coeffs.device)
    step_int, step_tensor = _counter_arg("step", step, coeffs.device)
    if increment_step and step_tensor is None:
        raise ValueError("grad_modulate_: increment_step=True needs step as a 0-dim int64 tensor "
                         "(a Python int cannot be incremented in place)")
    for name, flag in (("noise", noise), ("increment_step", increment_step)):
        if not isinstance(flag, bool):
            raise TypeError(f"grad_modulate_: {name} must be a bool, got {type(flag).__name__}")
    torch.ops.mmfast.grad_modulate_(grads, coeffs, index, noise, _seed64(seed_int), _step64(step_int),
                                    float(eps), seed_tensor, step_tensor, increment_step)


def _check_modality_index(modality_index) -> list[int]:
    # A tensor or an ndarray would be read element by element on the host (a sync on CUDA), and
    # bools or floats would be taken for other integers: only Python ints are accepted.
    if isinstance(modality_index, (str, bytes)) or not isinstance(modality_index, Sequence):
        raise TypeError("grad_modulate_: modality_index must be a list, tuple or range of Python ints, got "
                        f"{type(modality_index).__module__}.{type(modality_index).__name__}")
    if all(type(m) is int for m in modality_index):  # the common case, checked fast (bool is not int here)
        return list(modality_index)
    for i, m in enumerate(modality_index):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"grad_modulate_: modality_index[{i}] must be a Python int, got "
                            f"{type(m).__module__}.{type(m).__name__} ({m!r})")
    return list(modality_index)


def _check_devices(op, grads, coeffs, seed_tensor=None, step_tensor=None) -> None:
    """Every tensor on the gradients' device. The CPU and CUDA kernels check this themselves; the
    fake (meta) kernel checks it here, since torch dispatches a call mixing meta and CPU tensors
    to it, where it would do nothing."""
    for i, g in enumerate(grads):
        if isinstance(g, torch.Tensor) and g.device != coeffs.device:
            raise ValueError(f"{op}: grads[{i}] is on {g.device} but coeffs is on {coeffs.device}; "
                             "coeffs must live on the gradients' device")
    for name, t in (("seed", seed_tensor), ("step", step_tensor)):
        if t is not None and t.device != coeffs.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the gradients are on {coeffs.device}; "
                             "the kernels read it where they run")


def _counter_arg(name, value, device) -> tuple[int, torch.Tensor | None]:
    """(int value, None) for a Python int; (0, tensor) for a 0-dim int64 tensor on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.dim() != 0:
            raise TypeError(f"grad_modulate_: {name} as a tensor must be a 0-dim int64 tensor, got {value.dtype} "
                            f"of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"grad_modulate_: {name} is on {value.device} but the gradients are on {device}; "
                             "the kernels read it where they run")
        return 0, value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"grad_modulate_: {name} must be a Python int or a 0-dim int64 tensor, got "
                        f"{type(value).__name__} ({value!r})")
    return value, None


def _seed64(seed: int) -> int:
    """Any Python int, taken modulo 2^64, as the signed int64 the op schema carries."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def _step64(step: int) -> int:
    step = int(step)
    if not 0 <= step < (1 << 63):
        raise ValueError(f"step must be in [0, 2^63), got {step}")
    return step


def gaussian_noise(numel: int, *, seed: int = 0, step: int = 0, position: int = 0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The standard-normal stream grad_modulate_ adds to tensor `position` (float32 [numel])."""
    out = torch.empty(int(numel), dtype=torch.float32, device=device)
    torch.ops.mmfast.gaussian_noise_(out, _seed64(seed), _step64(step), int(position))
    return out


# ----------------------------------------------------------------------------------------------
# torch.compile support: the ops only mutate their inputs, so their fake versions do nothing.

@torch.library.register_fake("mmfast::grad_modulate_")
def _grad_modulate_fake(grads, coeffs, modality_index, noise=True, seed=0, step=0, eps=1e-8, seed_tensor=None,
                        step_tensor=None, increment_step=False):
    _check_devices("grad_modulate_", grads, coeffs, seed_tensor, step_tensor)
    return None


@torch.library.register_fake("mmfast::gaussian_noise_")
def _gaussian_noise_fake(out, seed, step, position):
    return None


# ----------------------------------------------------------------------------------------------
# Slow references: written the obvious way, independently of the kernels, for the tests.

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10_reference(counter, key) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC'11). counter: uint32 array [..., 4]; key: (k0, k1).
    Returns uint32 [..., 4]."""
    c = np.asarray(counter, dtype=np.uint64).copy()
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(_PHILOX_M[0]) * c[..., 0]
        p1 = np.uint64(_PHILOX_M[1]) * c[..., 2]
        c = np.stack([(p1 >> np.uint64(32)) ^ c[..., 1] ^ k0, p1 & _MASK32,
                      (p0 >> np.uint64(32)) ^ c[..., 3] ^ k1, p0 & _MASK32], axis=-1)
        k0 = (k0 + np.uint64(_PHILOX_W[0])) & _MASK32
        k1 = (k1 + np.uint64(_PHILOX_W[1])) & _MASK32
    return c.astype(np.uint32)


def gaussian_noise_reference(numel: int, *, seed: int = 0, step: int = 0, position: int = 0) -> torch.Tensor:
    """The noise stream, element by element as the module docstring defines it (float32 [numel])."""
    e = np.arange(numel, dtype=np.int64)
    block, within = np.divmod(e, 1024)
    lane, j = np.divmod(within, 256)
    seed &= (1 << 64) - 1
    counter = np.zeros((numel, 4), dtype=np.uint64)
    counter[:, 0] = block * 256 + j
    counter[:, 1] = position
    counter[:, 2] = step & 0xFFFFFFFF
    counter[:, 3] = step >> 32
    words = philox4x32_10_reference(counter, (seed & 0xFFFFFFFF, seed >> 32))
    u = words.astype(np.float32) * np.float32(2.0 ** -32) + np.float32(2.0 ** -33)
    u = u.astype(np.float64)
    pair = lane // 2  # lanes 0, 1 use words (0, 1); lanes 2, 3 use words (2, 3)
    rows = np.arange(numel)
    u_radius = u[rows, 2 * pair]
    u_angle = u[rows, 2 * pair + 1]
    radius = np.sqrt(-2.0 * np.log(u_radius))
    angle = 2.0 * math.pi * u_angle
    z = np.where(lane % 2 == 0, radius * np.cos(angle), radius * np.sin(angle))
    return torch.from_numpy(z.astype(np.float32))


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A view of dense tensor `t` whose logical order is t's memory order (it is contiguous): the
    order in which grad_modulate_ assigns noise elements."""
    perm = sorted(range(t.dim()), key=lambda d: t.stride(d) if t.size(d) > 1 else -1, reverse=True)
    view = t.permute(perm)
    assert view.is_contiguous(), "memory_order needs a dense, non-overlapping tensor"
    return view


def grad_modulate_reference_(grads, coeffs, modality_index, *, noise=True, seed=0, step=0, eps=1e-8) -> None:
    """Slow reference of grad_modulate_: a Python loop over tensors, float64 std, numpy Philox
    (seed and step Python ints; the stream is drawn in each tensor's memory order)."""
    coeffs = coeffs.detach().cpu()
    for position, (g, m) in enumerate(zip(grads, modality_index)):
        g = memory_order(g)
        x = g.detach().cpu().float()
        k = coeffs[m]  # float32 0-dim: the product stays float32
        if noise:
            with warnings.catch_warnings():  # torch warns that std of < 2 elements is NaN; it is meant
                warnings.simplefilter("ignore", UserWarning)
                sd = (x.double().std() + eps).float()
            z = gaussian_noise_reference(g.numel(), seed=seed, step=step, position=position).view(x.shape)
            out = k * x + sd * z
        else:
            out = k * x
        g.copy_(out.to(g.dtype))

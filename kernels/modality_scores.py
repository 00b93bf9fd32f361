"""Triton kernel: per-sample true-class probabilities and per-block batch-score partial sums.

For logits [M, B, C] and labels [B], program (b, m) handles rows b*BLOCK_B .. of modality m
(row blocks on grid axis 0, which allows 2^31 - 1 blocks; axes 1 and 2 stop at 65,535):

    s[m, i]          = softmax(logits[m, i])[labels[i]]        (online max/sum over C tiles, float32)
    partial[m, b]    = sum over its rows of mask[m, i] * s[m, i]  (rows with mask 0 count as 0)

Offsets into logits, mask and outputs are 64-bit: M*B*C may exceed 2^31. The partial sums are reduced (in a fixed order) by the balance_coefficients kernel. The PyTorch
reference is mmfast.ops.balance._scores_torch; the slow loop reference modality_scores_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device


@triton.jit
def _modality_scores_kernel(
    logits_ptr, labels_ptr, mask_ptr, s_ptr, partial_ptr,
    B, C, num_row_blocks,
    stride_lm, stride_lb, stride_lc, stride_mask_m, stride_mask_b,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rb = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    row_base = logits_ptr + m * stride_lm + rows64 * stride_lb

    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + cols
        x = tl.load(row_base[:, None] + cc[None, :] * stride_lc, mask=row_ok[:, None] & (cc[None, :] < C),
                    other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        # Rows past B stay at -inf; shift them by 0 so that no (-inf) - (-inf) appears.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max

    label = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    # A label outside [0, C) (reported by the caller) gives NaN, never an out-of-bounds read.
    label_ok = (label >= 0) & (label < C)
    x_label = tl.load(row_base + label * stride_lc, mask=row_ok & label_ok, other=0.0).to(tl.float32)
    valid = row_ok & label_ok
    s = tl.exp(tl.where(valid, x_label - run_max, 0.0)) / tl.where(valid, run_sum, 1.0)
    s = tl.where(label_ok, s, float("nan"))
    tl.store(s_ptr + m * B + rows64, s, mask=row_ok)

    if HAS_MASK:
        w = tl.load(mask_ptr + m * stride_mask_m + rows64 * stride_mask_b, mask=row_ok, other=0.0)
    else:
        w = tl.where(row_ok, 1.0, 0.0)
    contrib = tl.where(w != 0.0, s * w, 0.0)
    tl.store(partial_ptr + m * num_row_blocks + rb, tl.sum(contrib, axis=0))


def block_sizes(C: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_C): a C tile of up to 1024 columns and about 4096 elements a program."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    block_b = max(1, min(64, 4096 // block_c))
    return block_b, block_c


def modality_scores(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None):
    """Launches the kernel. logits [M, B, C] float, labels [B] int64, mask None or float32
    broadcastable to [M, B]. Returns (s [M, B] float32, partial [M, num_row_blocks] float32)."""
    M, B, C = logits.shape
    block_b, block_c = block_sizes(C)
    num_row_blocks = triton.cdiv(B, block_b)
    s = torch.empty((M, B), device=logits.device, dtype=torch.float32)
    partial = torch.empty((M, num_row_blocks), device=logits.device, dtype=torch.float32)
    if mask is None:
        mask_arg, smm, smb = s, 0, 0  # unused pointer
    else:
        mask_arg, smm, smb = mask, mask.stride(0), mask.stride(1)
    with on_device(logits.device):
        _modality_scores_kernel[(num_row_blocks, M)](
            logits, labels, mask_arg, s, partial,
            B, C, num_row_blocks,
            logits.stride(0), logits.stride(1), logits.stride(2), smm, smb,
            HAS_MASK=mask is not None, BLOCK_B=block_b, BLOCK_C=block_c,
        )
    return s, partial

"""Modality valuation: how much each modality contributes to the fused prediction, as a Shapley
value over the coalitions of modalities (the formulas of `mmfast eval --shapley`, of
`mmfast diagnose` and of the re-sampling method's per-sample valuation, in one place).

Coalitions are bitmasks over the modalities in the model's order: bit m set means modality m is
present, and row k of a [2^M, ...] tensor belongs to coalition k (row 0: none present, row
2^M - 1: all). A modality outside the coalition is absent: its pooled features are zeros
(``zeroing="features"``, what the missing-modality evaluation does and the re-sampling method's
public code does) or its input is zeros (``zeroing="inputs"``, what the field's toolkit does;
zero inputs still pass through the encoder's biases and batch norm, so the two differ).

Shapley value of modality m for a characteristic function v (Shapley, 1953):

    phi_m = sum over S subset of N without m of  |S|! (M - |S| - 1)! / M!  (v(S + m) - v(S))

and the values add up to v(N) - v({}) (efficiency). The characteristic functions:

- a split, or one class of it: v(S) = the fused accuracy with every modality outside S absent,
  v({}) measured with every modality absent (the field's toolkit values modalities this way
  after training);
- one sample (the re-sampling method, Wei et al., CVPR 2024): v(S) = |S| if the fused
  prediction with the modalities of S is right, else 0; v({}) = 0. For two modalities these are
  the public code's values (the full coalition counts 2, one modality 1), so
  phi_a = (v_a + v_av - v_v) / 2 takes values in {-0.5, 0, 0.5, 1, 1.5}; the factor |S| for
  M > 2 is mmfast's generalisation (that code handles two modalities only).
"""
from __future__ import annotations

import math

import torch

ZEROINGS = ("features", "inputs")


def coalition_masks(M: int, device=None) -> torch.Tensor:
    """[2^M, M] bool: row k says which modalities coalition k holds (bit m of k)."""
    if M < 1:
        raise ValueError(f"coalitions need at least one modality, got {M}")
    k = torch.arange(2 ** M, device=device)
    return (k.unsqueeze(1) >> torch.arange(M, device=device)) & 1 == 1


def coalition_name(mask, modalities) -> str:
    """'audio+visual', 'audio', ... ('none' for the empty coalition)."""
    names = [m for m, present in zip(modalities, mask) if bool(present)]
    return "+".join(names) if names else "none"


def shapley_matrix(M: int, dtype=torch.float64) -> torch.Tensor:
    """[M, 2^M]: phi = shapley_matrix(M) @ v for v over the coalitions (float64: the weights are
    exact fractions)."""
    masks = coalition_masks(M)
    sizes = masks.sum(dim=1)
    out = torch.zeros(M, 2 ** M, dtype=dtype)
    for m in range(M):
        bit = 1 << m
        for s in range(2 ** M):
            if s & bit:
                continue
            size = int(sizes[s])
            w = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            out[m, s | bit] += w
            out[m, s] -= w
    return out


def shapley_values(values: torch.Tensor) -> torch.Tensor:
    """[M, ...] Shapley values from a characteristic function [2^M, ...] (coalitions first)."""
    K = values.shape[0]
    M = K.bit_length() - 1
    if K != 2 ** M or M < 1:
        raise ValueError(f"shapley_values: the first axis must hold 2^M coalitions, got {K}")
    flat = values.reshape(K, -1).to(torch.float64)
    return (shapley_matrix(M).to(flat.device) @ flat).reshape(M, *values.shape[1:])


def correct(fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[K, N] float: whether each coalition's fused prediction [K, N, C] is right."""
    return (fused.argmax(dim=-1) == labels.unsqueeze(0)).to(torch.float64)


def split_values(fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[K]: the fused accuracy of each coalition on a split."""
    return correct(fused, labels).mean(dim=1)


def class_values(fused: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, C]: each coalition's fused accuracy on the samples of each class (NaN: no sample)."""
    hits = correct(fused, labels)
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)  # [N, C]
    counts = onehot.sum(dim=0)
    return (hits @ onehot) / counts.where(counts > 0, torch.full_like(counts, float("nan")))


def sample_values(fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[K, N]: the re-sampling method's per-sample characteristic function, |S| * right (0 for
    the empty coalition)."""
    M = fused.shape[0].bit_length() - 1
    sizes = coalition_masks(M, fused.device).sum(dim=1).to(torch.float64)
    return correct(fused, labels) * sizes.unsqueeze(1)


@torch.no_grad()
def coalition_logits(head, features, absent=None, chunk: int = 4096) -> torch.Tensor:
    """[2^M, N, C]: the fused logits of `head` on every coalition of the M features [N, d_m],
    an absent modality's features replaced by `absent`'s (None: zeros, feature zeroing; the
    encoders' features of zero inputs: input zeroing); the coalitions of `chunk` samples at a time
    go through the head as one batch."""
    M = len(features)
    masks = coalition_masks(M, features[0].device)
    K, out = masks.shape[0], []
    for start in range(0, features[0].shape[0], chunk):
        part = [f[start:start + chunk] for f in features]
        gone = [torch.zeros_like(p) for p in part] if absent is None else [a[start:start + chunk] for a in absent]
        B = part[0].shape[0]
        stacked = [torch.where(masks[:, m].view(K, 1, 1), p.unsqueeze(0), a.unsqueeze(0)).flatten(0, 1)
                   for m, (p, a) in enumerate(zip(part, gone))]
        out.append(head(stacked)[0].float().view(K, B, -1))
    return torch.cat(out, dim=1)

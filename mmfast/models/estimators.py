"""Uni-modal logit estimators (docs/methods/README.md): how each modality alone would
classify the batch, from the features of a jointly trained model. They return the uni-modal
logits stacked as [M, B, C], the input of mmfast.ops.balance_stats, detached (measurements).

- Concat fusion with one linear head (``ConcatHead`` / ``concat_head_logits``): the fused
  logits are computed as the sum of the per-modality partial products W_m phi_m, so the
  estimates o_m = W_m phi_m + gamma_m b cost no extra matrix product.
- Any head (MLP, FiLM, gated): ``zero_out_logits`` runs the head with every other modality's
  feature set to zero, for all modalities in one call on an M*B batch.
- One classifier per modality (sum fusion, OLM, boosting): ``separate_head_logits``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check_features(op: str, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor) or len(features) < 2:
        raise ValueError(f"{op}: features must be a list of M >= 2 tensors [B, d_m], one per modality")
    batch = features[0].shape[0]
    for m, f in enumerate(features):
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise ValueError(f"{op}: features[{m}] must be a 2-D tensor [B, d_m], got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        if f.shape[0] != batch:
            raise ValueError(f"{op}: features[{m}] has batch {f.shape[0]} but features[0] has {batch}")
    return list(features)


def concat_head_logits(features: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                       gamma: Sequence[float] | None = None, *,
                       measure: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused logits of a linear head on concatenated features, and the uni-modal estimates.

    features: M tensors [B, d_m]; weight [C, sum d_m]; bias [C] or None; gamma: the share of the
    bias each estimate gets (default 1/M each); measure: the features to estimate from when they
    differ from the fused ones (OPM/ModDrop fuse dropped features but measure the undropped
    ones: one more small product per modality, without autograd). Returns (fused [B, C] with
    autograd, unimodal [M, B, C] detached), fused = sum_m W_m phi_m + b, o_m = W_m phi_m +
    gamma_m b (phi: `measure` when given)."""
    op = "concat_head_logits"
    features = _check_features(op, features)
    if measure is not None:
        measure = _check_features(op, measure)
        if [f.shape for f in measure] != [f.shape for f in features]:
            raise ValueError(f"{op}: measure must have the shapes of features {[tuple(f.shape) for f in features]}, "
                             f"got {[tuple(f.shape) for f in measure]}")
    dims = [f.shape[1] for f in features]
    if weight.dim() != 2 or weight.shape[1] != sum(dims):
        raise ValueError(f"{op}: weight must be [C, {sum(dims)}] (sum of the feature sizes {dims}), "
                         f"got {tuple(weight.shape)}")
    M = len(features)
    if gamma is None:
        gamma = [1.0 / M] * M
    if len(gamma) != M:
        raise ValueError(f"{op}: gamma needs one bias share per modality ({M}), got {len(gamma)}")
    blocks = torch.split(weight, dims, dim=1)
    partial = [F.linear(f, w) for f, w in zip(features, blocks)]
    fused = torch.stack(partial).sum(dim=0)
    if measure is None:
        unimodal = torch.stack([p.detach() for p in partial])
    else:
        with torch.no_grad():
            unimodal = torch.stack([F.linear(f, w) for f, w in zip(measure, blocks)])
    if bias is not None:
        fused = fused + bias
        shares = torch.tensor(list(gamma), dtype=unimodal.dtype, device=unimodal.device)
        unimodal = unimodal + shares.view(M, 1, 1) * bias.detach()
    return fused, unimodal


class ConcatHead(nn.Module):
    """Linear classifier on concatenated modality features that also returns the uni-modal
    estimates: ``fused, unimodal = head([phi_audio, phi_visual])``."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, gamma: Sequence[float] | None = None):
        super().__init__()
        if len(in_dims) < 2 or any(d < 1 for d in in_dims):
            raise ValueError(f"ConcatHead: in_dims must list M >= 2 positive feature sizes, got {list(in_dims)}")
        self.in_dims = list(in_dims)
        self.gamma = None if gamma is None else list(gamma)
        self.fc = nn.Linear(sum(in_dims), num_classes)
        # (the bias shares on the head's device: no copy from the host in a step; not in state dicts)
        M = len(self.in_dims)
        self.register_buffer("bias_shares", torch.tensor(self.gamma or [1.0 / M] * M), persistent=False)

    def forward(self, features: Sequence[torch.Tensor], measure: Sequence[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return concat_head_logits(features, self.fc.weight, self.fc.bias, self.gamma, measure=measure)

    def partial_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """[M, B, C]: W_m phi_m per modality, without the bias, with autograd (the fused logits
        are their sum plus the bias). Outside autocast, features of another precision (bf16) are
        cast to the weights' dtype."""
        blocks = torch.split(self.fc.weight, self.in_dims, dim=1)
        return torch.stack([F.linear(f.to(w.dtype) if not torch.is_autocast_enabled(f.device.type) else f, w)
                            for f, w in zip(features, blocks)])

    def split_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """[M, B, C]: the weight-split uni-modal logits W_m phi_m + gamma_m b with autograd, for
        methods that train them (they add up to the fused logits)."""
        M = len(self.in_dims)
        partial = self.partial_logits(features)
        return partial + self.bias_shares.to(partial.dtype).view(M, 1, 1) * self.fc.bias


def zero_out_logits(head: Callable[[list[torch.Tensor]], torch.Tensor],
                    features: Sequence[torch.Tensor]) -> torch.Tensor:
    """o_m = head(features with every modality but m zeroed), for every m, stacked [M, B, C].

    The head (any module taking the list of M features) runs once, on an M*B batch, under
    no_grad. A head with batch normalisation in training mode would see the zeroed features in
    its batch statistics: call this with such a head in eval mode."""
    op = "zero_out_logits"
    features = _check_features(op, features)
    M, B = len(features), features[0].shape[0]
    with torch.no_grad():
        blocks = []
        for j, f in enumerate(features):
            # Batch block m keeps modality j only where j == m.
            keep = torch.eye(M, dtype=f.dtype, device=f.device)[:, j].repeat_interleave(B).view(M * B, 1)
            blocks.append(f.detach().repeat(M, 1) * keep)
        out = head(blocks)
    if out.dim() != 2 or out.shape[0] != M * B:
        raise ValueError(f"{op}: head must return logits [batch, C]; got {tuple(out.shape)} for batch {M * B}")
    return out.view(M, B, -1)


def separate_head_logits(heads: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                         features: Sequence[torch.Tensor]) -> torch.Tensor:
    """o_m = heads[m](features[m]), stacked [M, B, C] and detached."""
    op = "separate_head_logits"
    features = _check_features(op, features)
    if len(heads) != len(features):
        raise ValueError(f"{op}: {len(heads)} heads for {len(features)} modalities")
    with torch.no_grad():
        return torch.stack([h(f) for h, f in zip(heads, features)])

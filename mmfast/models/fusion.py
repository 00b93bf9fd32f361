"""Fusion heads, each paired with the uni-modal estimator that fits it (docs/methods/README.md).
Every head maps the M modality features [B, d_m] to ``(fused [B, C], unimodal
[M, B, C])``; the uni-modal logits are detached measurements for the balancing methods.
``head(features, measure=undropped)``: the fused logits come from `features` (what a dropping
method left), the uni-modal estimates from `measure` (the features before the drop: OPM measures
the imbalance on them, TPAMI 2024 Alg. 1 and eq. 7); measure None: from `features`.

| name | fused logits | uni-modal estimate o_m |
|---|---|---|
| concat | W [phi_1 .. phi_M] + b (one linear) | weight split W_m phi_m + b/M (no extra product) |
| sum | sum_m (W_m phi_m + b_m) (one linear per modality) | W_m phi_m + b_m |
| film | fc(gamma(phi_c) * phi_o + beta(phi_c)), M = 2 | zero-out: the head with the other modality zeroed |
| gated | fc(sigmoid(W_c phi_c) * W_o phi_o), M = 2 | zero-out |
| mlp | fc2(relu(fc1([phi_1 .. phi_M]))) | zero-out |
| cosine | sum_m s cos(phi_m, W_m[c]) (MMCosine: no bias) | s cos(phi_m, W_m[c]), its own term |
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .estimators import ConcatHead, zero_out_logits
from .registry import fusions_where

SPLITTABLE = fusions_where(splittable=True)  # heads whose estimate needs no zero-out pass


class SumHead(nn.Module):
    def __init__(self, in_dims: Sequence[int], num_classes: int):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(d, num_classes) for d in in_dims)

    @property
    def modality_modules(self) -> nn.ModuleList:
        """The head's part that belongs to each modality (its classifier)."""
        return self.fcs

    def split_logits(self, features) -> torch.Tensor:
        """[M, B, C] with autograd: each modality's classifier's logits (they add up to the fused ones)."""
        return torch.stack([fc(f if torch.is_autocast_enabled(f.device.type) else f.to(fc.weight.dtype))
                            for fc, f in zip(self.fcs, features)])

    def forward(self, features, measure=None):
        partial = torch.stack([fc(f) for fc, f in zip(self.fcs, features)])
        if measure is None:
            return partial.sum(dim=0), partial.detach()
        with torch.no_grad():
            measured = torch.stack([fc(f) for fc, f in zip(self.fcs, measure)])
        return partial.sum(dim=0), measured


class _ZeroOutHead(nn.Module):
    """A head whose uni-modal estimates come from zero_out_logits (one extra no-grad pass of the
    head on an M*B batch)."""

    def fuse(self, features):
        raise NotImplementedError

    def forward(self, features, measure=None):
        features = list(features)
        return self.fuse(features), zero_out_logits(self.fuse, features if measure is None else list(measure))


def _two_modalities(name, in_dims, condition):
    if len(in_dims) != 2:
        raise ValueError(f"fusion={name!r} combines exactly 2 modalities, got {len(in_dims)}; use concat, sum or mlp")
    if condition not in (0, 1):
        raise ValueError(f"fusion={name!r}: condition must be 0 or 1 (the conditioning modality), got {condition!r}")
    return condition, 1 - condition


class FiLMHead(_ZeroOutHead):
    def __init__(self, in_dims: Sequence[int], num_classes: int, condition: int = 0):
        super().__init__()
        self.c, self.o = _two_modalities("film", in_dims, condition)
        self.film = nn.Linear(in_dims[self.c], 2 * in_dims[self.o])
        self.fc = nn.Linear(in_dims[self.o], num_classes)

    def fuse(self, features):
        gamma, beta = self.film(features[self.c]).chunk(2, dim=1)
        return self.fc(gamma * features[self.o] + beta)


class GatedHead(_ZeroOutHead):
    def __init__(self, in_dims: Sequence[int], num_classes: int, condition: int = 0, hidden: int = 128):
        super().__init__()
        self.c, self.o = _two_modalities("gated", in_dims, condition)
        self.gate = nn.Linear(in_dims[self.c], hidden)
        self.value = nn.Linear(in_dims[self.o], hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def fuse(self, features):
        return self.fc(torch.sigmoid(self.gate(features[self.c])) * self.value(features[self.o]))


class MLPHead(_ZeroOutHead):
    def __init__(self, in_dims: Sequence[int], num_classes: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(sum(in_dims), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def fuse(self, features):
        return self.fc2(torch.relu(self.fc1(torch.cat(features, dim=1))))


class CosineHead(nn.Module):
    """MMCosine's head (Xu et al., ICASSP 2023): modality m's logits are the cosine between its
    L2-normalised feature and each class's L2-normalised weight slice W_m[c], times a scale s;
    the fused logits are their sum, without a bias, so that no modality wins by the norm of its
    features or weights. ``scale``: a buffer (the mmcosine method sets its hyper-parameter)."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, scale: float = 10.0):
        super().__init__()
        self.in_dims = list(in_dims)
        self.fc = nn.Linear(sum(in_dims), num_classes, bias=False)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def partial_logits(self, features) -> torch.Tensor:
        """[M, B, C]: s cos(phi_m, W_m[c]) per modality, with autograd (they add up to the fused logits)."""
        blocks = torch.split(self.fc.weight, self.in_dims, dim=1)
        cos = [F.linear(F.normalize(f if torch.is_autocast_enabled(f.device.type) else f.to(w.dtype), dim=1),
                        F.normalize(w, dim=1)) for f, w in zip(features, blocks)]
        return self.scale.to(cos[0].dtype) * torch.stack(cos)

    split_logits = partial_logits  # (no bias to share)

    def forward(self, features, measure=None):
        partial = self.partial_logits(list(features))
        if measure is None:
            return partial.sum(dim=0), partial.detach()
        with torch.no_grad():
            measured = self.partial_logits(list(measure))
        return partial.sum(dim=0), measured


class MixedConcatHead(ConcatHead):
    """AMCo's head (as the field's toolkit builds it): the concat head's logits, the sum of the
    weight-split uni-modal logits o_m = W_m phi_m + b / M, then a C x C linear layer `mix` across
    the classes: fused = mix(sum_m o_m). The uni-modal estimates are the o_m."""

    def __init__(self, in_dims: Sequence[int], num_classes: int):
        super().__init__(in_dims, num_classes)
        self.mix = nn.Linear(num_classes, num_classes)

    def forward(self, features, measure=None):
        fused, unimodal = super().forward(features, measure)
        return self.mix(fused), unimodal


FUSIONS = {"concat": ConcatHead, "sum": SumHead, "film": FiLMHead, "gated": GatedHead, "mlp": MLPHead,
           "cosine": CosineHead, "amco": MixedConcatHead}


def make_fusion(name: str, in_dims: Sequence[int], num_classes: int, **options) -> nn.Module:
    if name not in FUSIONS:
        raise ValueError(f"fusion must be one of {tuple(FUSIONS)}, got {name!r}")
    if len(in_dims) < 2:
        raise ValueError(f"fusion={name!r} needs at least 2 modalities, got {len(in_dims)}")
    return FUSIONS[name](list(in_dims), num_classes, **options)

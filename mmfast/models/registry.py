"""The fusion heads and their properties, in one place: configs take their choices from here,
methods name the heads they work with from these properties, the trainer asks them instead of
testing head names, and the task loss each head trains with is defined here. (Pure data and one
loss function: importing it builds no model.)"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class FusionKind:
    name: str
    pooled: bool  # fuses the encoders' pooled features: a method can drop or zero them in between
    splittable: bool  # a sum of per-modality terms: uni-modal estimates from its weight split, no zero-out pass
    trains_unimodal: bool  # a classifier of its own per modality, trained by the task loss with the fused one
    method_specific: bool  # trained only by the methods that name it (boost's growing classifiers)
    two_modalities: bool = False  # defined for exactly two modalities (one conditions the other)
    summary: str = ""


FUSION_KINDS: dict[str, FusionKind] = {k.name: k for k in (
    FusionKind("concat", pooled=True, splittable=True, trains_unimodal=False, method_specific=False,
               summary="one linear layer over the concatenated features"),
    FusionKind("sum", pooled=True, splittable=True, trains_unimodal=False, method_specific=False,
               summary="a linear layer per modality, summed"),
    FusionKind("film", pooled=True, splittable=False, trains_unimodal=False, method_specific=False,
               two_modalities=True, summary="FiLM: one modality scales and shifts the other"),
    FusionKind("gated", pooled=True, splittable=False, trains_unimodal=False, method_specific=False,
               two_modalities=True, summary="one modality gates the other"),
    FusionKind("mlp", pooled=True, splittable=False, trains_unimodal=False, method_specific=False,
               summary="a two-layer MLP over the concatenated features"),
    FusionKind("cosine", pooled=True, splittable=True, trains_unimodal=False, method_specific=False,
               summary="MMCosine: the scaled cosines of each modality's feature and class weights, summed"),
    FusionKind("late", pooled=True, splittable=False, trains_unimodal=True, method_specific=False,
               summary="a classifier per modality and one over the concatenated features"),
    FusionKind("irfb", pooled=False, splittable=False, trains_unimodal=True, method_specific=False,
               summary="IRFB: Transformer encoders fusing through bottleneck tokens, late heads"),
    FusionKind("shared", pooled=True, splittable=False, trains_unimodal=True, method_specific=True,
               summary="MLA: one classifier shared by every modality; fused: entropy-gated sum"),
    FusionKind("ensemble", pooled=True, splittable=False, trains_unimodal=True, method_specific=True,
               summary="ReconBoost: one classifier shared by every modality; fused: beta times the sum"),
    FusionKind("boost", pooled=True, splittable=False, trains_unimodal=True, method_specific=True,
               summary="sustained boosting's growing classifiers per modality"),
    FusionKind("amco", pooled=True, splittable=False, trains_unimodal=False, method_specific=True,
               summary="AMCo: the concat head's weight-split logits summed, then a linear layer across the classes"),
)}
FUSION_NAMES = tuple(FUSION_KINDS)


def fusion_kind(name: str) -> FusionKind:
    if name not in FUSION_KINDS:
        raise ValueError(f"fusion must be one of {FUSION_NAMES}, got {name!r}")
    return FUSION_KINDS[name]


def fusions_where(**properties) -> tuple[str, ...]:
    """The fusion names whose properties equal the given ones, e.g. fusions_where(pooled=True)."""
    return tuple(name for name, kind in FUSION_KINDS.items()
                 if all(getattr(kind, key) == value for key, value in properties.items()))


def task_loss_per_sample(fusion: str, fused: torch.Tensor, unimodal: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
    """The per-sample loss a head trains with, before any method changes it: the fused
    cross-entropy, plus every modality's own classifier's cross-entropy for heads that train
    them (late, irfb, boost). fused [B, C], unimodal [M, B, C], labels [B] -> [B] (float32)."""
    loss = F.cross_entropy(fused.float(), labels, reduction="none")
    if fusion_kind(fusion).trains_unimodal:
        loss = loss + per_head_cross_entropy(unimodal, labels).sum(dim=0)
    return loss


def per_head_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[M, B] (float32): each head's per-sample cross-entropy, logits [M, B, C], labels [B], in one call."""
    M, B, C = logits.shape
    return F.cross_entropy(logits.float().reshape(M * B, C), labels.repeat(M), reduction="none").view(M, B)

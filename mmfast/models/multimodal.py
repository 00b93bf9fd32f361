"""The model contract the trainer and the balancing methods rely on, which creates the point
between encoding and fusion where features can be dropped:

    features = model.encode(batch)        # [features of modality m, B x d_m], in modality order
    fused, unimodal, *extra = model.head(features)  # fused [B, C]; unimodal [M, B, C]
    fused, unimodal, *extra = model.head(dropped, measure=features)  # after a feature drop:
                                          # fused from the dropped features, unimodal from the others

The uni-modal logits are detached estimates (mmfast.models.estimators), or, for heads with classifiers
of their own (``head.trains_unimodal``: late, irfb, boost), trainable logits. A head may return a
third item, a dict of further logits for the methods (boost: every classifier's). A model with an
intermediate fusion (IRFB) returns one more feature after the M modalities: the fused
representation (``model.fused_representation``); the methods see the first M. A model whose
encoders exchange information on the way (IRFB, MMTM blocks: ``model.exchanges_features``)
changes every modality's features when one input changes, so a modality is absent only when the
whole model runs without its input.

``build_model`` assembles one from the data layer's modality kinds. The batch holds each
modality's tensor under its name and, for a features modality (pre-extracted sequences
[B, L, D]), its padding mask [B, L] under "<name>_mask", which the sequence encoders read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .fusion import make_fusion
from .heads import BoostedClassifiers, LateHeads, SharedHead
from .irfb import IRFBEncoder
from .mmtm import MMTMExchange, check_stages, encode_with_mmtm
from .registry import fusion_kind
from .resnet import resnet18_encoder
from .sequence import SequenceEncoder, mask_key
from .small import SmallConvEncoder

ENCODERS = ("small", "resnet18")
# Input channels of each kind of image-like modality the data layer produces.
CHANNELS = {"audio": 1, "frames": 3, "video": 3}
KINDS = (*CHANNELS, "features")  # features: sequences [B, L, D] with a mask (SequenceEncoder)


class MultimodalModel(nn.Module):
    fused_representation = False
    exchanges_features = False

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module):
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(f"MultimodalModel needs at least 2 modalities, got {list(encoders)}")
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion

    def encode(self, batch: Mapping[str, torch.Tensor], skip=()) -> list[torch.Tensor]:
        """One feature tensor [B, d_m] per modality. A spectrogram [B, F, T] gets its channel axis;
        an encoder of sequences (``takes_mask``) gets the modality's padding mask from the batch
        (key ``<name>_mask``; none: every step is real). Modalities in `skip` are not encoded:
        their features are zeros (a method that trains without them, such as unimodal, spares
        their encoders' work)."""
        features = []
        for name in self.modalities:
            if name not in batch:
                raise KeyError(f"MultimodalModel.encode: the batch has no {name!r} (has {sorted(batch)})")
            x, encoder = batch[name], self.encoders[name]
            if name in skip:
                features.append(x.new_zeros(x.shape[0], encoder.out_dim))
                continue
            f = run_encoder(encoder, x, batch.get(mask_key(name)))
            if f.dim() != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(f"MultimodalModel.encode: encoder {name!r} must return pooled features [B, d], "
                                 f"got {tuple(f.shape)}")
            features.append(f)
        return features

    def head(self, features: list[torch.Tensor], measure: list[torch.Tensor] | None = None):
        return self.fusion(features) if measure is None else self.fusion(features, measure=measure)

    def forward(self, batch):
        return self.head(self.encode(batch))


class MMTMModel(MultimodalModel):
    """The encoders run stage by stage with MMTM blocks between them after the named stages
    (mmfast/models/mmtm.py); ``mmtm`` holds the blocks and Greedy's curation flags."""

    exchanges_features = True

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module, stages, ratio: int = 4):
        super().__init__(encoders, fusion)
        stages = check_stages(stages)
        if not stages:
            raise ValueError("MMTMModel needs at least one MMTM stage")
        for name, encoder in encoders.items():
            if not hasattr(encoder, "stage"):
                raise ValueError(f"MMTMModel: encoder {name!r} ({type(encoder).__name__}) has no stages to put MMTM "
                                 f"blocks between")
        self.mmtm = MMTMExchange([e.stage_channels for e in encoders.values()], stages, ratio)

    def encode(self, batch: Mapping[str, torch.Tensor], skip=()) -> list[torch.Tensor]:
        if skip:
            raise ValueError(f"MMTMModel.encode: cannot skip {sorted(skip)}: its MMTM blocks need every modality's "
                             f"feature maps")
        return encode_with_mmtm(self.encoders, self.mmtm, batch, self.modalities)


def build_model(modalities: Mapping[str, str], num_classes: int, *, encoder: str = "small", fusion: str = "concat",
                width: int = 16, weights: Mapping[str, str | Path] | None = None,
                in_dims: Mapping[str, int] | None = None, irfb: Mapping | None = None, mmtm=(),
                **fusion_options) -> nn.Module:
    """modalities: name -> kind ("audio", "frames", "video" or "features"), in order; encoder:
    "small" (the CPU-scale CNN) or "resnet18" (the papers') for the image-like kinds; a features
    modality gets a SequenceEncoder of `width` whichever encoder is named (in_dims[name]: its
    values per step); weights: name -> local state-dict file for ResNet-18 encoders (random init
    otherwise). fusion="irfb" builds IRFB's Transformer encoders instead (options `irfb`:
    IRFBEncoder's; in_dims: frequency bins of audio and sizes of features modalities) with late
    heads on the [CLS] and bottleneck outputs. mmtm: encoder stages (1..4) each followed by an
    MMTM block between the encoders (MMTMModel); empty: independent encoders."""
    mmtm = check_stages(list(mmtm or ()))
    if mmtm and not fusion_kind(fusion).pooled:
        raise ValueError(f"MMTM blocks sit between pooled encoders; fusion {fusion!r} has encoders of its own")
    if not fusion_kind(fusion).pooled:  # (fuses inside encoders of its own)
        return IRFBModel(modalities, num_classes, in_dims=in_dims, **dict(irfb or {}))
    if fusion == "irfb":
        return IRFBModel(modalities, num_classes, in_dims=in_dims, **dict(irfb or {}))
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(modalities))
    if unknown:
        raise ValueError(f"weights names {unknown}, not modalities {list(modalities)}")
    if weights and encoder != "resnet18":
        raise ValueError("weights files are for encoder='resnet18'")
    if any(modalities.get(name) == "features" for name in weights):
        raise ValueError(f"weights are ResNet-18 weights; features modalities take a SequenceEncoder "
                         f"({sorted(n for n in weights if modalities[n] == 'features')})")
    in_dims = dict(in_dims or {})
    encoders = {name: make_encoder(name, kind, encoder, width, weights.get(name), in_dims.get(name))
                for name, kind in modalities.items()}
    dims = [e.out_dim for e in encoders.values()]
    if fusion == "late":
        head = LateHeads(dims, num_classes, **fusion_options)
    elif fusion == "boost":
        head = BoostedClassifiers(dims, num_classes, **fusion_options)
    elif fusion in ("shared", "ensemble"):
        head = SharedHead(dims, num_classes, combine="ensemble" if fusion == "ensemble" else "entropy",
                          **fusion_options)
    else:
        head = make_fusion(fusion, dims, num_classes, **fusion_options)
    return MMTMModel(encoders, head, mmtm) if mmtm else MultimodalModel(encoders, head)


def make_encoder(name: str, kind: str, encoder: str = "small", width: int = 16,
                 weights: str | Path | None = None, in_dim: int | None = None) -> nn.Module:
    """One modality's pooled encoder (build_model's, also a uni-modal teacher's): the small CNN or
    ResNet-18 for image-like kinds, a SequenceEncoder of `width` for a features modality
    (in_dim: its values per step)."""
    if kind not in KINDS:
        raise ValueError(f"modality {name!r} has kind {kind!r}; expected one of {KINDS}")
    if kind == "features":
        if not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"features modality {name!r} needs in_dims[{name!r}], its values per step "
                             f"(got {in_dim!r})")
        return SequenceEncoder(in_dim, width)
    return resnet18_encoder(CHANNELS[kind], weights) if encoder == "resnet18" else SmallConvEncoder(CHANNELS[kind], width)


def run_encoder(encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One modality's batch through its pooled encoder: a sequence encoder takes the padding mask
    [B, L] too; a spectrogram [B, F, T] gets its channel axis."""
    if getattr(encoder, "takes_mask", False):
        return encoder(x, mask)
    return encoder(x.unsqueeze(1) if x.dim() == 3 else x)


class IRFBModel(nn.Module):
    """OLM-Trans: IRFB's per-modality Transformer encoders and bottleneck (mmfast.models.irfb),
    with late heads: one classifier per modality on its [CLS] output, one on the bottleneck.
    encode() returns the M [CLS] features and then the fused representation."""

    fused_representation = True
    exchanges_features = True

    def __init__(self, modalities: Mapping[str, str], num_classes: int, *, in_dims: Mapping[str, int] | None = None,
                 **options):
        super().__init__()
        self.modalities = list(modalities)
        self.sequence_modalities = [m for m, kind in modalities.items() if kind == "features"]
        self.irfb = IRFBEncoder(modalities, in_dims=in_dims, **options)
        self.fusion = LateHeads([self.irfb.out_dim] * len(modalities), num_classes, fused_dim=self.irfb.out_dim)

    @property
    def encoders(self) -> dict[str, nn.Module]:
        """Each modality's uni-modal stream (what gradient modulation selects from); the
        bottleneck and fusion layers belong to no modality."""
        return dict(self.irfb.streams.items())

    def encode(self, batch: Mapping[str, torch.Tensor], skip=()) -> list[torch.Tensor]:
        """The M [CLS] features and the fused one. A features modality's padding mask (batch key
        ``<name>_mask``) masks its padded tokens as attention keys, in its own stream and in the
        bottleneck's attention (its stem makes one token per step)."""
        if skip:
            raise ValueError(f"IRFBModel.encode: cannot skip {sorted(skip)}: IRFB fuses inside the encoders")
        keep = {m: batch[mask_key(m)] for m in self.sequence_modalities if mask_key(m) in batch}
        unimodal, fused = self.irfb(batch, keep)
        return list(unimodal) + [fused]

    def head(self, features: list[torch.Tensor], measure: list[torch.Tensor] | None = None):
        return self.fusion(features) if measure is None else self.fusion(features, measure=measure)

    def forward(self, batch):
        return self.head(self.encode(batch))

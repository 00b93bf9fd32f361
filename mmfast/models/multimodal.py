"""The model contract the trainer and the balancing methods rely on, which creates the point
between encoding and fusion where features can be dropped:

    features = model.encode(batch)        # [features of modality m, B x d_m], in modality order
    fused, unimodal = model.head(features)  # fused [B, C]; unimodal [M, B, C], detached estimates

``build_model`` assembles one from the data layer's modality kinds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .fusion import make_fusion
from .resnet import resnet18_encoder
from .small import SmallConvEncoder

ENCODERS = ("small", "resnet18")
# Input channels of each kind of modality the data layer produces.
CHANNELS = {"audio": 1, "frames": 3, "video": 3}


class MultimodalModel(nn.Module):
    def __init__(self, encoders: Mapping[str, nn.Module], fusion: nn.Module):
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(f"MultimodalModel needs at least 2 modalities, got {list(encoders)}")
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion

    def encode(self, batch: Mapping[str, torch.Tensor], skip=()) -> list[torch.Tensor]:
        """One feature tensor [B, d_m] per modality. A spectrogram [B, F, T] gets its channel axis.
        Modalities in `skip` are not encoded: their features are zeros (a method that trains
        without them, such as unimodal, spares their encoders' work)."""
        features = []
        for name in self.modalities:
            if name not in batch:
                raise KeyError(f"MultimodalModel.encode: the batch has no {name!r} (has {sorted(batch)})")
            x = batch[name]
            if name in skip:
                features.append(x.new_zeros(x.shape[0], self.encoders[name].out_dim))
                continue
            f = self.encoders[name](x.unsqueeze(1) if x.dim() == 3 else x)
            if f.dim() != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(f"MultimodalModel.encode: encoder {name!r} must return pooled features [B, d], "
                                 f"got {tuple(f.shape)}")
            features.append(f)
        return features

    def head(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fusion(features)

    def forward(self, batch):
        return self.head(self.encode(batch))


def build_model(modalities: Mapping[str, str], num_classes: int, *, encoder: str = "small", fusion: str = "concat",
                width: int = 16, weights: Mapping[str, str | Path] | None = None, **fusion_options) -> MultimodalModel:
    """modalities: name -> kind ("audio", "frames" or "video"), in order; encoder: "small" (the
    CPU-scale CNN) or "resnet18" (the papers'); weights: name -> local state-dict file for
    ResNet-18 encoders (random init otherwise)."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(modalities))
    if unknown:
        raise ValueError(f"weights names {unknown}, not modalities {list(modalities)}")
    if weights and encoder != "resnet18":
        raise ValueError("weights files are for encoder='resnet18'")
    encoders = {}
    for name, kind in modalities.items():
        if kind not in CHANNELS:
            raise ValueError(f"modality {name!r} has kind {kind!r}; expected one of {tuple(CHANNELS)}")
        channels = CHANNELS[kind]
        encoders[name] = (resnet18_encoder(channels, weights.get(name)) if encoder == "resnet18"
                          else SmallConvEncoder(channels, width))
    dims = [e.out_dim for e in encoders.values()]
    return MultimodalModel(encoders, make_fusion(fusion, dims, num_classes, **fusion_options))

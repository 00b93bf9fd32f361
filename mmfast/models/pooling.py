"""The encoders' shared input convention: one image-like input [B, C, H, W] (a spectrogram with
C = 1, a frame), or T frames [B, T, C, H, W], encoded frame by frame as one B*T batch and pooled
over space and then time to features [B, d] (the papers' visual encoder pools its T frames)."""
from __future__ import annotations

from typing import Callable

import torch


def pooled_features(feature_map: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    """feature_map: [N, C, H, W] -> [N, d, h, w]; returns the features [B, d]."""
    if x.dim() == 4:
        return feature_map(x).mean(dim=(2, 3))
    if x.dim() == 5:
        B, T = x.shape[:2]
        return feature_map(x.flatten(0, 1)).mean(dim=(2, 3)).view(B, T, -1).mean(dim=1)
    raise ValueError(f"{name}: input must be [B, C, H, W] or [B, T, C, H, W], got {tuple(x.shape)}")

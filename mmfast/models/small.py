"""Small convolutional encoders for CPU-scale experiments on the embedded dataset (a ResNet-18
per modality is the published recipe, but too slow for minutes on two CPU cores)."""
from __future__ import annotations

import torch
from torch import nn

from .pooling import pooled_features


class SmallConvEncoder(nn.Module):
    """x [B, C, H, W] or [B, T, C, H, W] -> features [B, width * 4]: four stride-2 conv blocks and
    global pooling (over time too)."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        layers, c = [], in_channels
        for w in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers)
        self.out_dim = c
        self.stage_channels = (width, width * 2, width * 4, width * 4)

    def stage(self, i: int) -> nn.Module:
        """Conv block i (1..4) alone, for models that act between the blocks (MMTM)."""
        return self.body[3 * (i - 1):3 * i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.body, x, "SmallConvEncoder")

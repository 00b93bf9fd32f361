"""ResNet-18 encoder of the OGM-GE/OPM recipes: one per modality, 1 input channel for
spectrograms, 3 for RGB frames; returns pooled features [B, 512] (T frames are pooled over time
too, mmfast/models/pooling.py). ``feature_map`` gives the trunk's map for other uses."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .pooling import pooled_features


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Encoder(nn.Module):
    """x [B, C, H, W] or [B, T, C, H, W] -> features [B, 512]."""

    out_dim = 512
    stage_channels = (64, 128, 256, 512)

    def __init__(self, in_channels: int = 3):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, planes_in = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(planes_in, planes, stride), BasicBlock(planes, planes)))
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_map(self, x):
        """[N, C, H, W] -> [N, 512, H/32, W/32]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def stage(self, i: int) -> nn.Module:
        """Stage i (1..4) of the trunk alone (1: the stem and layer1), for models that act
        between the stages (MMTM)."""
        if i == 1:
            return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1)
        return getattr(self, f"layer{i}")

    def forward(self, x):
        return pooled_features(self.feature_map, x, "ResNet18Encoder")


def resnet18_encoder(in_channels: int = 3, weights: str | Path | None = None) -> ResNet18Encoder:
    """A ResNet-18 encoder, randomly initialised or with weights from a local file (a state dict
    saved by torch.save, optionally under a "state_dict" or "model" key; a torchvision-style
    classifier "fc.*" is ignored)."""
    encoder = ResNet18Encoder(in_channels)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"resnet18_encoder: weights file {str(path)!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"resnet18_encoder: {path} does not hold a state dict")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        misfit = f"resnet18_encoder: {path} does not fit a ResNet-18 with {in_channels} input channel(s)"
        try:
            missing, unexpected = encoder.load_state_dict(state, strict=False)
        except RuntimeError as error:  # a tensor of another shape
            raise ValueError(f"{misfit}: {str(error).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"{misfit}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return encoder

"""MMTM: multimodal transfer modules between the encoders (Joze et al., CVPR 2020), with the
gate substitution of Greedy's re-balancing steps (Wu et al., ICML 2022; docs/methods/greedy.md).

An MMTM block after encoder stage s sees every modality's feature map X_m (N_m x C_m x h x w,
N_m = B T_m for T_m frames per clip) and computes

    s_m = mean of X_m over its frames and positions                  [B, C_m]   (squeeze)
    z   = ReLU(W_s [s_1; ...; s_M] + b_s)                            [B, 2 sum_m C_m / ratio]
    e_m = sigmoid(W_m z + b_m)                                       [B, C_m]   (excitation)
    X_m <- X_m * e_m  (broadcast over the clip's frames and positions)

In training each block keeps, per modality, the running mean ebar_m of the batch-mean
excitation over its forward calls (ebar <- (mean_b e + n ebar) / (n + 1), n the calls so far).
While the model is *curating* modality k (flags set by the greedy method for the next forward),
e_k is replaced by ebar_k for every sample: branch k gets no information from the others and no
gradient reaches W_k, b_k. Evaluation uses the live gates and leaves the averages alone.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

STAGES = (1, 2, 3, 4)  # the encoders' stages an MMTM block may follow (ResNet-18: layer1..layer4)


class MMTMBlock(nn.Module):
    def __init__(self, channels: Sequence[int], ratio: int = 4):
        super().__init__()
        total = sum(channels)
        hidden = int(2 * total / ratio)  # (the official block's width)
        self.squeeze = nn.Linear(total, hidden)
        self.excite = nn.ModuleList(nn.Linear(hidden, c) for c in channels)
        self.relu = nn.ReLU()
        for m, c in enumerate(channels):
            self.register_buffer(f"average_{m}", torch.zeros(c))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"average_{m}") for m in range(len(self.excite))]

    def forward(self, maps: list[torch.Tensor], frames: list[int], substitute: torch.Tensor | None = None):
        """maps: M feature maps [B T_m, C_m, h, w]; frames: T_m; substitute: [M] bool (training
        only): the modalities whose gate is the running average."""
        squeezed = [x.view(x.shape[0] // t, t, x.shape[1], -1).mean(dim=(1, 3)) for x, t in zip(maps, frames)]
        z = self.relu(self.squeeze(torch.cat(squeezed, dim=1)))
        gates = [torch.sigmoid(fc(z)) for fc in self.excite]
        if self.training:
            with torch.no_grad():
                n = self.calls.to(torch.float32)  # (exact up to 2^24 forwards)
                for avg, e in zip(self.averages(), gates):
                    avg.copy_((e.float().mean(dim=0) + avg * n) / (n + 1))
                self.calls += 1
            if substitute is not None:
                gates = [torch.where(substitute[m], avg.to(e.dtype).expand_as(e), e)
                         for m, (avg, e) in enumerate(zip(self.averages(), gates))]
        return [x * e.repeat_interleave(t, dim=0)[:, :, None, None] for x, e, t in zip(maps, gates, frames)]


class MMTMExchange(nn.Module):
    """The MMTM blocks of a model (one after each named stage) and the curation flags the greedy
    method writes: ``curating`` (0-dim bool) and ``caring`` (0-dim int64, the curated modality's
    index). Both are buffers: a checkpoint carries them."""

    def __init__(self, stage_channels: Sequence[Sequence[int]], stages: Sequence[int], ratio: int = 4):
        super().__init__()
        self.stages = tuple(stages)
        self.num_modalities = len(stage_channels)
        self.blocks = nn.ModuleDict({str(s): MMTMBlock([ch[s - 1] for ch in stage_channels], ratio) for s in stages})
        self.register_buffer("curating", torch.zeros((), dtype=torch.bool))
        self.register_buffer("caring", torch.zeros((), dtype=torch.int64))

    def substitute(self) -> torch.Tensor:
        """[M] bool: the modalities whose gates are replaced in this training forward."""
        return self.curating & (torch.arange(self.num_modalities, device=self.caring.device) == self.caring)

    def modality_parameters(self, m: int) -> list[nn.Parameter]:
        """The parameters tied to modality m (its excitation layers) and the shared squeeze
        layers (which belong to every modality): Greedy's cross-modal ("bypass") parameters."""
        return [p for block in self.blocks.values() for p in (*block.excite[m].parameters(), *block.squeeze.parameters())]


def check_stages(stages) -> tuple[int, ...]:
    """The stage list of `model.mmtm`: distinct stages of STAGES, in order."""
    if not isinstance(stages, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in stages):
        raise ValueError(f"mmtm stages must be a list of encoder stages from {STAGES}, got {stages!r}")
    if len(set(stages)) != len(stages) or not set(stages) <= set(STAGES):
        raise ValueError(f"mmtm stages must be distinct encoder stages from {STAGES}, got {list(stages)}")
    return tuple(sorted(stages))


def encode_with_mmtm(encoders: Mapping[str, nn.Module], exchange: MMTMExchange, batch: Mapping[str, torch.Tensor],
                     modalities: Sequence[str]) -> list[torch.Tensor]:
    """Every modality's encoder stage by stage, an MMTM block after each of the exchange's
    stages; pooled features [B, d_m] (over positions, then over the clip's frames)."""
    maps, frames = [], []
    for name in modalities:
        if name not in batch:
            raise KeyError(f"MMTMModel.encode: the batch has no {name!r} (has {sorted(batch)})")
        x = batch[name]
        x = x.unsqueeze(1) if x.dim() == 3 else x  # (a spectrogram gets its channel axis)
        if x.dim() == 5:
            frames.append(x.shape[1])
            x = x.flatten(0, 1)
        elif x.dim() == 4:
            frames.append(1)
        else:
            raise ValueError(f"MMTMModel.encode: {name!r} must be [B, C, H, W] or [B, T, C, H, W], got {tuple(x.shape)}")
        maps.append(x)
    substitute = exchange.substitute() if exchange.training else None
    for stage in STAGES:
        maps = [encoders[name].stage(stage)(x) for name, x in zip(modalities, maps)]
        if stage in exchange.stages:
            maps = exchange.blocks[str(stage)](maps, frames, substitute)
    return [x.mean(dim=(2, 3)).view(x.shape[0] // t, t, -1).mean(dim=1) for x, t in zip(maps, frames)]

"""The pooled encoder of pre-extracted feature sequences (the data layer's ``features`` kind:
values [B, L, D] with a padding mask [B, L], True at the real steps).

    h = LayerNorm(Linear(D -> d)(x))                per step
    h = ReLU(Conv1d(d, d, 3, padding=1)(h))          twice, over time
    feature = the mean of h over the real steps      [B, d]

d = 4 x width, the small CNN's feature size (64 at the default width 16). The padded steps are set
to zero in the input, after the projection and after each convolution (torch.where, so even NaN
or Inf there is dropped), so a convolution near the end of a sequence sees zeros past it, as over a sequence
stored without padding; and they are left out of the mean. So what lies in the padding never
changes the feature. A sequence with no real step (a mask of zeros) gives the zero feature.
No batch norm: its statistics would count the padding. Two convolutions of kernel 3 see 5 steps
around each; the size is the toolkit's choice for CPU-scale runs (no published architecture).
"""
from __future__ import annotations

import torch
from torch import nn


def mask_key(modality: str) -> str:
    """The batch key the model reads a sequence modality's padding mask from: "<modality>_mask",
    the data layer's (mmfast.data.mask_key: the batch contract; models import no data code)."""
    return f"{modality}_mask"


class SequenceEncoder(nn.Module):
    """x [B, L, in_dim] (mask [B, L] bool, True: a real step; None: every step) -> [B, width * 4]."""

    takes_mask = True  # (MultimodalModel.encode passes the batch's mask of the modality)

    def __init__(self, in_dim: int, width: int = 16, kernel: int = 3, layers: int = 2):
        super().__init__()
        if in_dim < 1 or width < 1 or kernel < 1 or kernel % 2 == 0 or layers < 1:
            raise ValueError(f"SequenceEncoder: in_dim and width must be >= 1, kernel odd, layers >= 1; got "
                             f"in_dim={in_dim}, width={width}, kernel={kernel}, layers={layers}")
        self.out_dim = width * 4
        self.proj = nn.Linear(in_dim, self.out_dim)
        self.norm = nn.LayerNorm(self.out_dim)
        self.convs = nn.ModuleList(nn.Conv1d(self.out_dim, self.out_dim, kernel, padding=kernel // 2)
                                   for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.proj.in_features:
            raise ValueError(f"SequenceEncoder: expected [B, L, {self.proj.in_features}], got {tuple(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif mask.shape != x.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"SequenceEncoder: mask must be bool [B, L] = {tuple(x.shape[:2])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        x = torch.where(mask.unsqueeze(2), x, 0.0)  # (so that no NaN in the padding reaches a gradient)
        keep = mask.unsqueeze(1)  # [B, 1, L]
        h = self.norm(self.proj(x)).transpose(1, 2)  # [B, d, L]
        h = torch.where(keep, h, 0.0)
        for conv in self.convs:
            h = torch.where(keep, torch.relu(conv(h)), 0.0)
        count = mask.sum(dim=1, keepdim=True).clamp_min(1).to(h.dtype)  # (no host read)
        return h.sum(dim=2) / count

"""``mmcosine``: MMCosine (Xu et al., ICASSP 2023; docs/methods/mmcosine.md).

Each modality's logits are s cos(phi_m, W_m[c]): the cosine between its L2-normalised feature
and each class's L2-normalised weight slice, times a fixed scale s; the fused logits are their
sum, without a bias, and train with plain cross-entropy. No modality wins by the norm of its
features or its weights. The head is the model block ``fusion=cosine``
(mmfast.models.fusion.CosineHead); this method sets its scale and requires it. The official
code's optional supervised contrastive term has weight 0 by default and is not offered.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import Method, StepState, check_number


class MMCosine(Method):
    name = "mmcosine"
    fusions = ("cosine",)

    @dataclasses.dataclass
    class Params:
        scale: float = 10.0  # s: the official script's default (main_CD.py); the toolkit uses 15

        def check(self):
            check_number("mmcosine", "scale", self.scale, low=0)
            if self.scale <= 0:
                raise ValueError(f"mmcosine.scale must be > 0, got {self.scale!r}")

    def fit_start(self, state: StepState) -> None:
        scale = getattr(state.head, "scale", None)
        if not isinstance(scale, torch.Tensor) or not hasattr(state.head, "partial_logits"):
            raise ValueError("mmcosine trains the cosine head (fusion=cosine, mmfast.models.fusion.CosineHead): "
                             f"pass it as head=, got {type(state.head).__name__}")
        with torch.no_grad():
            scale.fill_(self.params.scale)

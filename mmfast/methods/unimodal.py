"""``unimodal``: one modality alone, the "uni-modal baseline" of the papers.

Every other modality's features are replaced by zeros before fusion, so the fused head sees that
modality only (with a concat head: a linear classifier on it) and the other encoders receive no
gradient. The loop need not run those encoders (``unused_modalities``), and evaluation zeroes
them too, so the head is tested as it was trained."""
from __future__ import annotations

import dataclasses

import torch

from .base import POOLED_FUSIONS, Method, StepState


class Unimodal(Method):
    name = "unimodal"
    fusions = POOLED_FUSIONS  # it zeroes pooled features after the encoders: not with IRFB

    @dataclasses.dataclass
    class Params:
        modality: str = ""  # the modality to train, as the data layer names it

        def check(self):
            if not isinstance(self.modality, str) or not self.modality:
                raise ValueError("unimodal.modality must name the modality to train, e.g. modality=audio")

    def fit_start(self, state: StepState) -> None:
        if self.params.modality not in state.modalities:
            raise ValueError(f"unimodal.modality={self.params.modality!r} is not a modality of the data "
                             f"{state.modalities}")
        self.index = state.modalities.index(self.params.modality)

    def unused_modalities(self, state: StepState) -> set[str]:
        return {m for m in state.modalities if m != self.params.modality}

    def before_fusion(self, state: StepState) -> None:
        state.features = [f if m == self.index else torch.zeros_like(f) for m, f in enumerate(state.features)]

"""``mslr``: modality-specific learning rates (Yao & Mihalcea, ACL 2022; docs/methods/mslr.md),
the "keep" strategy.

The paper builds an additive late-fusion model (fusion=sum: a classifier per modality, their
logits summed) and trains each modality's branch (its encoder and its classifier) with the
learning rate that suits that modality alone, found by tuning it alone, kept through joint
training. Here: ``lr_scales`` {modality: factor} multiplies the base learning rate
(optim.lr) of that branch's parameters; they get an optimizer parameter group of their own,
which the scheduler drives like the rest. A modality not named keeps factor 1. With a head that
has no classifier per modality (concat, mlp, film, gated), the branch is the encoder alone. The paper's
other two strategies (rates that change during training) are not offered: their rules could
not be checked against the paper's text.
"""
from __future__ import annotations

import dataclasses

from .base import Method, StepState, check_number, split_optimizer


class MSLR(Method):
    name = "mslr"
    fusions = ("sum", "late", "concat", "mlp", "film", "gated")  # the paper's: sum (additive late fusion)

    @dataclasses.dataclass
    class Params:
        # No default rates exist: the paper tunes each modality alone and keeps its best rate.
        lr_scales: dict = dataclasses.field(default_factory=dict)

        def check(self):
            if not isinstance(self.lr_scales, dict):
                raise ValueError(f"mslr.lr_scales must map modality names to factors, got {self.lr_scales!r}")
            for name, value in self.lr_scales.items():
                check_number("mslr", f"lr_scales[{name!r}]", value, low=0)
                if value <= 0:
                    raise ValueError(f"mslr.lr_scales[{name!r}] must be > 0, got {value!r}")

    def fit_start(self, state: StepState) -> None:
        unknown = sorted(set(self.params.lr_scales) - set(state.modalities))
        if unknown:
            raise ValueError(f"mslr.lr_scales names {unknown}, not modalities {state.modalities}")
        parts = getattr(state.head, "modality_modules", None)
        groups = []
        for m, (name, encoder) in enumerate(state.encoders.items()):
            scale = float(self.params.lr_scales.get(name, 1.0))
            if scale == 1.0:
                continue
            params = list(encoder.parameters()) + (list(parts[m].parameters()) if parts is not None else [])
            groups.append((params, scale))
        if groups:
            split_optimizer(state, groups)

    def summary(self):
        return {"lr_scales": dict(self.params.lr_scales)}

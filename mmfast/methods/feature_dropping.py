"""``opm`` and ``moddrop``: dropping whole per-sample features before fusion (reference semantics
sections 4-5), through mmfast.ops.feature_drop.

- opm: the drop probabilities q [M] of step t+1 come from step t's balance statistics
  (q = clip(q_base (1 + lam z(rho)), 0, 1) for the dominant modalities, 0 for the others), kept
  on the device; a batch is modulated with probability p_exe. The scores are measured on the
  kept samples only (the drop mask masks them). Inside the epoch window, after warm-up.
- moddrop: fixed per-modality probabilities, every batch (p_exe 1).
Samples with every modality dropped leave the loss (state.sample_weight).
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops import feature_drop
from ..ops.balance import KINDS, ZS
from .base import POOLED_FUSIONS, Method, StepState, WindowParams, check_choice, check_number


def apply_drop(state: StepState, probs: torch.Tensor, p_exe: float) -> None:
    dropped = feature_drop(state.features, probs, p_exe=p_exe, generator=state.generator, shard=state.shard)
    state.features = dropped.features
    state.keep = dropped.keep
    state.sample_weight = (dropped.sample_weight if state.sample_weight is None
                           else state.sample_weight * dropped.sample_weight)


class OPM(Method):
    name = "opm"
    fusions = POOLED_FUSIONS  # they drop pooled features after the encoders: not with IRFB

    @dataclasses.dataclass
    class Params(WindowParams):
        q_base: float = 0.5
        lam: float = 0.5
        z: str = "tanh"
        kind: str = "ratio"
        p_exe: float = 0.7

        def check(self):
            check_number("opm", "q_base", self.q_base, low=0, high=1)
            check_number("opm", "lam", self.lam, low=0)
            check_number("opm", "p_exe", self.p_exe, low=0, high=1)
            check_choice("opm", "z", self.z, ZS)
            check_choice("opm", "kind", self.kind, KINDS)
            self.check_window("opm")

    def balance_params(self):
        p = self.params
        return {"q_base": p.q_base, "lam": p.lam, "z": p.z, "kind": p.kind}

    def fit_start(self, state: StepState) -> None:
        self.drop_probs = torch.zeros(len(state.modalities), device=state.device)

    def before_fusion(self, state: StepState) -> None:
        if self.params.active(state.epoch):
            apply_drop(state, self.drop_probs, self.params.p_exe)

    def after_forward(self, state: StepState) -> None:
        if self.params.active(state.epoch):
            self.drop_probs = state.stats().drop_probs  # for the next step, never read by the host
            for m, name in enumerate(state.modalities):
                state.metrics[f"drop_prob/{name}"] = self.drop_probs[m]

    def state_dict(self):
        return {"drop_probs": self.drop_probs}

    def load_state_dict(self, state):
        self.drop_probs = state["drop_probs"].to(self.drop_probs.device)


class ModDrop(Method):
    name = "moddrop"
    fusions = POOLED_FUSIONS  # they drop pooled features after the encoders: not with IRFB

    @dataclasses.dataclass
    class Params:
        probs: dict = dataclasses.field(default_factory=dict)  # modality name -> drop probability
        p_exe: float = 1.0

        def check(self):
            if not isinstance(self.probs, dict) or not self.probs:
                raise ValueError("moddrop.probs must map modality names to drop probabilities, "
                                 "e.g. {'audio': 0.3, 'visual': 0.1}")
            for name, p in self.probs.items():
                check_number("moddrop", f"probs[{name!r}]", p, low=0, high=1)
            check_number("moddrop", "p_exe", self.p_exe, low=0, high=1)

    def fit_start(self, state: StepState) -> None:
        unknown = sorted(set(self.params.probs) - set(state.modalities))
        if unknown:
            raise ValueError(f"moddrop.probs names {unknown}, not modalities of the data {state.modalities}")
        self.drop_probs = torch.tensor([float(self.params.probs.get(name, 0.0)) for name in state.modalities],
                                       device=state.device)

    def before_fusion(self, state: StepState) -> None:
        apply_drop(state, self.drop_probs, self.params.p_exe)
        for m, name in enumerate(state.modalities):
            state.metrics[f"drop_prob/{name}"] = self.drop_probs[m]

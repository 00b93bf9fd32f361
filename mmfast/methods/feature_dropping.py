"""``opm`` and ``moddrop``: dropping whole per-sample features before fusion (docs/methods/opm.md),
through mmfast.ops.feature_drop.

- opm (TPAMI 2024 section 3.2.1, Alg. 1, eq. 7-8): the balance statistics are measured on the
  uni-modal estimates of the *undropped* features of every sample of the batch; the drop changes
  only what the fusion sees. From the ratio rho, q = clip(q_base (1 + lam z(rho)), 0, 1) for the
  dominant modalities (rho > 1), 0 for the others. ``timing`` says which batch q drops:
    "next" (default; the paper: q_{t+1} from step t's ratio, eq. 8, Alg. 1): measured after the
        forward over the whole mini-batch (every micro-batch), applied from the next step on;
    "current" (the public code's): measured on this batch's undropped features before the fusion
        (the loop gives Balancer(estimate=...) and drop(labels=...)), applied to this batch.
  A batch is modulated with probability p_exe (default 1.0: the paper drops on every step; the
  public code's 0.7 is its CREMA-D recipe). Inside the epoch window, after warm-up.
- moddrop: fixed per-modality probabilities, every batch (p_exe 1).
Samples with every modality dropped leave the loss (state.sample_weight).
Logged per step (epoch means in metrics.jsonl): drop_prob/<m>, the probability that dropped this
step's samples of m (0 where the batch was not modulated), and dropped_step/<m>, 1 when it was
above 0 (train/dropped_step/<m>: the share of steps on which m was dropped).
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops import balance_coefficients, feature_drop
from ..ops.balance import KINDS, ZS
from .base import POOLED_FUSIONS, Method, StepState, WindowParams, check_choice, check_number

TIMINGS = ("next", "current")


def apply_drop(state: StepState, probs: torch.Tensor, p_exe: float) -> None:
    dropped = feature_drop(state.features, probs, p_exe=p_exe, generator=state.generator, shard=state.shard)
    state.features = dropped.features
    state.keep = dropped.keep
    state.sample_weight = (dropped.sample_weight if state.sample_weight is None
                           else state.sample_weight * dropped.sample_weight)
    for m, name in enumerate(state.modalities):
        state.metrics[f"drop_prob/{name}"] = dropped.drop_probs[m]
        state.metrics[f"dropped_step/{name}"] = (dropped.drop_probs[m] > 0).float()


class OPM(Method):
    name = "opm"
    fusions = POOLED_FUSIONS  # they drop pooled features after the encoders: not with IRFB
    measures_balance = True

    @dataclasses.dataclass
    class Params(WindowParams):
        q_base: float = 0.5  # TPAMI 2024 Fig. 7 (section 4.4.4) and the public code
        lam: float = 0.5  # TPAMI 2024 Fig. 7 (section 4.4.4) and the public code
        z: str = "tanh"  # TPAMI 2024 section 3.2.1: z(x) = tanh(x - 1)
        kind: str = "ratio"  # eq. 7
        p_exe: float = 1.0  # the paper drops on every step (Alg. 1); the public code modulates a batch w.p. 0.7
        timing: str = "next"  # "next": the paper's q_{t+1} (eq. 8); "current": the public code's

        def check(self):
            check_number("opm", "q_base", self.q_base, low=0, high=1)
            check_number("opm", "lam", self.lam, low=0)
            check_number("opm", "p_exe", self.p_exe, low=0, high=1)
            check_choice("opm", "z", self.z, ZS)
            check_choice("opm", "kind", self.kind, KINDS)
            check_choice("opm", "timing", self.timing, TIMINGS)
            self.check_window("opm")

    def balance_params(self):
        p = self.params
        return {"q_base": p.q_base, "lam": p.lam, "z": p.z, "kind": p.kind}

    def fit_start(self, state: StepState) -> None:
        self.drop_probs = torch.zeros(len(state.modalities), device=state.device)
        if self.params.timing == "current" and state.estimate is None:
            raise ValueError("opm timing='current' measures the batch before the fusion: the loop must give the "
                             "Balancer estimate= (features -> uni-modal logits [M, B, C])")

    def before_fusion(self, state: StepState) -> None:
        if not self.params.active(state.epoch):
            return
        if self.params.timing == "current":
            if state.labels is None:
                raise ValueError("opm timing='current': pass the batch's labels to Balancer.drop(features, labels=)")
            with torch.no_grad():
                state.unimodal_logits = state.estimate(state.undropped).detach().float()
            # (this batch's own scores, also under gradient accumulation: the batch it drops)
            self.drop_probs = balance_coefficients(state.measure_batch(), **state.balance_params).drop_probs
        apply_drop(state, self.drop_probs, self.params.p_exe)

    def after_backward(self, state: StepState) -> None:
        if self.params.active(state.epoch) and self.params.timing == "next":
            self.drop_probs = state.stats().drop_probs  # for the next step, never read by the host

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

"""``gblending``: gradient blending (Wang, Tran, Feiszli, CVPR 2020; docs/methods/gblending.md).

The model has a classifier per modality besides the fused one (fusion=late) and trains the
weighted sum of every head's cross-entropy, L = sum_k w_k CE(o_k, y), k over the modalities'
classifiers and the fused one. The weights come from how each head generalises and overfits:
before the epochs it names, the loop trains a copy of the model from the current weights for
``super_epoch`` epochs per head, with that head's loss alone (a uni-modal model per modality,
the multimodal model for the fused head; mmfast.methods.ScratchRun), and reports each epoch's
training loss L^T and validation loss L^V. Between the copy's first and last epoch:

    form="paper"    G_k = L^V_k(first) - L^V_k(last)                  (generalisation gained)
                    O_k = (L^V_k - L^T_k)(last) - (L^V_k - L^T_k)(first)  (overfitting grown)
                    w_k = (G_k / O_k^2) / sum_j (G_j / O_j^2), losses as means over samples;
                    a head whose validation loss did not fall (G_k <= 0) gets weight 0
    form="toolkit"  the same with each loss the sum of its batches' mean losses, and |G_k|

``schedule="online"`` re-estimates every ``super_epoch`` epochs (before epochs 0, s, 2s, ...),
``"offline"`` once, before epoch 0. The validation split is the run's val split (held out; the
paper's V is held-out training data). Until the first estimate, and when no head's weight is
positive, the weights are equal. The paper's text could not be checked (only its abstract and
the toolkit's code): the window and the hold-out protocol follow the toolkit.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .base import Method, ScratchRun, StepState, check_choice, check_number

FORMS = ("paper", "toolkit")
SCHEDULES = ("online", "offline")


def blend_weights(train: torch.Tensor, val: torch.Tensor, form: str = "paper", eps: float = 1e-12) -> torch.Tensor:
    """w [H] from each head's training and validation losses at the window's first and last
    epoch: train, val [H, 2] (first, last)."""
    G = val[:, 0] - val[:, 1]
    O = (val[:, 1] - train[:, 1]) - (val[:, 0] - train[:, 0])
    G = G.abs() if form == "toolkit" else G.clamp_min(0)
    raw = G / O.pow(2).clamp_min(eps)
    total = raw.sum()
    return raw / total if total > 0 else torch.full_like(raw, 1.0 / len(raw))


class GBlending(Method):
    name = "gblending"
    fusions = ("late",)
    computes_task_loss = True

    @dataclasses.dataclass
    class Params:
        super_epoch: int = 10  # the window and the re-estimation period: the toolkit's (trainer_config.yaml)
        schedule: str = "online"  # the toolkit's default; "offline": one estimate before epoch 0
        form: str = "paper"  # "paper": means, G clamped at 0; "toolkit": sums of batch means, |G|

        def check(self):
            check_number("gblending", "super_epoch", self.super_epoch, low=2, integer=True)
            check_choice("gblending", "schedule", self.schedule, SCHEDULES)
            check_choice("gblending", "form", self.form, FORMS)

    def fit_start(self, state: StepState) -> None:
        self.modalities = list(state.modalities)
        H = len(self.modalities) + 1
        self.w = torch.full((H,), 1.0 / H, device=state.device)  # [modalities..., fused]
        self._curves: dict = {}

    def scratch_runs(self, epoch: int) -> tuple[ScratchRun, ...]:
        due = epoch % self.params.super_epoch == 0 if self.params.schedule == "online" else epoch == 0
        if not due:
            return ()
        n = self.params.super_epoch
        return (*(ScratchRun(name, n) for name in self.modalities), ScratchRun(None, n))

    def scratch_end(self, state: StepState) -> None:
        s = state.scratch
        self._curves[s["run"].head] = s["curves"]
        heads = [*state.modalities, None]
        if all(h in self._curves for h in heads):
            keys = ("train", "val") if self.params.form == "paper" else ("train_batch_sum", "val_batch_sum")
            train, val = (torch.tensor([[self._curves[h][k][0], self._curves[h][k][-1]] for h in heads],
                                       dtype=torch.float64) for k in keys)
            self.w = blend_weights(train, val, self.params.form).to(device=state.device, dtype=torch.float32)
            self._curves = {}

    def after_forward(self, state: StepState) -> None:
        unimodal, fused = state.head_logits["unimodal"].float(), state.head_logits["fused"].float()
        logits = torch.cat([unimodal, fused[None]])  # [M + 1, B, C]
        H, B, C = logits.shape
        ce = F.cross_entropy(logits.reshape(H * B, C), state.labels.repeat(H), reduction="none").view(H, B)
        state.task_loss = state.batch_mean((self.w.view(H, 1) * ce).sum(dim=0))
        for k, name in enumerate([*state.modalities, "fused"]):
            state.metrics[f"gblending/w/{name}"] = self.w[k]

    def summary(self):
        return {"weights": [round(float(v), 6) for v in self.w]}

    def state_dict(self):
        return {"w": self.w.clone()}

    def load_state_dict(self, state):
        self.w = state["w"].to(self.w.device)

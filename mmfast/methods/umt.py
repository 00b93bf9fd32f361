"""``umt``: uni-modal teachers (Du et al., ICML 2023; docs/methods/umt.md), as the field's toolkit
computes it (no official code was found; only the paper's abstract could be read).

Before the first step each modality gets a teacher: a model of that modality alone, trained with
cross-entropy (mmfast/teachers.py), then frozen and kept in eval mode. The multimodal model then
trains with its task loss plus a distillation of every encoder's pooled features towards its
teacher's:

    L = CE(fused, y) + s * sum_m mean over samples and feature dimensions of (phi_m - phiT_m)^2

phiT_m from the teacher's encoder on the same batch, without gradients; gradients reach the
student only. A step runs the M teachers' forwards (no backward), in the step's precision.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import POOLED_FUSIONS, Method, StepState, TeacherRun, check_number


class UMT(Method):
    name = "umt"
    fusions = POOLED_FUSIONS
    adds_loss_terms = True
    needs_inputs = True

    @dataclasses.dataclass
    class Params:
        scaling: float = 10.0  # the toolkit's distillation weight (the paper's could not be read)
        # The teachers' training epochs; None: the run's (the toolkit trains them with the run's config).
        teacher_epochs: int | None = None
        # A run folder holding teachers/<modality>.pt to load instead of training (None: this run's).
        teachers: str | None = None

        def check(self):
            check_number("umt", "scaling", self.scaling, low=0.0)
            if self.teacher_epochs is not None:
                check_number("umt", "teacher_epochs", self.teacher_epochs, low=1, integer=True)
            if self.teachers is not None and (not isinstance(self.teachers, str) or not self.teachers):
                raise ValueError(f"umt.teachers must be a run folder, got {self.teachers!r}")

    def fit_start(self, state: StepState) -> None:
        self.teacher_epochs = self.params.teacher_epochs  # (None: the run's length, fixed when first asked)

    def teacher_runs(self, state: StepState) -> tuple[TeacherRun, ...]:
        if self.teacher_epochs is None:  # (a run resumed with more epochs keeps its teachers' budget)
            self.teacher_epochs = state.run_epochs
        if self.teacher_epochs is None:
            raise ValueError("umt: set teacher_epochs (the loop gave no run length)")
        return tuple(TeacherRun(m, self.teacher_epochs, self.params.teachers) for m in state.modalities)

    def state_dict(self):
        return {"teacher_epochs": self.teacher_epochs}

    def load_state_dict(self, state):
        self.teacher_epochs = state["teacher_epochs"]

    def after_forward(self, state: StepState) -> None:
        missing = [m for m in state.modalities if m not in state.teachers]
        if missing:
            raise RuntimeError(f"umt: no teacher for {missing}; the loop trains them before the first step "
                               f"(Balancer.teacher_runs / observe_teacher)")
        with torch.no_grad(), state.autocast():  # (the step's precision)
            targets = [state.teachers[m].features(state.inputs).float() for m in state.modalities]
        students = state.undropped or state.features  # (the encoders' features, before any drop)
        per_sample = sum((f.float() - t).square().mean(dim=1) for f, t in zip(students, targets))
        term = self.params.scaling * state.batch_mean(per_sample)
        state.extra_losses["umt/distill"] = term
        state.metrics["umt/distill"] = term.detach()

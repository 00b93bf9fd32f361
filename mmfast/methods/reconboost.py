"""``reconboost``: ReconBoost, alternating boosting across modalities (Hua et al., ICML 2024;
docs/methods/reconboost.md), as the official code computes it.

The model is one learner per modality, h_m(x_m) = h(phi_m) through a classifier shared by all
modalities, and the ensemble F = beta sum_m h_m(x_m) with a learned scalar beta (fusion=ensemble,
mmfast.models.heads.SharedHead). Training runs in stages; stage s trains modality m = s mod M
(the modalities in turn) in two phases of whole epochs, each starting with a fresh optimizer
state (the official code builds a new SGD per phase):

    phase 1 (``phase1_epochs``): only m's learner (its encoder and the shared classifier); with
            q = softmax(sg(beta sum_{k != m} h_k(x_k))) what the other modalities' ensemble
            predicts and p = softmax(h_m(x_m)), per sample
            l_i = -(1/C) (w1 - w2 q[i, y_i]) log p[i, y_i]   (samples the others get wrong weigh more)
    phase 2 (``phase2_epochs``): every learner and beta, CE(F, y) (global rectification)

Inference: F. Epoch e is in stage e // (phase1_epochs + phase2_epochs). The official "GA" term
is detached on both sides (no gradient) in the official code and the toolkit: not offered.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .base import Method, StepState, check_number


class ReconBoost(Method):
    name = "reconboost"
    fusions = ("ensemble",)
    computes_task_loss = True
    skips_parameters = True  # (phase 1 trains one learner)

    @dataclasses.dataclass
    class Params:
        w1: float = 5.0  # the official CREMA-D setting (README; AVE and ModelNet40: 4), also the toolkit's
        w2: float = 1.0  # official README and toolkit
        phase1_epochs: int = 4  # E1: the official README (the toolkit: 1)
        phase2_epochs: int = 4  # E2: the official README (the toolkit: 1)
        beta: float = 1.0  # beta's initial value: the official code (the toolkit: 0.01)
        fresh_optimizer: bool = True  # official: a new optimizer per phase (the toolkit keeps one)

        def check(self):
            check_number("reconboost", "w1", self.w1)
            check_number("reconboost", "w2", self.w2)
            check_number("reconboost", "phase1_epochs", self.phase1_epochs, low=1, integer=True)
            check_number("reconboost", "phase2_epochs", self.phase2_epochs, low=0, integer=True)
            check_number("reconboost", "beta", self.beta)
            if not isinstance(self.fresh_optimizer, bool):
                raise ValueError(f"reconboost.fresh_optimizer must be true or false, got {self.fresh_optimizer!r}")

    def fit_start(self, state: StepState) -> None:
        beta = getattr(state.head, "beta", None)
        if not isinstance(beta, torch.nn.Parameter):
            raise ValueError("reconboost trains an ensemble through a shared classifier (fusion=ensemble, "
                             f"mmfast.models.heads.SharedHead): pass it as head=, got {type(state.head).__name__}")
        with torch.no_grad():
            beta.fill_(self.params.beta)
        self.reset_epoch = None  # (the last epoch whose phase start cleared the optimizer state)
        self._M = len(state.modalities)

    def schedule(self, epoch: int) -> tuple[int, int]:
        """(phase 1 or 2, the modality index) of an epoch."""
        length = self.params.phase1_epochs + self.params.phase2_epochs
        stage, within = divmod(epoch, length)
        return (1 if within < self.params.phase1_epochs else 2), stage % self._M

    def epoch_start(self, state: StepState) -> None:
        within = state.epoch % (self.params.phase1_epochs + self.params.phase2_epochs)
        starts = within in (0, self.params.phase1_epochs)
        if starts and self.params.fresh_optimizer and self.reset_epoch != state.epoch:
            if state.optimizer is None:
                raise RuntimeError("reconboost starts each phase with a fresh optimizer: pass optimizer= to Balancer")
            state.optimizer.state.clear()  # (momentum and Adam moments start over; the learning rate stays)
            self.reset_epoch = state.epoch

    def before_fusion(self, state: StepState) -> None:
        phase, m = self.schedule(state.epoch)
        if phase == 1:  # (the other learners only predict: no gradient reaches them)
            state.features = [f if j == m else f.detach() for j, f in enumerate(state.features)]

    def after_forward(self, state: StepState) -> None:
        phase, m = self.schedule(state.epoch)
        labels = state.labels
        state.metrics["reconboost/beta"] = state.head.beta.detach()
        if phase == 2:
            fused = state.head_logits["fused"].float()
            state.task_loss = state.batch_mean(F.cross_entropy(fused, labels, reduction="none"))
            return
        unimodal = state.head_logits["unimodal"].float()  # [M, B, C]
        M, B, C = unimodal.shape
        others = torch.ones(M, device=unimodal.device)
        others[m] = 0
        beta = state.head.beta.detach().float()
        q = torch.softmax(beta * (others.view(M, 1, 1) * unimodal.detach()).sum(dim=0), dim=1)
        q_true = q.gather(1, labels.view(-1, 1)).squeeze(1)
        log_p_true = unimodal[m].log_softmax(dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
        per_sample = -(self.params.w1 - self.params.w2 * q_true) * log_p_true / C
        state.task_loss = state.batch_mean(per_sample)

    def state_dict(self):
        return {"reset_epoch": self.reset_epoch}

    def load_state_dict(self, state):
        self.reset_epoch = state["reset_epoch"]

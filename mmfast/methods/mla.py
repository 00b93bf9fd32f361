"""``mla``: multimodal learning with alternating uni-modal adaptation (Zhang, Yoon, Bansal,
Yao, CVPR 2024; docs/methods/mla.md).

No fused objective is trained. Each training step is M sub-steps, one per modality in a fixed
order, each with its own optimizer step: only that modality's encoder runs (the others'
features are zeros) and the loss is CE(h(phi_m), y) through one classifier h(z) = W z + b
shared by all modalities (fusion=shared, mmfast.models.heads.SharedHead). A projection P
(d x d, from the identity, kept over the whole run) limits how much a modality's step undoes
what the others taught the shared head: after each sub-step's backward but the very first of
the run, with r the batch-mean feature of the modality (1 x d), lam = 1 + b / n (b the batch's
index in the epoch, n the epoch's batches) and a = 0.1^lam,

    k = P r^T;  P <- P - k k^T / (a + r k);  P <- P / ||P||_F;  grad_W <- grad_W P^T

(``projection="replace"``; the bias's gradient is untouched). The official code means this but
never applies it (a parameter-name mismatch); the toolkit adds the projected gradient to the
raw one instead (``projection="add"``: grad_W <- grad_W (I + P^T)); ``"none"`` trains without it.
Inference (the head's combine): per sample, sum_m g_m h(phi_m) with g = softmax_m(-H_m), H_m the
entropy of softmax(h(phi_m)) (``fusion_gate="entropy"``), or the mean of the o_m ("equal").
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .base import Method, StepState, check_choice

PROJECTIONS = ("replace", "add", "none")
GATES = ("entropy", "equal")


class MLA(Method):
    name = "mla"
    fusions = ("shared",)
    computes_task_loss = True

    @dataclasses.dataclass
    class Params:
        projection: str = "replace"  # the paper's gradient modification (module doc); "add": the toolkit's
        fusion_gate: str = "entropy"  # the paper's dynamic fusion, per sample (the official code: per batch)

        def check(self):
            check_choice("mla", "projection", self.projection, PROJECTIONS)
            check_choice("mla", "fusion_gate", self.fusion_gate, GATES)

    def fit_start(self, state: StepState) -> None:
        head = state.head
        if not hasattr(head, "fc") or getattr(head, "combine", None) not in ("entropy", "equal"):
            raise ValueError("mla trains a classifier shared by every modality (fusion=shared, "
                             f"mmfast.models.heads.SharedHead): pass it as head=, got {type(head).__name__}")
        head.combine = self.params.fusion_gate
        d = head.fc.weight.shape[1]
        self.P = torch.eye(d, device=state.device)
        self.started = False  # (the run's first modality step leaves P and the gradient alone)
        self.batch, self.batch_epoch = 0, None
        self._mean_feature = None

    def update_parts(self, state: StepState):
        return [(name,) for name in state.modalities]

    def epoch_start(self, state: StepState) -> None:
        if self.batch_epoch != state.epoch:  # (a resumed epoch keeps its count)
            self.batch, self.batch_epoch = 0, state.epoch

    def after_forward(self, state: StepState) -> None:
        if state.part is None or len(state.part) != 1:
            raise ValueError("mla trains one modality per sub-step: run a step for every part of "
                             "Balancer.update_parts(), passing it to drop(features, part=part)")
        m = state.modalities.index(state.part[0])
        logits = state.head_logits["unimodal"][m].float()
        state.task_loss = state.batch_mean(F.cross_entropy(logits, state.labels, reduction="none"))
        with torch.no_grad():
            feature = state.features[m].float()
            mean = state.batch_mean(feature.T)  # [d]: this rank's share of the global batch mean
            self._mean_feature = state.dist.all_reduce_sum(mean) if state.dist.enabled else mean

    def after_backward(self, state: StepState) -> None:
        if self.params.projection == "none" or self._mean_feature is None:
            return
        if not self.started:
            self.started = True
            return
        n = state.batches_per_epoch
        if n is None:
            raise ValueError("mla's projection strength follows the batch's place in the epoch: pass "
                             "Balancer.start_epoch(epoch, batches=len(loader)); the trainer does")
        a = 0.1 ** (1.0 + self.batch / n)
        with torch.no_grad():
            r = self._mean_feature.view(1, -1)
            k = self.P @ r.T  # [d, 1]
            self.P = self.P - (k @ k.T) / (a + r @ k)
            self.P = self.P / torch.linalg.matrix_norm(self.P)
            state.metrics["mla/projection_trace"] = torch.trace(self.P)  # (sqrt(d) at the identity, normalised)
            grad = state.head.fc.weight.grad
            if grad is not None:
                projected = grad @ self.P.T.to(grad.dtype)
                grad.copy_(projected if self.params.projection == "replace" else grad + projected)
        self._mean_feature = None

    def after_step(self, state: StepState) -> None:
        if state.part is None or state.part[0] == state.modalities[-1]:
            self.batch += 1

    def state_dict(self):
        return {"P": self.P.clone(), "started": self.started, "batch": self.batch, "batch_epoch": self.batch_epoch}

    def load_state_dict(self, state):
        self.P = state["P"].to(self.P.device)
        self.started, self.batch, self.batch_epoch = state["started"], state["batch"], state["batch_epoch"]

"""``amco``: adaptive mask co-optimization (Zhou et al., ICASSP 2023; docs/methods/amco.md), as the
field's toolkit (BalanceBenchmark) computes it: no official code was found and the paper's
formulas could not be checked.

The model's head is `amco` (mmfast.models.fusion.MixedConcatHead): the weight-split uni-modal
logits o_m = W_m phi_m + b / M, summed, then a C x C layer g across the classes. In a step of
the window:

    progress l: 0 when an epoch starts, + epoch / 10 after each batch (host numbers)
    p = sin(pi / 2 * min(eps, l) / eps),  N = floor(p C)
    u = a class mask with N zeros at classes drawn uniformly (one mask for the batch)
    o_m <- o_m * u  for each modality m flagged dependent (dep_m, from the previous step)
    L = CE(g(sum_m o_m), y) + sum_m CE(o_m, y)
    share_m = mean_i of the softmax of [o_1 .. o_M] (all M C logits of sample i) over block m
    dep_m <- share_m > sigma   (from the masked logits; read at the next step)

Outside the window: L = CE(g(sum_m o_m), y), no mask, no update. The flags live on the device:
the mask is applied with torch.where, never by a host branch.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..models.registry import per_head_cross_entropy
from .base import Method, StepState, WindowParams, check_number


def mask_size(progress: float, eps: float, num_classes: int) -> int:
    """N = floor(sin(pi / 2 * min(eps, l) / eps) * C): how many classes the mask zeroes."""
    return math.floor(math.sin(math.pi / 2 * min(eps, progress) / eps) * num_classes)


def class_mask(num_classes: int, zeros: int, generator: torch.Generator, device) -> torch.Tensor:
    """[C] float: ones, with `zeros` zeros at classes drawn uniformly without replacement."""
    order = torch.randperm(num_classes, generator=generator, device=device)
    u = torch.ones(num_classes, device=device)
    u[order[:zeros]] = 0.0  # (the classes drawn first)
    return u


def dependence_shares(logits: torch.Tensor) -> torch.Tensor:
    """[M, B]: each modality's share of the softmax over the M C logits of each sample."""
    M, B, C = logits.shape
    probs = torch.softmax(logits.float().permute(1, 0, 2).reshape(B, M * C), dim=1)
    return probs.view(B, M, C).sum(dim=2).t()


class AMCo(Method):
    name = "amco"
    fusions = ("amco",)
    computes_task_loss = True
    single_micro_batch = True  # (the flags and the progress move per batch, as the toolkit's step)

    @dataclasses.dataclass
    class Params(WindowParams):
        sigma: float = 0.5  # the dependence threshold: the toolkit's default (its trainer_config.yaml)
        eps: float = 0.3  # the progress at which the mask covers every class: the toolkit's default

        def check(self):
            check_number("amco", "sigma", self.sigma, low=0, high=1)
            check_number("amco", "eps", self.eps, low=0)
            if self.eps <= 0:
                raise ValueError(f"amco.eps must be > 0, got {self.eps!r}")
            self.check_window("amco")

    def fit_start(self, state: StepState) -> None:
        if not isinstance(getattr(state.head, "mix", None), torch.nn.Linear):
            raise ValueError("amco trains the amco head (mmfast.models.fusion.MixedConcatHead: model.fusion=amco); "
                             f"the loop's head is {type(state.head).__name__}")
        self.dependent = torch.zeros(len(state.modalities), dtype=torch.bool, device=state.device)
        self.progress, self.started = 0.0, None

    def epoch_start(self, state: StepState) -> None:
        if state.epoch != self.started:  # (a resumed epoch keeps its progress)
            self.progress, self.started = 0.0, state.epoch

    def after_forward(self, state: StepState) -> None:
        o = state.trainable_unimodal()  # [M, B, C] with autograd: W_m phi_m + b / M
        mix = state.head.mix
        if not self.params.active(state.epoch):
            state.task_loss = state.batch_mean(F.cross_entropy(mix(o.sum(dim=0)).float(), state.labels,
                                                               reduction="none"))
            return
        M, B, C = o.shape
        u = class_mask(C, mask_size(self.progress, self.params.eps, C), state.generator, o.device).to(o.dtype)
        masked = torch.where(self.dependent.view(M, 1, 1), o * u, o)
        fused = mix(masked.sum(dim=0))
        per_sample = (F.cross_entropy(fused.float(), state.labels, reduction="none")
                      + per_head_cross_entropy(masked, state.labels).sum(dim=0))
        state.task_loss = state.batch_mean(per_sample)
        with torch.no_grad():
            shares = state.batch_mean(dependence_shares(masked.detach()))  # [M]
            if state.dist.enabled:
                shares = state.dist.all_reduce_sum(shares)
            self.dependent = shares > self.params.sigma
        for m, name in enumerate(state.modalities):
            state.metrics[f"amco/share/{name}"] = shares[m]
            state.metrics[f"amco/dependent/{name}"] = self.dependent[m].float()

    def after_step(self, state: StepState) -> None:
        if self.params.active(state.epoch):
            self.progress += state.epoch / 10

    def state_dict(self):
        return {"dependent": self.dependent.clone(), "progress": self.progress, "started": self.started}

    def load_state_dict(self, state):
        self.dependent = state["dependent"].to(self.dependent.device)
        self.progress, self.started = float(state["progress"]), state["started"]

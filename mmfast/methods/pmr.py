"""``pmr``: prototypical modal rebalance (Fan et al., CVPR 2023; docs/methods/pmr.md), as the
official code computes it.

Class prototypes c_m [C, d_m] per modality are the mean encoder feature of each class over a
part of the training split (evaluation transforms, eval mode, no autograd), recomputed before
training and after every epoch, with momentum from the second computation on:
c <- (1 - mu) c_new + mu c_old. In a step, each modality's prototype logits are
sim_m = -||phi_m[i] - c_m[k]|| [B, C] (prototypes constant) and its progress
S_m = sum_i softmax(sim_m)[i, y_i]. The slower modality gets a prototype cross-entropy term:

    loss = CE(fused) + alpha sum_{m: rho_m < 1} CE(sim_m),  rho_m = S_m / mean_{j != m} S_j

which for two modalities is the paper's rule (rho = S_a / S_v > 1: the term on v; < 1: on a;
equal: none). Its gradient reaches only that modality's encoder. The paper's prototype entropy
regulariser for the dominant modality is absent from the official code and not offered.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .base import POOLED_FUSIONS, Method, StepState, check_number


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean feature per class [C, d], whether the class has samples [C])."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    return sums / counts.clamp_min(1).unsqueeze(1), counts > 0


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-||phi_i - c_k||_2 [B, C]."""
    return -torch.cdist(features, prototypes.to(features.dtype))


class PMR(Method):
    name = "pmr"
    fusions = POOLED_FUSIONS
    adds_loss_terms = True
    evaluation_features = True

    @dataclasses.dataclass
    class Params:
        alpha: float = 1.0  # the official default (main_Prototype_grad.py); its scripts use 0.5-5; the toolkit 0.6
        mu: float = 0.2  # prototype momentum: the official default (its scripts mostly 0.0; the toolkit 0.5)
        fraction: float = 0.1  # share of the training split the prototypes average: the official first 10% of batches

        def check(self):
            check_number("pmr", "alpha", self.alpha, low=0)
            check_number("pmr", "mu", self.mu, low=0, high=1)
            check_number("pmr", "fraction", self.fraction, low=0, high=1)
            if self.fraction <= 0:
                raise ValueError(f"pmr.fraction must be > 0, got {self.fraction!r}")

    def fit_start(self, state: StepState) -> None:
        self.prototypes: list[torch.Tensor] | None = None

    def evaluations(self, epoch):
        return ("train",)

    def evaluation_end(self, state: StepState) -> None:
        e = state.evaluation
        if e["split"] != "train":
            return
        features, labels = e["features"], e["labels"]
        N, C = labels.shape[0], e["fused"].shape[1]
        # (a random share of the split, drawn from the seed and the epoch: the same on every rank)
        gen = torch.Generator().manual_seed(state.seed * 100003 + (-1 if e["epoch"] is None else e["epoch"]))
        take = torch.randperm(N, generator=gen)[:max(1, round(self.params.fraction * N))].to(labels.device)
        new = [class_means(f[take].float(), labels[take], C) for f in features]
        seen = new[0][1]  # [C]: the classes this share holds
        if self.prototypes is None:  # (a class not seen yet: a zero prototype until it is)
            self.prototypes, self.seen = [c for c, _ in new], seen
        else:  # momentum for classes seen before; a first sighting sets the mean; a missed class keeps its own
            mu = self.params.mu
            self.prototypes = [torch.where((seen & self.seen)[:, None], (1 - mu) * c + mu * old,
                                           torch.where(seen[:, None], c, old))
                               for (c, _), old in zip(new, self.prototypes)]
            self.seen = self.seen | seen

    def after_forward(self, state: StepState) -> None:
        if self.prototypes is None:
            raise RuntimeError("pmr needs its class prototypes before training: evaluate the splits "
                               "Balancer.evaluations(None) names with features and hand them over "
                               "(Balancer.observe_evaluation(..., features=...)) first; the trainer does")
        sims = [prototype_logits(f.float(), c) for f, c in zip(state.features, self.prototypes)]
        M, labels = len(sims), state.labels
        with torch.no_grad():
            S = torch.stack([s.softmax(dim=1).gather(1, labels.view(-1, 1)).sum() for s in sims])
            if state.dist.enabled:
                S = state.dist.all_reduce_sum(S)
            rho = S * (M - 1) / (S.sum() - S).clamp_min(1e-12)
            slow = (rho < 1).float()
        pce = torch.stack([F.cross_entropy(s, labels, reduction="none") for s in sims])  # [M, B]
        state.extra_losses["pmr/pce"] = self.params.alpha * state.batch_mean((slow.view(-1, 1) * pce).sum(dim=0))
        for m, name in enumerate(state.modalities):
            state.metrics[f"pmr/rho/{name}"] = rho[m]

    def state_dict(self):
        return {"prototypes": None if self.prototypes is None else [c.clone() for c in self.prototypes],
                "seen": None if self.prototypes is None else self.seen.clone()}

    def load_state_dict(self, state):
        protos = state.get("prototypes")
        self.prototypes = None if protos is None else list(protos)
        self.seen = state.get("seen")

"""``cml``: calibrating multimodal learning (Ma et al., ICML 2023; docs/methods/cml.md).

Principle: a prediction's confidence should not rise when a modality is removed. With the
concat head, the logits of a modality subset S cost no forward: o_S = sum_{m in S} W_m phi_m + b
(the kept modalities' terms and the full bias, in float32). conf = max_c softmax. A step is one
batch (the hinges sum over it; no gradient accumulation).

    paper    per step, S' a random proper non-empty subset (drawn on the device);
             loss = CE(f) + lam sum_i max(0, conf_i(S') - conf_i(all))
    toolkit  per epoch the modality order is shuffled once; the subsets S_0 = all, S_k = S_{k-1}
             minus the order's k-th last modality (down to one modality);
             loss = mean_k CE(o_{S_k}) + lam sum_k max(0, sum_i (conf_i(S_k) - conf_i(S_{k-1})))
             (a hinge on the batch sum, where violating and other samples cancel)

The paper's text could not be read (only its abstract): the per-sample hinge is its stated
principle, and its exact regulariser (the subset rule, whether the subsets' cross-entropy is
trained) is not verified. The sums run over the batch (over the global batch in a distributed
run; a share per rank).
"""
from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F

from .base import Method, StepState, WindowParams, check_choice, check_number

VARIANTS = ("paper", "toolkit")


def subset_logits(partial: torch.Tensor, bias: torch.Tensor | None, removed: torch.Tensor) -> torch.Tensor:
    """o_S = sum_{m kept} W_m phi_m + b: partial [M, B, C] (W_m phi_m), removed [M] (1 for a
    removed modality)."""
    kept = (1 - removed.to(partial.dtype)).view(-1, 1, 1)
    out = (kept * partial).sum(dim=0)
    return out if bias is None else out + bias.to(out.dtype)


def confidence(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1).amax(dim=-1)


class CML(Method):
    name = "cml"
    fusions = ("concat",)
    computes_task_loss = True
    single_micro_batch = True  # (its hinges sum over the batch: a micro-batch would see a part of it)

    @dataclasses.dataclass
    class Params(WindowParams):
        lam: float = 0.1  # the toolkit's (trainer_config.yaml); the paper's value is not verified
        variant: str = "paper"  # "paper" (per-sample hinge, random subset) | "toolkit" (module doc)

        def check(self):
            check_number("cml", "lam", self.lam, low=0)
            check_choice("cml", "variant", self.variant, VARIANTS)
            self.check_window("cml")

    def fit_start(self, state: StepState) -> None:
        self.order = list(range(len(state.modalities)))

    def epoch_start(self, state: StepState) -> None:
        # (the toolkit's removal order, fixed for the epoch: a function of the seed and the epoch)
        self.order = list(range(len(state.modalities)))
        random.Random(state.seed * 100003 + state.epoch).shuffle(self.order)

    def after_forward(self, state: StepState) -> None:
        fused = state.head_logits["fused"].float()
        labels = state.labels
        if not self.params.active(state.epoch):
            state.task_loss = state.batch_mean(F.cross_entropy(fused, labels, reduction="none"))
            return
        partial = state.head.partial_logits(state.features).float()  # [M, B, C], W_m phi_m
        bias = state.head.fc.bias
        M = partial.shape[0]
        fused = subset_logits(partial, bias, torch.zeros(M, device=partial.device))  # (in float32, as the subsets)
        if self.params.variant == "paper":
            removed = self._random_subset(state, M)
            conf_gap = confidence(subset_logits(partial, bias, removed)) - confidence(fused)
            state.task_loss = state.batch_mean(F.cross_entropy(fused, labels, reduction="none"))
            state.extra_losses["cml/hinge"] = self.params.lam * conf_gap.clamp_min(0).sum()
            return
        removed = torch.zeros(M, device=fused.device)
        logits, ce, hinge = fused, F.cross_entropy(fused, labels, reduction="none"), 0
        for r in reversed(self.order[1:]):  # (M - 1 nested removals: down to one modality)
            removed = removed.clone()
            removed[r] = 1
            smaller = subset_logits(partial, bias, removed)
            ce = ce + F.cross_entropy(smaller, labels, reduction="none")
            local = (confidence(smaller) - confidence(logits)).sum()
            total = state.dist.all_reduce_sum(local.detach()) if state.dist.enabled else local.detach()
            hinge = hinge + local * (total > 0)  # (the global sum's hinge; its gradient: this rank's share)
            logits = smaller
        state.task_loss = state.batch_mean(ce / M)
        state.extra_losses["cml/hinge"] = self.params.lam * hinge

    def _random_subset(self, state: StepState, M: int) -> torch.Tensor:
        """[M] removal mask of a proper non-empty kept subset, uniform over the 2^M - 2 of them,
        drawn with the run's device generator (no host read)."""
        code = torch.randint(1, 2 ** M - 1, (), generator=state.generator, device=state.device)
        bits = (code >> torch.arange(M, device=state.device)) & 1  # 1: kept
        return 1 - bits

"""``mmpareto``: MMPareto (Wei & Hu, ICML 2024; docs/methods/mmpareto.md), as the official code
computes it.

The model has a classifier per modality besides the fused one (fusion=late) and trains
L = L_mm + sum_m L_m. Each encoder m gets two gradients: g1 of the multimodal loss and g2 of
its own uni-modal loss (over all of encoder m's parameters). When they agree (cos > 0) they
are weighted (1/2, 1/2); otherwise by the two-gradient min-norm solution c g1 + (1 - c) g2,

    c = (|g2|^2 - <g1, g2>) / |g1 - g2|^2   (0.999 if <g1, g2> >= |g1|^2, 0.001 if >= |g2|^2)

Then, per parameter tensor theta of encoder m: d = 2 c1 g1 + 2 c2 g2 and

    grad_theta <- gamma d max(1, |grad_theta| / |d|)

with grad_theta the summed loss's gradient (= g1 + g2 on an encoder; the uni-modal gradient
keeps the larger magnitude). Heads keep the summed gradient. One extra backward per step:
g2 of every encoder comes from one autograd.grad of sum_m L_m (L_k reaches encoder k only),
and g1 = grad - g2 after the step's backward. Everything runs as foreach ops on the device.
"""
from __future__ import annotations

import dataclasses

import torch

from ..models.registry import per_head_cross_entropy
from .base import Method, StepState, check_number


def pareto_weights(sq1: torch.Tensor, sq2: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """c1 [M] of (c1, 1 - c1) per modality from |g1|^2, |g2|^2 and <g1, g2> [M]."""
    cos_positive = dot > 0
    c = (sq2 - dot) / (sq1 + sq2 - 2 * dot).clamp_min(1e-30)
    c = torch.where(dot >= sq1, torch.full_like(c, 0.999), torch.where(dot >= sq2, torch.full_like(c, 0.001), c))
    return torch.where(cos_positive, torch.full_like(c, 0.5), c)


class MMPareto(Method):
    name = "mmpareto"
    fusions = ("late",)
    computes_task_loss = True  # (L_mm + sum_m L_m: the uni-modal gradients are taken from its terms)
    single_micro_batch = True  # (the uni-modal gradient of the step is taken from its one backward)

    @dataclasses.dataclass
    class Params:
        gamma: float = 1.5  # the official code's constant (MMPareto.py); the toolkit's alpha 1.5

        def check(self):
            check_number("mmpareto", "gamma", self.gamma, low=0)

    def fit_start(self, state: StepState) -> None:
        self.params_list, index = [], []
        for m, encoder in enumerate(state.encoders.values()):
            for p in encoder.parameters():
                if p.requires_grad:
                    self.params_list.append(p)
                    index.append(m)
        self.index = torch.tensor(index, device=state.device)
        self.M = len(state.modalities)
        self._unimodal_grads = None

    def after_forward(self, state: StepState) -> None:
        if self._unimodal_grads is not None:
            raise RuntimeError("mmpareto takes one batch per step (its uni-modal gradients are those of the step's "
                               "one backward): call after_backward before the next after_forward")
        unimodal = state.head_logits["unimodal"].float()  # [M, B, C] of the modalities' own classifiers
        loss = state.batch_mean(per_head_cross_entropy(unimodal, state.labels).sum(dim=0))
        fused_ce = torch.nn.functional.cross_entropy(state.head_logits["fused"].float(), state.labels, reduction="none")
        state.task_loss = state.batch_mean(fused_ce) + loss
        if state.dist.enabled:
            loss = loss * state.dist.world_size  # (as Balancer.loss scales the step's loss)
        grads = torch.autograd.grad(loss, self.params_list, retain_graph=True, allow_unused=True)
        self._unimodal_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params_list, grads)]
        if state.dist.enabled:  # (the average over the ranks, as DDP averages the step's gradients)
            flat = torch.cat([g.reshape(-1) for g in self._unimodal_grads])
            flat = state.dist.all_reduce_sum(flat) / state.dist.world_size
            self._unimodal_grads = list(torch.split(flat, [g.numel() for g in self._unimodal_grads]))
            self._unimodal_grads = [g.view_as(p) for g, p in zip(self._unimodal_grads, self.params_list)]

    def after_backward(self, state: StepState) -> None:
        if self._unimodal_grads is None:
            return
        # (parameters the step left without a gradient, an unused branch, take no part; a Python
        # test of None, no tensor read)
        present = [i for i, p in enumerate(self.params_list) if p.grad is not None]
        if not present:
            self._unimodal_grads = None
            return
        grads = [self.params_list[i].grad for i in present]
        g2 = [self._unimodal_grads[i] for i in present]
        index = self.index if len(present) == len(self.params_list) else self.index[present]
        g1 = torch._foreach_sub(grads, g2)
        sq1 = torch.stack(torch._foreach_norm(g1)).pow(2)
        sq2 = torch.stack(torch._foreach_norm(g2)).pow(2)
        sqsum = torch.stack(torch._foreach_norm(grads)).pow(2)  # |g1 + g2|^2 per tensor
        per_modality = lambda v: torch.zeros(self.M, device=v.device, dtype=v.dtype).index_add_(0, index, v)  # noqa: E731
        S1, S2, S12 = per_modality(sq1), per_modality(sq2), per_modality(sqsum)
        dot = (S12 - S1 - S2) / 2
        c1 = pareto_weights(S1, S2, dot)
        c1_t, c2_t = (2 * c1)[index].unbind(), (2 * (1 - c1))[index].unbind()
        d = torch._foreach_add(torch._foreach_mul(g1, c1_t), torch._foreach_mul(g2, c2_t))
        d_norm = torch.stack(torch._foreach_norm(d))
        grad_norm = sqsum.sqrt()
        scale = self.params.gamma * torch.where(d_norm > 0, (grad_norm / d_norm.clamp_min(1e-30)).clamp_min(1.0),
                                                torch.ones_like(d_norm))
        torch._foreach_mul_(d, scale.unbind())
        torch._foreach_copy_(grads, d)
        cos = dot / (S1.sqrt() * S2.sqrt()).clamp_min(1e-30)
        for m, name in enumerate(state.modalities):
            state.metrics[f"mmpareto/cos/{name}"] = cos[m]
            state.metrics[f"mmpareto/c_multimodal/{name}"] = c1[m]
        self._unimodal_grads = None

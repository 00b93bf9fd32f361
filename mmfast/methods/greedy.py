"""``greedy``: balanced multimodal learning against greedy learning (Wu et al., ICML 2022;
docs/methods/greedy.md), as the official code computes it.

The model's encoders exchange channel gates through MMTM blocks (mmfast/models/mmtm.py). After
each backward the method measures each modality's conditional learning speed from its relative
gradient energies, own ("main") parameters against cross-modal ("bypass") MMTM parameters:

    mu_main,m = sum ||g||^2 / sum ||theta||^2 over modality m's encoder (and its part of the head)
    mu_byp,m  = the same over the MMTM layers of m and the shared squeeze layers
    M_main,m += mu_main,m,  M_byp,m += mu_byp,m        (cumulative since the run started)
    BDR_m = log10(M_byp,m / M_main,m),  d = BDR_0 - BDR_1

and runs a state machine whose flags the *next* forward uses: when not curating and |d| > eps,
curate modality 0 if d > 0 else 1 for `window` steps (its MMTM gates replaced by their running
averages: it must learn from its own input); while curating, d is neither recomputed nor
accumulated. Before start_epoch (and after end_epoch) d is measured every step and nothing is
curated. The task loss is the sum of the modalities' classifiers' cross-entropies (the official
model's branch heads; the `sum` head holds them), or the fused cross-entropy (loss="fused").
Everything stays on the device: the sums are one foreach norm over the measured tensors and one
product with their membership matrix; the flags are device tensors.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..models.registry import per_head_cross_entropy
from .base import Method, StepState, WindowParams, check_choice, check_number

class Greedy(Method):
    name = "greedy"
    fusions = ("sum", "concat")
    computes_task_loss = True
    max_modalities = 2  # (d compares two branches)
    mmtm_stages = (2, 3, 4)  # the official model's MMTM blocks after ResNet-18's layer2..layer4

    @dataclasses.dataclass
    class Params(WindowParams):
        # The official run's curation threshold and window (its training_guided config); the
        # toolkit's threshold is 0.001.
        eps: float = 0.01
        window: int = 5
        # Official starting_epoch = 2 counts epochs from 1: curation from the second epoch on.
        start_epoch: int = 1
        loss: str = "branches"  # "branches": sum of the modalities' classifiers' CE (official); "fused"

        def check(self):
            self.check_window("greedy")
            check_number("greedy", "eps", self.eps, low=0.0)
            check_number("greedy", "window", self.window, low=1, integer=True)
            check_choice("greedy", "loss", self.loss, ("branches", "fused"))

    def fit_start(self, state: StepState) -> None:
        if len(state.modalities) != 2:
            raise ValueError(f"greedy compares the learning speeds of two modalities, got {state.modalities}")
        if state.mmtm is None:
            raise ValueError("greedy needs MMTM blocks between the encoders: build the model with mmtm stages "
                             "(model.mmtm; Balancer(mmtm=model.mmtm))")
        groups = [list(state.encoders[name].parameters()) for name in state.modalities]
        parts = getattr(state.head, "modality_modules", None)  # (the official branch heads count as main)
        if parts is not None:
            groups = [g + list(part.parameters()) for g, part in zip(groups, parts)]
        groups += [state.mmtm.modality_parameters(m) for m in range(2)]
        self.tensors = list({id(p): p for g in groups for p in g}.values())
        self.values = [p.detach() for p in self.tensors]  # (views of the parameters: their current values)
        row = {id(p): i for i, p in enumerate(self.tensors)}
        member = torch.zeros(len(self.tensors), 4, dtype=torch.float64)
        for j, g in enumerate(groups):
            member[[row[id(p)] for p in g], j] = 1.0
        self.member = member.to(state.device)
        self._no_grad = torch.zeros((), device=state.device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=state.device)  # M_main,0 M_main,1 M_byp,0 M_byp,1
        self.d = torch.zeros((), dtype=torch.float64, device=state.device)
        self.t = torch.zeros((), dtype=torch.int64, device=state.device)

    def after_forward(self, state: StepState) -> None:
        if self.params.loss == "branches":
            per_sample = per_head_cross_entropy(state.trainable_unimodal(), state.labels).sum(dim=0)
        else:
            per_sample = F.cross_entropy(state.head_logits["fused"].float(), state.labels, reduction="none")
        state.task_loss = state.batch_mean(per_sample)

    def speeds(self) -> torch.Tensor:
        """[4] float64: this step's relative gradient energies (main 0, main 1, bypass 0, bypass 1)."""
        grads = [p.grad if p.grad is not None else self._no_grad for p in self.tensors]
        g2 = torch.stack(torch._foreach_norm(grads)).double().square()
        w2 = torch.stack(torch._foreach_norm(self.values)).double().square()
        return (g2 @ self.member) / (w2 @ self.member)

    def after_backward(self, state: StepState) -> None:
        mmtm = state.mmtm
        mu = self.speeds()
        # A step with a non-finite gradient (fp16: the GradScaler skips it) is not measured: one
        # inf would turn the cumulative sums into NaN for the rest of the run.
        finite = torch.isfinite(mu).all()
        if not self.params.active(state.epoch):
            self.sums += torch.where(finite, mu, torch.zeros_like(mu))
            self.d = bdr_difference(self.sums)
            mmtm.curating.fill_(False)
            mmtm.caring.zero_()
        else:
            measuring = ~mmtm.curating & finite
            self.sums += torch.where(measuring, mu, torch.zeros_like(mu))
            d = bdr_difference(self.sums)
            self.d = torch.where(measuring, d, self.d)
            curating, caring, self.t = next_flags(mmtm.curating, mmtm.caring, self.t, d, self.params.eps,
                                                  self.params.window, measured=finite)
            mmtm.curating.copy_(curating)
            mmtm.caring.copy_(caring)
        state.metrics["greedy/d"] = self.d
        state.metrics["greedy/curating"] = mmtm.curating.float()
        state.metrics["greedy/caring"] = mmtm.caring.float()

    def state_dict(self):
        return {"sums": self.sums.cpu(), "d": self.d.cpu(), "t": self.t.cpu()}

    def load_state_dict(self, state):
        self.sums.copy_(state["sums"])
        self.d.copy_(state["d"])
        self.t.copy_(state["t"])


def bdr_difference(sums: torch.Tensor) -> torch.Tensor:
    """d = BDR_0 - BDR_1, BDR_m = log10(M_byp,m / M_main,m), from the speed sums [4]."""
    bdr = torch.log10(sums[2:] / sums[:2])  # (rows: main 0, main 1, bypass 0, bypass 1)
    return bdr[0] - bdr[1]


def next_flags(curating: torch.Tensor, caring: torch.Tensor, t: torch.Tensor, d: torch.Tensor, eps: float,
               window: int, measured=True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the curation state machine (device tensors in, device tensors out): not
    curating and |d| > eps starts curating modality 0 (d > 0) or 1 (d < 0) with t = 0, and
    |d| <= eps leaves modality 0 named; curating counts t up and stops when t reaches `window`
    (the modality stays named). `measured` False (a step with non-finite gradients): not curating
    stays as it was. Returns (curating, caring, t) for the next forward."""
    measuring = ~curating & measured
    start = measuring & (d.abs() > eps)
    t = torch.where(start, torch.zeros_like(t), torch.where(curating, t + 1, t))
    caring = torch.where(start, (d < 0).to(caring.dtype), torch.where(measuring, torch.zeros_like(caring), caring))
    return start | (curating & (t != window)), caring, t

"""``lfm``: learning-fitted modality gap (Yang, Wan, Jiang, Xu, NeurIPS 2024; docs/methods/lfm.md),
as the official code's default script computes it.

The model fuses by the mean of the modalities' classifiers (the `sum` head: each modality's own
linear classifier o_m; fused = sum_m o_m, whose argmax is the mean's). The loss trades the
classification of the mean against an alignment of the modalities' predictions, with weights
that move over the epochs:

    L = 2 (a_cls(e) CE(mean_m o_m, y) + a_al(e) A)
    A = mean over pairs (m, n) of (KL(r || p_m) + KL(r || p_n)) / 2,  r = (p_m + p_n) / 2,  p = softmax(o)
    a_cls(e) = sum_j c_j e^j (the official fitted curve over the 0-based epoch e of its 200-epoch
               run; curve_epochs stretches it over a shorter run),  a_al = 1 - a_cls

Per-sample terms, averaged over the batch. A is the official code's "JS" term: its KL runs from
the mixture to each prediction, which is not the Jensen-Shannon divergence (KL(p || r)); for two
modalities there is one pair.

schedule="learned" (the official code's other script): before every epoch, on a fixed batch of
held-out training clips (the first 8 of 16 left out of training),

    L_tot = a_cls CE + a_al A           (batch means; no factor 2)
    delta = mean over the first parameter tensor's entries of  H(L_tot) g_cls
            (g_cls = dCE/dtheta: a Hessian-vector product, the rows of the first tensor only)
    a_al <- clip(a_al - lr_a(e) delta, 0.05, 0.95),  a_cls = 1 - a_al,  lr_a(e) = 1e-4 / 2^floor(e / 20)

from (a_cls, a_al) = (0.05, 0.95), the weights on the device in float64 (no host read).
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F

from .base import HeldOut, Method, StepState, check_choice, check_number

# The official fitted curve a_cls(e) (its default script; a_al = 1 - a_cls), lowest power first.
FITTED_CURVE = (2.0462e-1, 3.3547e-3, 1.2299e-4, -2.9295e-6, 2.2384e-8, -5.3972e-11)
OFFICIAL_EPOCHS = 200  # the official CREMA-D run the curve was fitted over (its data/crema.json)


def fitted_weights(epoch: float) -> tuple[float, float]:
    """(a_cls, a_al) of the official fitted schedule at the 0-based epoch of its 200-epoch run."""
    a_cls = sum(c * epoch ** j for j, c in enumerate(FITTED_CURVE))
    return a_cls, 1.0 - a_cls


def alignment(logits: torch.Tensor) -> torch.Tensor:
    """[B]: the official alignment term of uni-modal logits [M, B, C], averaged over the pairs."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    terms = []
    for m, n in itertools.combinations(range(logits.shape[0]), 2):
        log_r = torch.logsumexp(torch.stack([log_p[m], log_p[n]]), dim=0) - math.log(2.0)
        r = log_r.exp()
        kl_m = (r * (log_r - log_p[m])).sum(dim=-1)  # KL(r || p_m)
        kl_n = (r * (log_r - log_p[n])).sum(dim=-1)
        terms.append((kl_m + kl_n) / 2)
    return torch.stack(terms).mean(dim=0)


def hypergradient(logits: torch.Tensor, labels: torch.Tensor, parameters, a_cls, a_al) -> torch.Tensor:
    """delta: the mean over the first parameter tensor's entries of the Hessian of L_tot = a_cls CE +
    a_al A (batch means of the uni-modal logits [M, N, C], with autograd to second order) times
    the gradient of CE, over `parameters` (the model's, in its order). Only the first tensor's
    rows of the product are formed (the official code forms every row and reads the first)."""
    ce = F.cross_entropy(logits.mean(dim=0), labels)
    total = a_cls * ce + a_al * alignment(logits).mean()
    g_total = torch.autograd.grad(total, parameters, create_graph=True, allow_unused=True)
    g_cls = torch.autograd.grad(ce, parameters, retain_graph=True, allow_unused=True)
    # (a parameter the losses do not reach, or whose gradient is constant, adds nothing)
    pairs = [(gt, gc) for gt, gc in zip(g_total, g_cls) if gt is not None and gt.requires_grad and gc is not None]
    first = parameters[0]
    if not pairs:
        return torch.zeros((), device=first.device)
    (hv,) = torch.autograd.grad([gt for gt, _ in pairs], [first], grad_outputs=[gc.detach() for _, gc in pairs],
                                allow_unused=True)
    return torch.zeros((), device=first.device) if hv is None else hv.mean()


class LFM(Method):
    name = "lfm"
    fusions = ("sum",)
    computes_task_loss = True

    @dataclasses.dataclass
    class Params:
        # "fitted": the official default script's curve (Crema_epoch.py, its README's command);
        # "learned": its hyper-gradient script (Crema_epoch_learnable.py)
        schedule: str = "fitted"
        # The run length the curve spans: epoch e reads the curve at e * 200 / curve_epochs. 200 (the
        # official run's length) reads it as published; a shorter run may stretch it (no source).
        curve_epochs: int = 200
        # The learned schedule's (all the official learnable script's):
        initial_a_cls: float = 0.05  # (a_cls, a_al) = (0.05, 0.95) before the first update
        alpha_lr: float = 1e-4  # lr_a at epoch 0
        alpha_lr_halving: int = 20  # lr_a halves at epochs 20, 40, ...
        a_al_min: float = 0.05  # a_al is clipped to [a_al_min, a_al_max] after each update
        a_al_max: float = 0.95
        held_out_clips: int = 16  # training clips left out of training
        held_out_batch: int = 8  # of which the first half forms the batch (the official code halves it)

        def check(self):
            check_choice("lfm", "schedule", self.schedule, ("fitted", "learned"))
            check_number("lfm", "curve_epochs", self.curve_epochs, low=1, integer=True)
            check_number("lfm", "initial_a_cls", self.initial_a_cls, low=0.0, high=1.0)
            check_number("lfm", "alpha_lr", self.alpha_lr, low=0.0)
            check_number("lfm", "alpha_lr_halving", self.alpha_lr_halving, low=1, integer=True)
            check_number("lfm", "a_al_min", self.a_al_min, low=0.0, high=1.0)
            check_number("lfm", "a_al_max", self.a_al_max, low=self.a_al_min, high=1.0)
            check_number("lfm", "held_out_clips", self.held_out_clips, low=1, integer=True)
            check_number("lfm", "held_out_batch", self.held_out_batch, low=1, high=self.held_out_clips, integer=True)

    @property
    def learned(self) -> bool:
        return self.params.schedule == "learned"

    def held_out(self, state: StepState) -> HeldOut | None:
        return HeldOut(self.params.held_out_clips, self.params.held_out_batch) if self.learned else None

    def fit_start(self, state: StepState) -> None:
        if self.learned:  # (device float64: updates of order 1e-6 are a few float32 steps at 0.95)
            self.a_al = torch.tensor(1.0 - self.params.initial_a_cls, dtype=torch.float64, device=state.device)
            self.a_cls = 1.0 - self.a_al
        self.epoch_start(state)

    def epoch_start(self, state: StepState) -> None:
        if self.learned:
            self._logged = self.a_cls
            return
        # (beyond the curve's 200 epochs it has no source and leaves [0, 1] from epoch 227 on: it is
        # held at its end value, a_cls(200) = 0.90)
        self.a_cls, self.a_al = fitted_weights(min(state.epoch * OFFICIAL_EPOCHS / self.params.curve_epochs,
                                                   OFFICIAL_EPOCHS))
        self._logged = torch.tensor(self.a_cls, device=state.device)  # (one copy to the device an epoch)

    def held_out_batch(self, state: StepState) -> None:
        """The learned schedule's update before epoch e (the official order: before the epoch's
        steps, from the weights after the last epoch)."""
        if not self.learned:
            return
        h = state.held_out
        epoch = h["epoch"]
        # (the official loop's model is in training mode at its first epoch, a fresh model, and in
        # evaluation mode after, as its validation left it)
        _, o = h["forward"](h["inputs"], train=epoch == 0)
        delta = hypergradient(o, h["labels"], h["parameters"], self.a_cls, self.a_al)
        if state.dist.enabled:  # (every rank computes it on the same batch: one value for all)
            delta = state.dist.all_reduce_sum(delta) / state.dist.world_size
        lr = self.params.alpha_lr / 2 ** (epoch // self.params.alpha_lr_halving)
        self.a_al = (self.a_al - lr * delta.double()).clamp(self.params.a_al_min, self.params.a_al_max)
        self.a_cls = 1.0 - self.a_al
        self._logged = self.a_cls

    def after_forward(self, state: StepState) -> None:
        o = state.trainable_unimodal()  # [M, B, C], each modality's own classifier
        ce = F.cross_entropy(o.float().mean(dim=0), state.labels, reduction="none")
        per_sample = 2.0 * (self.a_cls * ce + self.a_al * alignment(o))
        state.task_loss = state.batch_mean(per_sample)
        state.metrics["lfm/a_cls"] = self._logged

    def summary(self):
        return {"a_cls": float(self.a_cls)} if self.learned else {}  # (after the run: one read)

    def state_dict(self):
        return {"a_al": self.a_al.clone()} if self.learned else {}

    def load_state_dict(self, state):
        if self.learned:
            self.a_al = state["a_al"].to(self.a_al.device, torch.float64)
            self.a_cls = 1.0 - self.a_al
            self._logged = self.a_cls

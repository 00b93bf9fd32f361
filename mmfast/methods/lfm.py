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
modalities there is one pair. The official code's second schedule, a weight learned from a
hyper-gradient on a held-out batch once per epoch, is not offered (docs/methods/lfm.md).
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F

from .base import Method, StepState, check_choice, check_number

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


class LFM(Method):
    name = "lfm"
    fusions = ("sum",)
    computes_task_loss = True

    @dataclasses.dataclass
    class Params:
        schedule: str = "fitted"  # the official default script's (Crema_epoch.py); "learned" is not offered
        # The run length the curve spans: epoch e reads the curve at e * 200 / curve_epochs. 200 (the
        # official run's length) reads it as published; a shorter run may stretch it (no source).
        curve_epochs: int = 200

        def check(self):
            check_choice("lfm", "schedule", self.schedule, ("fitted",))
            check_number("lfm", "curve_epochs", self.curve_epochs, low=1, integer=True)

    def fit_start(self, state: StepState) -> None:
        self.epoch_start(state)

    def epoch_start(self, state: StepState) -> None:
        # (beyond the curve's 200 epochs it has no source and leaves [0, 1] from epoch 227 on: it is
        # held at its end value, a_cls(200) = 0.90)
        self.a_cls, self.a_al = fitted_weights(min(state.epoch * OFFICIAL_EPOCHS / self.params.curve_epochs,
                                                   OFFICIAL_EPOCHS))
        self._logged = torch.tensor(self.a_cls, device=state.device)  # (one copy to the device an epoch)

    def after_forward(self, state: StepState) -> None:
        o = state.trainable_unimodal()  # [M, B, C], each modality's own classifier
        ce = F.cross_entropy(o.float().mean(dim=0), state.labels, reduction="none")
        per_sample = 2.0 * (self.a_cls * ce + self.a_al * alignment(o))
        state.task_loss = state.batch_mean(per_sample)
        state.metrics["lfm/a_cls"] = self._logged

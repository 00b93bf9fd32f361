"""``mbsd``: modality-balanced self-distillation (docs/methods/mbsd.md). The public toolkit's
method; its source paper could not be identified, so the toolkit's computation is the
definition (variant "toolkit", the default), and variant "intended" is mmfast's reading of
what it means to do (an interpretation, labelled so).

With trainable weight-split uni-modal logits o_m = W_m phi_m + b/M (concat head), per sample
i and modality pair (a, b): p_a = softmax(o_a)[y], p_b likewise; ok = either modality's argmax
is right; w = ok |p_a - p_b|; p_s = max(p_a, p_b), p_w = min(p_a, p_b).

    toolkit   RS = ||o_a - o_b||^2 / C on logits for M = 2, on probabilities for M > 2;
              KL = p_w (log p_w - p_s)  (as coded: a probability where a log-probability is due)
              gradients flow through w, p_s and p_w
    intended  RS = ||o_a - o_b||^2 / C on logits; KL = KL(sg(softmax o_s) || softmax o_w) over
              the classes, the stronger modality's distribution a detached teacher; w detached

    loss = CE(fused) + sum_m CE(o_m) + mean_pairs [mean_i w RS + mean_i w KL]

inside the epoch window; outside it the plain fused cross-entropy. No hyper-parameter weights
the terms (the toolkit's are all 1).
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from ..models.registry import per_head_cross_entropy
from .base import Method, StepState, WindowParams, check_choice

VARIANTS = ("toolkit", "intended")


def mbsd_terms(unimodal: torch.Tensor, labels: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (w RS, w KL) [B], averaged over the modality pairs. unimodal [M, B, C] with autograd."""
    M, B, C = unimodal.shape
    log_probs = unimodal.log_softmax(dim=2)
    probs = log_probs.exp()
    log_true = log_probs.gather(2, labels.view(1, B, 1).expand(M, B, 1)).squeeze(2)  # [M, B]
    p_true = log_true.exp()
    right = unimodal.argmax(dim=2) == labels  # [M, B]
    rs_sum = kl_sum = 0
    pairs = list(itertools.combinations(range(M), 2))
    for a, b in pairs:  # (M(M-1)/2 pairs of whole-batch tensors: 1 for two modalities)
        w = (right[a] | right[b]).to(unimodal.dtype) * (p_true[a] - p_true[b]).abs()
        a_strong = p_true[a] >= p_true[b]
        if variant == "toolkit":
            src = unimodal if M == 2 else probs
            rs = (src[a] - src[b]).pow(2).sum(dim=1) / C
            p_s, p_w = torch.maximum(p_true[a], p_true[b]), torch.minimum(p_true[a], p_true[b])
            # (log p_w from the log-softmax: a p_w that underflows to 0 gives 0, not 0 * -inf)
            kl = p_w * (torch.minimum(log_true[a], log_true[b]) - p_s)
        else:
            w = w.detach()
            rs = (unimodal[a] - unimodal[b]).pow(2).sum(dim=1) / C
            teacher = torch.where(a_strong.view(B, 1), log_probs[a], log_probs[b]).detach()
            student = torch.where(a_strong.view(B, 1), log_probs[b], log_probs[a])
            kl = (teacher.exp() * (teacher - student)).sum(dim=1)
        rs_sum = rs_sum + w * rs
        kl_sum = kl_sum + w * kl
    return rs_sum / len(pairs), kl_sum / len(pairs)


class MBSD(Method):
    name = "mbsd"
    fusions = ("concat",)
    adds_loss_terms = True

    @dataclasses.dataclass
    class Params(WindowParams):
        variant: str = "toolkit"  # the toolkit's computation (the only source); "intended": see the module doc

        def check(self):
            check_choice("mbsd", "variant", self.variant, VARIANTS)
            self.check_window("mbsd")

    def after_forward(self, state: StepState) -> None:
        if not self.params.active(state.epoch):
            return
        unimodal = state.trainable_unimodal().float()
        ce = per_head_cross_entropy(unimodal, state.labels)
        rs, kl = mbsd_terms(unimodal, state.labels, self.params.variant)
        state.extra_losses["mbsd/unimodal_ce"] = state.batch_mean(ce.sum(dim=0))
        state.extra_losses["mbsd/rs"] = state.batch_mean(rs)
        state.extra_losses["mbsd/kl"] = state.batch_mean(kl)

"""``agm``: adaptive gradient modulation (Li et al., ICCV 2023; docs/methods/agm.md), as the
official code computes it.

The fused output F = f(all) splits into per-modality responses by Shapley values over the
modality coalitions, with the empty coalition's output taken as 0 so that the responses add
up to F (for two modalities r_a = (F - F_v + F_a) / 2, r_v = (F - F_a + F_v) / 2):

    r_m = sum_{S subset of the others} |S|! (M - |S| - 1)! / M! (f(S + m) - f(S)),  f({}) = 0

f(S) is the model on this batch with the inputs of every modality outside S zeroed, in eval
mode (batch-norm running statistics) but with autograd: 2^M - 2 extra forwards, run as one
batch (the loop's ``StepState.rerun``). Each response is scored by its cross-entropy
s_m = mean_i -log max(softmax(r_m)[i, y_i], 1e-8), and each modality's gradient is scaled by

    kappa_m = exp(alpha min(target_m - ratio_m, 10)),
    ratio_m = exp(M / (M - 1) (mean_j s_j - s_m)),  target_m the same of the running means
    s_bar (over every iteration so far, updated after kappa)

so a modality doing better than its history is slowed and one doing worse is boosted. The
scaling acts on the gradient that flows back through its response: the loss is
CE(sum_m I_m(r_m)) with I_m the identity whose gradient is kappa_m times the incoming one
(kappa_m r_m + (1 - kappa_m) sg(r_m): the same value, F). When an entry of the head weights'
gradient leaves [-1, 1], the gradients' total norm is clipped to 1 (official code). For
M = 2 this is the official CREMA-D form; the official MOSEI form is the M / (M - 1) one.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F

from ..valuation import shapley_matrix as shapley_weights
from .base import Method, StepState, WindowParams, check_number


def coalitions(M: int) -> list[tuple[int, ...]]:
    """The proper non-empty modality subsets, smallest first: the extra forwards AGM needs."""
    return [s for k in range(1, M) for s in itertools.combinations(range(M), k)]


def shapley_matrix(M: int) -> torch.Tensor:
    """W [M, K + 1] with r_m = sum_k W[m, k] f(S_k): S_k the coalitions(M), then the full set
    last: the Shapley weights of mmfast/valuation.py in this order, the empty coalition's column
    left out (f({}) = 0)."""
    subsets = coalitions(M) + [tuple(range(M))]
    return shapley_weights(M)[:, [sum(1 << m for m in s) for s in subsets]]


def agm_coefficients(scores: torch.Tensor, mean_scores: torch.Tensor, alpha: float, cap: float) -> torch.Tensor:
    """kappa [M] from this step's response scores s [M] and their running means s_bar [M]."""
    M = scores.shape[0]
    k = M / (M - 1)
    ratio = torch.exp(k * (scores.mean() - scores))
    target = torch.exp(k * (mean_scores.mean() - mean_scores))
    return torch.exp(alpha * torch.clamp(target - ratio, max=cap))


def scale_gradient(x: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """x in the forward; kappa times the incoming gradient in the backward."""
    return kappa * x + (1 - kappa) * x.detach()


class AGM(Method):
    name = "agm"
    fusions = ("concat", "sum", "mlp", "film", "gated", "cosine")  # (any head over the encoders' outputs)
    computes_task_loss = True
    extra_forwards = True

    @dataclasses.dataclass
    class Params(WindowParams):
        alpha: float = 1.0  # the official default (utils/config.py); its README's AV-MNIST example: 2.5
        cap: float = 10.0  # the official bound on target - ratio (the toolkit: 7)
        clip: float = 1.0  # the official clip: total grad norm 1 when a head weight's gradient leaves [-1, 1]

        def check(self):
            check_number("agm", "alpha", self.alpha, low=0)
            check_number("agm", "cap", self.cap, low=0)
            check_number("agm", "clip", self.clip, low=0)
            if self.clip <= 0:
                raise ValueError(f"agm.clip must be > 0, got {self.clip!r}")
            self.check_window("agm")

    def fit_start(self, state: StepState) -> None:
        M = len(state.modalities)
        self.subsets = coalitions(M)
        self.weights = shapley_matrix(M).to(device=state.device, dtype=torch.float32)
        self.mean_scores = torch.zeros(M, device=state.device)  # s_bar
        self.iterations = torch.zeros((), device=state.device)  # t, 1-based after the update
        self._clip_now = False

    def after_forward(self, state: StepState) -> None:
        fused = state.head_logits["fused"].float()
        self._clip_now = False
        if not self.params.active(state.epoch):
            state.task_loss = state.batch_mean(F.cross_entropy(fused, state.labels, reduction="none"))
            return
        subsets = state.rerun([tuple(state.modalities[j] for j in s) for s in self.subsets]).float()  # [K, B, C]
        outputs = torch.cat([subsets, fused[None]])  # [K + 1, B, C]
        responses = torch.einsum("mk,kbc->mbc", self.weights, outputs)  # [M, B, C]; sum_m = fused
        with torch.no_grad():
            p_true = responses.softmax(dim=2).gather(2, state.labels.view(1, -1, 1).expand(len(responses), -1, 1))
            scores = state.batch_mean(-p_true.squeeze(2).clamp_min(1e-8).log())  # [M]
            if state.dist.enabled:
                scores = state.dist.all_reduce_sum(scores)  # (batch_mean gives this rank's share)
            kappa = agm_coefficients(scores, self.mean_scores, self.params.alpha, self.params.cap)
            self.iterations += 1
            self.mean_scores.mul_((self.iterations - 1) / self.iterations).add_(scores / self.iterations)
        out = scale_gradient(responses, kappa.view(-1, 1, 1)).sum(dim=0)
        state.task_loss = state.batch_mean(F.cross_entropy(out, state.labels, reduction="none"))
        for m, name in enumerate(state.modalities):
            state.metrics[f"agm/kappa/{name}"] = kappa[m]
            state.metrics[f"agm/score/{name}"] = scores[m]
        self._clip_now = True

    def after_backward(self, state: StepState) -> None:
        if not self._clip_now:
            return
        head_weights = [p.grad for p in state.head.parameters() if p.dim() > 1 and p.grad is not None]
        grads = [p.grad for module in (*state.encoders.values(), state.head) for p in module.parameters()
                 if p.grad is not None]
        if not head_weights or not grads:
            return
        # (one foreach reduction each; the decision stays on the device)
        outside = torch.nn.utils.get_total_norm(head_weights, norm_type=float("inf"), foreach=True) > 1.0
        total = torch.nn.utils.get_total_norm(grads, foreach=True)
        factor = torch.where(outside, (self.params.clip / (total + 1e-6)).clamp(max=1.0), torch.ones_like(total))
        torch._foreach_mul_(grads, factor)
        state.metrics["agm/clipped"] = (factor < 1).float()

    def state_dict(self):
        return {"mean_scores": self.mean_scores.clone(), "iterations": self.iterations.clone()}

    def load_state_dict(self, state):
        self.mean_scores.copy_(state["mean_scores"])
        self.iterations.copy_(state["iterations"])

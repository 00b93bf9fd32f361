"""``olm``: online logit modulation (IJCAI 2024; docs/methods/olm.md).

Heads h = the M modalities' classifiers and the fused one (model.fusion "late", or "irfb":
OLM-Conv and OLM-Trans), logits z_h [B, C]. Per step:

    task loss     sum_h CE(w_h z_h, y)                                (w detached here)
    norms         n_h = mean over the batch of ||z_h||_2              (detached)
    baseline      s_bar = mean_h w_h n_h                              (detached: a target)
    L_logit       sum_h | w_h n_h - H lambda_h s_bar |                (updates w only)

w (H coefficients, starting at 1) has its own optimizer, stepped after the model's: Adam (lr 1e-3,
betas 0.9/0.999: the public code's; written out here so that its step count stays on the device,
torch.optim.Adam reads it on the host) or, w_optimizer="sgd", the paper's plain gradient descent
w <- w - lr dL/dw (Alg. 1). The rebalancing factors lambda (sum 1) come from

    gc          lambda = softmax(G / C) (lambda_form="softmax", eq. 8; "normalized":
                softmax(r / sum(r)) with r = G / C, which keeps one head with C near 0 from taking
                every factor), G_h = |L_dev,h(0) - L_dev,h(n)|,
                C_h = | |L_dev,h(n) - L_train,h(n)| - |L_dev,h(0) - L_train,h(0)| |   (eq. 6-8)
                with per-head validation and training losses (evaluation passes, the same
                transforms for both) measured once before training and after every
                `interval` epochs;
    loss_ratio  lambda_h = r_h / sum_j r_j, r_h = L_h / L_h(0) with this step's training loss
                of head h and that of the first step (measured once).

Choice (``normalize_lambda``, default on): the paper's target lambda_h s_bar sums to s_bar
while the weighted norms sum to H s_bar, so every coefficient shrinks towards 0 at the fixed
point; multiplying by H makes the targets sum to what they rebalance (equal factors: every head
at the mean norm). Set it off for the paper's literal targets. Coefficients are kept >= w_min
so that no head's logits flip sign. The fused prediction is the fused head's (w_fused > 0 does
not change its argmax). The public code's bugs are not repeated: the initial losses are
measured once, the training epoch is the whole training loader, and the test split is evaluated
(the trainer's evaluation does both).
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F

from .base import Method, StepState, check_choice, check_number

VARIANTS = ("gc", "loss_ratio")
LAMBDA_FORMS = ("softmax", "normalized")
COLLAPSED_ENTROPY = 0.1  # lambda's normalised entropy below which a warning names the collapse (no published value)
W_OPTIMIZERS = ("adam", "sgd")


def olm_task_loss(z: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                  batch_mean=None) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_h CE(w_h z_h, y) (mean over the kept samples) and the per-head means [H] (detached).
    z [H, B, C] with autograd; w [H]; batch_mean: [H, B] -> [H], the mean over the samples
    that stay in the loss (StepState.batch_mean; None: all of them)."""
    H, B, C = z.shape
    scaled = w.detach().to(z.dtype).view(H, 1, 1) * z
    per_head = F.cross_entropy(scaled.reshape(H * B, C).float(), labels.repeat(H), reduction="none").view(H, B)
    means = per_head.mean(dim=1) if batch_mean is None else batch_mean(per_head)
    return means.sum(), means.detach()


def olm_logit_loss(w: torch.Tensor, norms: torch.Tensor, lam: torch.Tensor, normalize: bool) -> torch.Tensor:
    """L_logit = sum_h |w_h n_h - s lambda_h s_bar| with s_bar = mean_h w_h n_h detached, s = H
    when normalizing (else 1). Differentiable in w only."""
    s_bar = (w.detach() * norms).mean()
    scale = w.shape[0] if normalize else 1
    return (w * norms - scale * lam * s_bar).abs().sum()


def gc_factors(val0: torch.Tensor, train0: torch.Tensor, val: torch.Tensor, train: torch.Tensor,
               eps: float = 1e-6, form: str = "softmax") -> torch.Tensor:
    """lambda from G (generalisation, eq. 6) and C (convergence, eq. 7) per head; C is floored at
    eps (a head whose gap did not move). form "softmax": softmax(G / C) (eq. 8, literal: one head
    with C near 0 takes all of it); "normalized": softmax(r / sum(r)), r = G / C normalised across
    the heads: the same order of heads, but at most a factor e between two of them."""
    G = (val0 - val).abs()
    C = ((val - train).abs() - (val0 - train0).abs()).abs().clamp_min(eps)
    r = G / C
    if form == "normalized":
        r = r / r.sum().clamp_min(1e-12)
    return torch.softmax(r, dim=0)


def normalized_entropy(lam: torch.Tensor) -> torch.Tensor:
    """H(lambda) / log(H): 1 for equal factors, 0 for one head taking them all (collapse)."""
    return -(lam * lam.clamp_min(1e-30).log()).sum() / math.log(lam.shape[0])


def loss_ratio_factors(losses: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    r = losses / initial.clamp_min(1e-12)
    return r / r.sum()


def adam_step_(w: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, betas=(0.9, 0.999),
               eps: float = 1e-8) -> None:
    """One Adam step of w in place (state: m, v and the step count t, all device tensors)."""
    state["t"] += 1
    state["m"].mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    state["v"].mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    m_hat = state["m"] / (1 - betas[0] ** state["t"])
    v_hat = state["v"] / (1 - betas[1] ** state["t"])
    w.sub_(lr * m_hat / (v_hat.sqrt() + eps))


class OLM(Method):
    name = "olm"
    computes_task_loss = True
    fusions = ("late", "irfb")

    @dataclasses.dataclass
    class Params:
        variant: str = "gc"  # "gc" (the paper's eq. 6-8, validation losses) | "loss_ratio" (the public code's)
        lambda_form: str = "softmax"  # gc: "softmax" (eq. 8, literal) | "normalized" (tempered; docs)
        w_optimizer: str = "adam"  # "adam" (the public code's) | "sgd" (the paper's Alg. 1: plain gradient descent)
        lr: float = 1e-3  # of the logit coefficients: the public code's Adam rate (the paper gives no eta)
        interval: int = 1  # gc: epochs between updates of the rebalancing factors (no published value)
        normalize_lambda: bool = True  # targets H lambda_h s_bar (see the module doc); False: lambda_h s_bar
        w_min: float = 0.01  # lower bound of the coefficients (no published value)

        def check(self):
            check_choice("olm", "variant", self.variant, VARIANTS)
            check_choice("olm", "lambda_form", self.lambda_form, LAMBDA_FORMS)
            check_choice("olm", "w_optimizer", self.w_optimizer, W_OPTIMIZERS)
            check_number("olm", "lr", self.lr, low=0)
            check_number("olm", "interval", self.interval, low=1, integer=True)
            check_number("olm", "w_min", self.w_min, low=0)
            if not isinstance(self.normalize_lambda, bool):
                raise ValueError(f"olm.normalize_lambda must be true or false, got {self.normalize_lambda!r}")

    def fit_start(self, state: StepState) -> None:
        head = state.head
        if head is None or not getattr(head, "trains_unimodal", False) or not hasattr(head, "fused"):
            raise ValueError("olm trains one classifier per modality and a fused one: use model.fusion=late or irfb "
                             "(a user loop: pass the LateHeads module as Balancer(head=...))")
        H = len(state.modalities) + 1
        self.heads = list(state.modalities) + ["fused"]
        self.w = torch.ones(H, device=state.device)
        self.adam = {"m": torch.zeros(H, device=state.device), "v": torch.zeros(H, device=state.device),
                     "t": torch.zeros((), device=state.device)}
        self.lam = torch.full((H,), 1.0 / H, device=state.device)
        self.initial: dict[str, torch.Tensor] = {}  # gc: "val", "train"; loss_ratio: "train" (first step)
        self._norms = torch.zeros(H, device=state.device)
        self._batches = 0  # micro-batches since the last coefficient step (host count)
        self._warned_collapse: int | None = None
        self._measured: dict = {}  # split -> (epoch, per-head losses), until both splits of an epoch are in

    def evaluations(self, epoch: int | None) -> tuple[str, ...]:
        """gc: every head's loss on val and train, before training and every `interval` epochs."""
        if self.params.variant != "gc" or not (epoch is None or (epoch + 1) % self.params.interval == 0):
            return ()
        return ("val", "train")

    def evaluation_end(self, state: StepState) -> None:
        """Each head's mean cross-entropy [M + 1] (the modalities' classifiers, then the fused
        one) on the split; with both splits of an epoch, the rebalancing factors."""
        e = state.evaluation
        if self.params.variant != "gc" or e["split"] not in ("val", "train"):
            return
        logits = torch.cat([e["unimodal"], e["fused"][None]])  # [M + 1, N, C]
        H, N, C = logits.shape
        losses = F.cross_entropy(logits.reshape(H * N, C), e["labels"].repeat(H), reduction="none").view(H, N)
        self._measured[e["split"]] = (e["epoch"], losses.mean(dim=1))
        if {split for split, (epoch, _) in self._measured.items() if epoch == e["epoch"]} == {"val", "train"}:
            self._rebalance(self._measured["val"][1], self._measured["train"][1], initial=e["epoch"] is None)
            self._measured = {}

    def head_losses(self, state: StepState) -> None:
        if self.params.variant == "gc":
            losses = state.head_losses
            self._rebalance(losses["val"], losses["train"], initial=losses["initial"])

    def _rebalance(self, val: torch.Tensor, train: torch.Tensor, *, initial: bool) -> None:
        if initial:
            self.initial = {"val": val.clone(), "train": train.clone()}
        elif self.initial:
            self.lam = gc_factors(self.initial["val"], self.initial["train"], val, train,
                                  form=self.params.lambda_form)

    def after_forward(self, state: StepState) -> None:
        if self.params.variant == "gc" and not self.initial:
            raise RuntimeError("olm (variant gc) needs the per-head validation and training losses before training: "
                               "hand over the evaluations Balancer.evaluations(None) names with "
                               "Balancer.observe_evaluation (or call Balancer.observe_head_losses) first; the "
                               "trainer does")
        z = torch.cat([state.head_logits["unimodal"], state.head_logits["fused"][None]])  # [H, B, C]
        state.task_loss, per_head = olm_task_loss(z, self.w, state.labels, state.batch_mean)
        if self.params.variant == "loss_ratio":
            per_head = state.dist.all_reduce_sum(per_head)  # (the ranks' shares: the global means)
            if "train" not in self.initial:
                self.initial["train"] = per_head.clone()  # the first step's losses, once
            self.lam = loss_ratio_factors(per_head, self.initial["train"])
        # Mean logit norm of each head over the (global) batch; summed over the ranks in after_step.
        self._norms += z.detach().float().norm(dim=-1).sum(dim=1) / state.global_batch
        self._batches += 1
        for h, name in enumerate(self.heads):
            state.metrics[f"olm/w/{name}"] = self.w[h]
            state.metrics[f"olm/lambda/{name}"] = self.lam[h]
        state.metrics["olm/lambda_entropy"] = normalized_entropy(self.lam)

    def after_step(self, state: StepState) -> None:
        if not self._batches:
            return
        norms = state.dist.all_reduce_sum(self._norms)
        w = self.w.clone().requires_grad_(True)
        grad, = torch.autograd.grad(olm_logit_loss(w, norms / self._batches, self.lam,
                                                   self.params.normalize_lambda), w)
        if self.params.w_optimizer == "adam":
            adam_step_(self.w, grad, self.adam, self.params.lr)
        else:
            self.w.sub_(self.params.lr * grad)
        self.w.clamp_(min=self.params.w_min)
        self._norms.zero_()
        self._batches = 0

    def epoch_end(self, state: StepState) -> None:
        # (an epoch end: host reads) lambda's collapse (one head's C near 0 takes all of
        # softmax(G / C)), and a head held at the floor, which no longer follows its target.
        lam = self.lam.tolist()
        entropy = float(normalized_entropy(self.lam))
        if entropy < COLLAPSED_ENTROPY and self._warned_collapse != state.epoch:
            self._warned_collapse = state.epoch
            warnings.warn(f"olm: the rebalancing factors collapsed onto the {self.heads[max(range(len(lam)), key=lam.__getitem__)]!r} "
                          f"head at epoch {state.epoch} (lambda {[round(v, 3) for v in lam]}, entropy {entropy:.3f}): "
                          f"the other heads' targets go to 0; lambda_form='normalized' keeps every head in play",
                          RuntimeWarning, stacklevel=2)
        floored = [name for name, w in zip(self.heads, self.w.tolist()) if w <= self.params.w_min]
        if floored:
            warnings.warn(f"olm: the logit coefficient(s) of {floored} reached the floor w_min={self.params.w_min} "
                          f"at epoch {state.epoch} (lambda {[round(v, 3) for v in lam]}): the "
                          f"rebalancing factors may have collapsed; try lambda_form='normalized'",
                          RuntimeWarning, stacklevel=2)

    def state_dict(self):
        return {"w": self.w.clone(), "adam": {k: v.clone() for k, v in self.adam.items()}, "lam": self.lam.clone(),
                "initial": {k: v.clone() for k, v in self.initial.items()}}

    def load_state_dict(self, state):
        self.w.copy_(state["w"])
        for k, v in state["adam"].items():
            self.adam[k].copy_(v)
        self.lam = state["lam"].to(self.w.device)
        self.initial = {k: v.to(self.w.device) for k, v in state["initial"].items()}

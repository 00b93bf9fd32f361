"""``olm``: online logit modulation (IJCAI 2024; reference semantics section 6).

Heads h = the M modalities' classifiers and the fused one (model.fusion "late", or "irfb":
OLM-Conv and OLM-Trans), logits z_h [B, C]. Per step:

    task loss     sum_h CE(w_h z_h, y)                                (w detached here)
    norms         n_h = mean over the batch of ||z_h||_2              (detached)
    baseline      s_bar = mean_h w_h n_h                              (detached: a target)
    L_logit       sum_h | w_h n_h - H lambda_h s_bar |                (updates w only)

w (H coefficients, starting at 1) has its own Adam optimizer (lr 1e-3, betas 0.9/0.999),
stepped after the model's; written out here so that its step count stays on the device
(torch.optim.Adam reads it on the host). The rebalancing factors lambda (sum 1) come from

    gc          lambda = softmax(G / C), G_h = |L_dev,h(0) - L_dev,h(n)|,
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

import torch
import torch.nn.functional as F

from .base import Method, StepState, check_choice, check_number

VARIANTS = ("gc", "loss_ratio")


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
               eps: float = 1e-6) -> torch.Tensor:
    """lambda = softmax(G / C) (eq. 6-8); C is floored at eps (a head whose gap did not move)."""
    G = (val0 - val).abs()
    C = ((val - train).abs() - (val0 - train0).abs()).abs().clamp_min(eps)
    return torch.softmax(G / C, dim=0)


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
        variant: str = "gc"  # "gc" (eq. 6-8, validation losses) | "loss_ratio"
        lr: float = 1e-3  # Adam learning rate of the logit coefficients
        interval: int = 1  # gc: epochs between updates of the rebalancing factors
        normalize_lambda: bool = True  # targets H lambda_h s_bar (see the module doc); False: lambda_h s_bar
        w_min: float = 0.01  # lower bound of the coefficients

        def check(self):
            check_choice("olm", "variant", self.variant, VARIANTS)
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

    def wants_head_losses(self, epoch: int | None) -> bool:
        if self.params.variant != "gc":
            return False
        return epoch is None or (epoch + 1) % self.params.interval == 0

    def head_losses(self, state: StepState) -> None:
        if self.params.variant != "gc":
            return
        losses = state.head_losses
        if losses["initial"]:
            self.initial = {"val": losses["val"].clone(), "train": losses["train"].clone()}
        elif self.initial:
            self.lam = gc_factors(self.initial["val"], self.initial["train"], losses["val"], losses["train"])

    def after_forward(self, state: StepState) -> None:
        if self.params.variant == "gc" and not self.initial:
            raise RuntimeError("olm (variant gc) needs the per-head validation and training losses before training: "
                               "call Balancer.observe_head_losses(val, train, epoch=None) first (the trainer does)")
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

    def after_step(self, state: StepState) -> None:
        if not self._batches:
            return
        norms = state.dist.all_reduce_sum(self._norms)
        w = self.w.clone().requires_grad_(True)
        grad, = torch.autograd.grad(olm_logit_loss(w, norms / self._batches, self.lam,
                                                   self.params.normalize_lambda), w)
        adam_step_(self.w, grad, self.adam, self.params.lr)
        self.w.clamp_(min=self.params.w_min)
        self._norms.zero_()
        self._batches = 0

    def state_dict(self):
        return {"w": self.w.clone(), "adam": {k: v.clone() for k, v in self.adam.items()}, "lam": self.lam.clone(),
                "initial": {k: v.clone() for k, v in self.initial.items()}}

    def load_state_dict(self, state):
        self.w.copy_(state["w"])
        for k, v in state["adam"].items():
            self.adam[k].copy_(v)
        self.lam = state["lam"].to(self.w.device)
        self.initial = {k: v.to(self.w.device) for k, v in state["initial"].items()}

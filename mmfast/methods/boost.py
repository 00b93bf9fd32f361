"""``boost``: sustained boosting with adaptive classifier assignment (2025; reference semantics
section 7), on the model.fusion "boost" head (mmfast.models.BoostedClassifiers: per modality r
classifiers t = 1..n_r with logits z_t^r, one shared head, modality weights omega).

Loss of modality r, with z_hat_t = omega_r z_t^r (p_hat = omega p) and n = n_r:

    residual label   y_hat = y - lam sum_{j<n} y (.) softmax(z_hat_j)     (detached: a target)
    eps              CE(z_hat_n, y_hat) = (1 - lam sum_{j<n} p_j[y]) (-log softmax(z_hat_n)[y])
    eps_o            CE(sum_{j<=n} z_hat_j, y)
    eps_p            CE(sum_{j<n} z_hat_j, y)   (none while n = 1)

``update=joint`` (the paper) minimises the sum over modalities in one step;
``update=alternating`` (the public code) makes one optimizer step per modality, each on that
modality's loss (the shared head moves between them).

ACA after every `interval` epochs, from the OGM scores since the last ACA, s^r = mean_i softmax(sum_t
z_t^r)[y_i] (mmfast.ops.modality_scores): with w the weakest modality, a classifier is added to
it when max_{r != w} s^r - sigma s^w > tau (for two modalities: the paper's rule with the dead
zone tau), up to `max_classifiers`; the new classifier joins the optimizer (the public code never
trains its new classifiers). omega = sigmoid(MLP(s)) with a 3-layer ReLU MLP fitted, `aca_steps`
SGD steps per ACA (lr aca_lr, momentum 0.9), to the indicator g of the weakest modality
(L_ACA = ||g - omega||^2); the sigmoid keeps the weights in (0, 1), the range the paper reports.
Inference: fused = sum_r omega_r sum_t z_t^r.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import modality_scores
from .base import Method, StepState, check_choice, check_number, join_optimizer

UPDATES = ("joint", "alternating")


def boost_modality_loss(z: torch.Tensor, omega: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """eps + eps_o + eps_p per sample [B] for one modality's classifier logits z [n, B, C]."""
    z = omega.to(z.dtype) * z
    n = z.shape[0]
    newest = F.cross_entropy(z[-1].float(), labels, reduction="none")
    if n == 1:  # (one classifier: eps_o is eps, and eps_p is absent)
        return 2.0 * newest
    loss = F.cross_entropy(z.sum(dim=0).float(), labels, reduction="none")  # eps_o
    previous = z[:-1].float()
    p_true = torch.softmax(previous.detach(), dim=-1).gather(-1, labels.view(1, -1, 1).expand(n - 1, -1, 1))
    residual = 1.0 - lam * p_true.squeeze(-1).sum(dim=0)  # y_hat at the true class (0 elsewhere)
    return loss + residual * newest + F.cross_entropy(previous.sum(dim=0), labels, reduction="none")


def aca_target(scores: torch.Tensor) -> torch.Tensor:
    """g: the indicator of the weakest modality."""
    return F.one_hot(scores.argmin(), scores.shape[0]).to(scores.dtype)


def aca_assignment(scores: list[float], sigma: float, tau: float) -> int | None:
    """The modality that gets a new classifier (the weakest, if the strongest other leads it by
    more than the dead zone), or None."""
    weak = min(range(len(scores)), key=scores.__getitem__)
    lead = max(s for r, s in enumerate(scores) if r != weak)
    return weak if lead - sigma * scores[weak] > tau else None


class Boost(Method):
    name = "boost"
    computes_task_loss = True
    fusions = ("boost",)

    @dataclasses.dataclass
    class Params:
        lam: float = 0.2  # residual-label smoothing lambda
        interval: int = 1  # T: epochs between ACA calls
        sigma: float = 1.0
        tau: float = 0.01
        max_classifiers: int = 4  # per modality
        update: str = "joint"  # "joint" | "alternating"
        aca_steps: int = 100
        aca_lr: float = 1e-3
        aca_hidden: int = 32

        def check(self):
            check_number("boost", "lam", self.lam, low=0, high=1)
            check_number("boost", "interval", self.interval, low=1, integer=True)
            check_number("boost", "sigma", self.sigma, low=0)
            check_number("boost", "tau", self.tau, low=0)
            check_number("boost", "max_classifiers", self.max_classifiers, low=1, integer=True)
            check_choice("boost", "update", self.update, UPDATES)
            check_number("boost", "aca_steps", self.aca_steps, low=0, integer=True)
            check_number("boost", "aca_lr", self.aca_lr, low=0)
            check_number("boost", "aca_hidden", self.aca_hidden, low=1, integer=True)

    def fit_start(self, state: StepState) -> None:
        head = state.head
        if head is None or not hasattr(head, "add_classifier"):
            raise ValueError("boost trains its own classifiers: use model.fusion=boost (a user loop: pass the "
                             "BoostedClassifiers module as Balancer(head=...))")
        self.head = head
        M = len(state.modalities)
        with torch.random.fork_rng(devices=[]):  # the MLP's init leaves the run's random stream alone
            torch.manual_seed(state.seed)
            hidden = self.params.aca_hidden
            self.omega_net = nn.Sequential(nn.Linear(M, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                           nn.Linear(hidden, M)).to(state.device)
        self.omega_optimizer = torch.optim.SGD(self.omega_net.parameters(), lr=self.params.aca_lr, momentum=0.9)
        self._score_sum = torch.zeros(M, device=state.device)
        self._score_count = torch.zeros(M, device=state.device)
        self._rows: dict = {}  # part -> [M, 1] mask of the modalities it trains
        self.assignments: list[tuple[int, str | None]] = []  # (epoch, modality given a classifier or None)

    def update_parts(self, state: StepState):
        return [(m,) for m in state.modalities] if self.params.update == "alternating" else [None]

    def after_forward(self, state: StepState) -> None:
        classifiers = state.head_logits["classifiers"]
        trained = [m for m, name in enumerate(state.modalities) if state.part is None or name in state.part]
        omega = self.head.omega
        state.task_loss = sum(state.batch_mean(boost_modality_loss(classifiers[r], omega[r], state.labels,
                                                                   self.params.lam))
                              for r in trained)
        # Scores of the (global) batch: the shared balance statistics when every modality trains
        # (summed over the ranks already), else this part's rows, summed over the ranks here.
        if state.part is None:
            S = state.measure_batch()
            rows = None
        else:
            if state.part not in self._rows:  # (built once per part: no copy to the device per step)
                self._rows[state.part] = torch.tensor([[float(r in trained)] for r in range(len(state.modalities))],
                                                      device=state.device)
            rows = self._rows[state.part]
            S = state.dist.all_reduce_sum(modality_scores(state.unimodal_logits, state.labels,
                                                          rows.expand(-1, state.labels.shape[0]))[0])
        self._score_sum += S
        self._score_count += state.global_batch if rows is None else rows.squeeze(1) * state.global_batch
        for r in trained:
            name = state.modalities[r]
            state.metrics[f"boost/omega/{name}"] = omega[r]
            state.metrics[f"boost/score/{name}"] = S[r] / state.global_batch

    def epoch_end(self, state: StepState) -> None:
        if (state.epoch + 1) % self.params.interval:
            return
        # ACA: a structural decision, made on the host once per interval (an epoch boundary),
        # from global scores: every rank makes the same decision and fits the same omega.
        scores = (self._score_sum / self._score_count.clamp_min(1)).cpu()
        weak = aca_assignment(scores.tolist(), self.params.sigma, self.params.tau)
        if weak is not None and self.head.counts()[weak] < self.params.max_classifiers:
            join_optimizer(state, self.head.add_classifier(weak))
            self.assignments.append((state.epoch, state.modalities[weak]))
        else:
            self.assignments.append((state.epoch, None))
        s = scores.to(state.device)
        target = aca_target(s)
        for _ in range(self.params.aca_steps):
            self.omega_optimizer.zero_grad(set_to_none=True)
            (target - torch.sigmoid(self.omega_net(s))).square().sum().backward()
            self.omega_optimizer.step()
        with torch.no_grad():
            self.head.omega.copy_(torch.sigmoid(self.omega_net(s)))
        self._score_sum.zero_()  # (reset here, not at epoch starts: a resumed epoch keeps its sums)
        self._score_count.zero_()

    def state_dict(self):
        return {"omega_net": self.omega_net.state_dict(), "omega_optimizer": self.omega_optimizer.state_dict(),
                "score_sum": self._score_sum.clone(), "score_count": self._score_count.clone(),
                "assignments": list(self.assignments)}

    def load_state_dict(self, state):
        self.omega_net.load_state_dict(state["omega_net"])
        self.omega_optimizer.load_state_dict(state["omega_optimizer"])
        self._score_sum.copy_(state["score_sum"])
        self._score_count.copy_(state["score_count"])
        self.assignments = [tuple(a) for a in state["assignments"]]

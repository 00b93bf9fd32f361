"""``boost``: sustained boosting with adaptive classifier assignment (2025; docs/methods/boost.md), on the model.fusion "boost" head (mmfast.models.BoostedClassifiers: per modality r
classifiers t = 1..n_r with logits z_t^r, one shared head, modality weights omega).

Loss of modality r, with z_hat_t = omega_r z_t^r (p_hat = omega p) and n = n_r:

    residual label   y_hat = max(y - lam sum_{j<n} y (.) softmax(z_hat_j), 0)   (detached: a target;
                     the paper asks for non-negative residual labels)
    eps              CE(z_hat_n, y_hat) = (1 - lam sum_{j<n} p_j[y]) (-log softmax(z_hat_n)[y])
    eps_o            CE(sum_{j<=n} z_hat_j, y)
    eps_p            CE(sum_{j<n} z_hat_j, y)   (none while n = 1)

``update=joint`` (the paper) minimises the sum over modalities in one step;
``update=alternating`` (the public code) makes one optimizer step per modality, each on that
modality's loss (the shared head moves between them).

ACA after every `interval` epochs (T: the paper's 20 for CREMA-D, 10 for Kinetics-Sounds), from
the per-modality scores accumulated since the last ACA:
    aca_score="logits" (default): s^r = mean_i softmax(sum_t z_t^r)_i[y_i], the probability of the
        modality's boosted prediction (in [0, 1]);
    aca_score="probabilities" (the paper's text): s^r = mean_i y_i . sum_t softmax(z_t^r)_i. Read
        literally this sum grows with the number of classifiers (up to n_r), so a modality that
        received classifiers soon outscores the other and the assignment alternates, which the
        paper's Table 5 contradicts (1 audio, 10 video classifiers after adaptive assignment):
        the default keeps the score of the summed prediction.
Assignment (aca_rule): "paper" as written for two modalities a (the first) and v (the second):
s^a - sigma s^v > tau gives v a classifier, < tau gives a one (so every ACA adds one, consistent
with Table 5's adaptive run ending with 1 + 10 classifiers); "dead_zone": the same with "< -tau"
(no addition inside the zone); "weakest" (any M): the weakest modality gets one when the strongest
other leads it by more than tau, max_r!=w s^r - sigma s^w > tau. Up to `max_classifiers` (none
by default: the paper sets no bound); the new classifier joins the optimizer (the public code
never trains its new classifiers). omega = sigmoid(MLP(s)) with a 3-layer ReLU MLP fitted to the
indicator g of the weakest modality (L_ACA = ||g - omega||^2) "until converge" (Alg. 1): up to
aca_max_steps steps of the backbone's optimizer kind (SGD with its momentum and weight decay, the
paper's "same as the backbone", 5.2.2), learning rate aca_lr (the paper's 0.001), stopping once L_ACA
falls by less than aca_tol over 50 steps; the sigmoid keeps omega in (0, 1), the range the paper
reports.
Inference (the paper leaves the late fusion open): fused = sum_r w_r sum_t z_t^r with w the
head's fusion_weights: `inference` "val_fitted" (default: after every epoch, the weights on a
simplex grid most accurate on the validation split, fit_fusion_weights; chosen by the study in
README, where it was the best of the four in both dominance directions), "omega" (the learned
omega, which ACA fits towards the weakest modality's indicator), "equal" (w = 1) or "fixed"
(fixed_weights, default CODE_FUSION_WEIGHTS, the public code's 0.4 / 0.6).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import modality_scores
from .base import Method, StepState, check_choice, check_number, join_optimizer

UPDATES = ("joint", "alternating")
ACA_RULES = ("paper", "dead_zone", "weakest")
ACA_SCORES = ("probabilities", "logits")
INFERENCE = ("val_fitted", "omega", "equal", "fixed")
CODE_FUSION_WEIGHTS = (0.4, 0.6)  # the public code's fixed late fusion (audio, visual)


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
    # y_hat at the true class (0 elsewhere), kept >= 0 as the paper requires of residual labels
    # (with many confident classifiers lam * sum p would pass 1).
    residual = (1.0 - lam * p_true.squeeze(-1).sum(dim=0)).clamp_min(0.0)
    return loss + residual * newest + F.cross_entropy(previous.sum(dim=0), labels, reduction="none")


def simplex_grid(M: int) -> torch.Tensor:
    """[K, M] weight vectors on the simplex (sum 1), steps of 1/20 (M <= 3) or 1/10 (more)."""
    steps = 20 if M <= 3 else 10

    def parts(total, k):
        if k == 1:
            return [[total]]
        return [[i] + rest for i in range(total + 1) for rest in parts(total - i, k - 1)]

    return torch.tensor(parts(steps, M), dtype=torch.float32) / steps


def fit_fusion_weights(unimodal: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The late-fusion weights w [M] (on the simplex grid) whose fused prediction
    sum_r w_r unimodal[r] is most accurate on these samples; ties go to the most even weights.
    unimodal: [M, N, C] (each modality's summed classifier logits), labels [N]."""
    grid = simplex_grid(unimodal.shape[0]).to(unimodal.device)  # [K, M]
    fused = torch.einsum("km,mnc->knc", grid, unimodal.float())
    accuracy = (fused.argmax(dim=-1) == labels.view(1, -1)).float().mean(dim=1)  # [K]
    unevenness = (grid - 1.0 / grid.shape[1]).abs().sum(dim=1)
    best = torch.nonzero(accuracy == accuracy.max()).flatten()
    return grid[best[unevenness[best].argmin()]]


def aca_target(scores: torch.Tensor) -> torch.Tensor:
    """g: the indicator of the weakest modality."""
    return F.one_hot(scores.argmin(), scores.shape[0]).to(scores.dtype)


def aca_assignment(scores: list[float], sigma: float, tau: float, rule: str = "weakest") -> int | None:
    """The modality that gets a new classifier, or None (the rules: module docstring)."""
    if rule == "weakest":
        weak = min(range(len(scores)), key=scores.__getitem__)
        lead = max(s for r, s in enumerate(scores) if r != weak)
        return weak if lead - sigma * scores[weak] > tau else None
    if len(scores) != 2:
        raise ValueError(f"boost.aca_rule={rule!r} is written for two modalities; with {len(scores)} use "
                         f"aca_rule='weakest'")
    lead = scores[0] - sigma * scores[1]
    if lead > tau:
        return 1
    return 0 if lead < (tau if rule == "paper" else -tau) else None


def aca_scores_from_probabilities(classifiers: list[torch.Tensor], labels: torch.Tensor, rows) -> torch.Tensor:
    """sum_i y_i . sum_t softmax(z_t^r)_i for each modality r in `rows` (0 for the others) [M]:
    the paper's ACA score before the mean over samples."""
    out = []
    for r, z in enumerate(classifiers):
        if r not in rows:
            out.append(z.new_zeros((), dtype=torch.float32))
            continue
        p = torch.softmax(z.detach().float(), dim=-1)  # [n, B, C]
        out.append(p.gather(-1, labels.view(1, -1, 1).expand(z.shape[0], -1, 1)).sum())
    return torch.stack(out)


class Boost(Method):
    name = "boost"
    computes_task_loss = True
    fusions = ("boost",)

    @dataclasses.dataclass
    class Params:
        lam: float = 0.2  # residual-label lambda: the paper's for every dataset (5.2.2); the public CREMA-D code 0.5
        interval: int = 1  # T, epochs between ACA calls: no general default (paper: 20 CREMA-D, 10 KS; set per recipe)
        sigma: float = 1.0  # the paper's default (4.2)
        tau: float = 0.01  # the paper's default (4.2)
        max_classifiers: int | None = None  # per modality; None: no bound (the paper sets none; Table 5 reaches 12)
        update: str = "joint"  # "joint" (the paper) | "alternating" (the public code)
        aca_rule: str = "paper"  # "paper" | "dead_zone" | "weakest" (module docstring)
        aca_score: str = "logits"  # "logits" (the summed prediction's; see above) | "probabilities" (the text)
        aca_lr: float = 1e-3  # the paper's
        aca_max_steps: int = 5000  # "until converge": no published bound
        aca_tol: float = 1e-6  # convergence: L_ACA falls by less than this over 50 steps (no published value)
        aca_hidden: int = 32  # no published value ("a three-layer network with ReLU")
        inference: str = "val_fitted"  # fused prediction weights: "val_fitted" | "omega" | "equal" | "fixed"
        fixed_weights: list | None = None  # inference="fixed": one weight per modality (None: CODE_FUSION_WEIGHTS)

        def check(self):
            check_number("boost", "lam", self.lam, low=0, high=1)
            check_number("boost", "interval", self.interval, low=1, integer=True)
            check_number("boost", "sigma", self.sigma, low=0)
            check_number("boost", "tau", self.tau, low=0)
            if self.max_classifiers is not None:
                check_number("boost", "max_classifiers", self.max_classifiers, low=1, integer=True)
            check_choice("boost", "update", self.update, UPDATES)
            check_choice("boost", "aca_rule", self.aca_rule, ACA_RULES)
            check_choice("boost", "aca_score", self.aca_score, ACA_SCORES)
            check_number("boost", "aca_lr", self.aca_lr, low=0)
            check_number("boost", "aca_max_steps", self.aca_max_steps, low=0, integer=True)
            check_number("boost", "aca_tol", self.aca_tol, low=0)
            check_number("boost", "aca_hidden", self.aca_hidden, low=1, integer=True)
            check_choice("boost", "inference", self.inference, INFERENCE)
            if self.fixed_weights is not None:
                if not isinstance(self.fixed_weights, (list, tuple)):
                    raise ValueError(f"boost.fixed_weights must be a list of weights, got {self.fixed_weights!r}")
                for i, w in enumerate(self.fixed_weights):
                    check_number("boost", f"fixed_weights[{i}]", w, low=0)

    def fit_start(self, state: StepState) -> None:
        head = state.head
        if head is None or not hasattr(head, "add_classifier"):
            raise ValueError("boost trains its own classifiers: use model.fusion=boost (a user loop: pass the "
                             "BoostedClassifiers module as Balancer(head=...))")
        self.head = head
        self.modalities = list(state.modalities)
        M = len(state.modalities)
        with torch.random.fork_rng(devices=[]):  # the MLP's init leaves the run's random stream alone
            torch.manual_seed(state.seed)
            hidden = self.params.aca_hidden
            self.omega_net = nn.Sequential(nn.Linear(M, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                           nn.Linear(hidden, M)).to(state.device)
        if self.params.aca_rule != "weakest" and M != 2:
            raise ValueError(f"boost.aca_rule={self.params.aca_rule!r} is written for two modalities; with {M} "
                             f"({', '.join(state.modalities)}) use aca_rule='weakest'")
        # "The optimization algorithm of ACA is the same as that of the backbone" (the paper, 5.2.2):
        # its kind, momentum and weight decay; the paper's SGD(0.9, 1e-4) when the loop gave none.
        backbone = state.optimizer
        group = backbone.param_groups[0] if backbone is not None else {"momentum": 0.9, "weight_decay": 1e-4}
        if backbone is None or isinstance(backbone, torch.optim.SGD):
            self.omega_optimizer = torch.optim.SGD(self.omega_net.parameters(), lr=self.params.aca_lr,
                                                   momentum=group.get("momentum", 0.0),
                                                   weight_decay=group.get("weight_decay", 0.0))
        else:
            self.omega_optimizer = type(backbone)(self.omega_net.parameters(), lr=self.params.aca_lr,
                                                  weight_decay=group.get("weight_decay", 0.0))
        fixed = list(self.params.fixed_weights if self.params.fixed_weights is not None else CODE_FUSION_WEIGHTS)
        if self.params.inference == "fixed" and len(fixed) != M:
            raise ValueError(f"boost.fixed_weights needs one weight per modality ({M}), got {fixed}")
        if self.params.inference in ("equal", "val_fitted"):  # (val_fitted: equal until the first fit)
            head.fusion_weights.fill_(1.0)
        elif self.params.inference == "fixed":
            head.fusion_weights.copy_(torch.tensor([float(w) for w in fixed]))
        self.aca_steps_taken: list[int] = []
        self._score_sum = torch.zeros(M, device=state.device)
        self._score_count = torch.zeros(M, device=state.device)
        self._rows: dict = {}  # part -> [M, 1] mask of the modalities it trains
        self.assignments: list[tuple[int, str | None]] = []  # (epoch, modality given a classifier or None)

    def evaluations(self, epoch: int | None) -> tuple[str, ...]:
        """inference="val_fitted": the validation split after every epoch (the late fusion is
        fitted on it before the epoch's validation metrics are measured)."""
        return ("val",) if self.params.inference == "val_fitted" and epoch is not None else ()

    def evaluation_end(self, state: StepState) -> None:
        e = state.evaluation
        if self.params.inference == "val_fitted" and e["split"] == "val":
            self.head.fusion_weights.copy_(fit_fusion_weights(e["unimodal"], e["labels"]))

    def update_parts(self, state: StepState):
        return [(m,) for m in state.modalities] if self.params.update == "alternating" else [None]

    def after_forward(self, state: StepState) -> None:
        classifiers = state.head_logits["classifiers"]
        trained = [m for m, name in enumerate(state.modalities) if state.part is None or name in state.part]
        omega = self.head.omega
        state.task_loss = sum(state.batch_mean(boost_modality_loss(classifiers[r], omega[r], state.labels,
                                                                   self.params.lam))
                              for r in trained)
        # Scores of the (global) batch: ACA's per-modality score sums (the paper's, from every
        # classifier's probabilities; or the shared balance statistics of the summed logits when
        # every modality trains, else this part's rows), summed over the ranks.
        rows = None
        if state.part is not None:
            if state.part not in self._rows:  # (built once per part: no copy to the device per step)
                self._rows[state.part] = torch.tensor([[float(r in trained)] for r in range(len(state.modalities))],
                                                      device=state.device)
            rows = self._rows[state.part]
        if self.params.aca_score == "probabilities":
            S = state.dist.all_reduce_sum(aca_scores_from_probabilities(classifiers, state.labels, trained))
        elif rows is None:
            S = state.measure_batch()
        else:
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
        weak = aca_assignment(scores.tolist(), self.params.sigma, self.params.tau, self.params.aca_rule)
        bound = self.params.max_classifiers
        if weak is not None and (bound is None or self.head.counts()[weak] < bound):
            join_optimizer(state, self.head.add_classifier(weak))
            self.assignments.append((state.epoch, state.modalities[weak]))
        else:
            self.assignments.append((state.epoch, None))
        s = scores.to(state.device)
        target = aca_target(s)
        previous, steps = math.inf, 0
        while steps < self.params.aca_max_steps:  # ("until converge"; an epoch end: host reads are fine)
            self.omega_optimizer.zero_grad(set_to_none=True)
            loss = (target - torch.sigmoid(self.omega_net(s))).square().sum()
            loss.backward()
            self.omega_optimizer.step()
            steps += 1
            if steps % 50 == 0:
                current = float(loss.detach())
                if previous - current < self.params.aca_tol:
                    break
                previous = current
        self.aca_steps_taken.append(steps)
        with torch.no_grad():
            self.head.omega.copy_(torch.sigmoid(self.omega_net(s)))
            if self.params.inference == "omega":
                self.head.fusion_weights.copy_(self.head.omega)
        self._score_sum.zero_()  # (reset here, not at epoch starts: a resumed epoch keeps its sums)
        self._score_count.zero_()

    def state_dict(self):
        return {"omega_net": self.omega_net.state_dict(), "omega_optimizer": self.omega_optimizer.state_dict(),
                "score_sum": self._score_sum.clone(), "score_count": self._score_count.clone(),
                "assignments": list(self.assignments), "aca_steps_taken": list(self.aca_steps_taken)}

    def state_loaded(self, state: StepState) -> None:
        """The checkpoint's model had classifiers added during training (the head resized to
        them when its weights loaded): they rejoin the optimizer, in the order they joined it,
        before the optimizer's saved state is loaded."""
        joined = len(state.optimizer.param_groups) - 1 if state.optimizer is not None else 0
        for params in self.head.added_parameter_groups()[joined:]:
            join_optimizer(state, params)

    def load_state_dict(self, state):
        self.omega_net.load_state_dict(state["omega_net"])
        self.omega_optimizer.load_state_dict(state["omega_optimizer"])
        self._score_sum.copy_(state["score_sum"])
        self._score_count.copy_(state["score_count"])
        self.assignments = [tuple(a) for a in state["assignments"]]
        self.aca_steps_taken = list(state.get("aca_steps_taken", []))

    def summary(self):
        return {"classifiers": dict(zip(self.modalities, self.head.counts())), "assignments": self.assignments,
                "aca_steps": self.aca_steps_taken, "omega": self.head.omega.tolist(),
                "fusion_weights": self.head.fusion_weights.tolist()}

"""``relearning``: diagnosing and re-learning (Wei, Li, Hu, ECCV 2024; docs/methods/relearning.md),
as the official code computes it.

After every `interval`-th epoch (epochs e > 0 with e % interval == 0, 0-based, at most `times`
times) each encoder is diagnosed by how well its features cluster by class on the training
split against the validation split, and softly re-initialised in proportion to the gap:

    purity_{m,s} = accuracy of k-means clusters (C clusters, features min-max scaled to [-1, 1]
                   per dimension) labelled by their majority class, on split s
    alpha_m      = tanh(lam * |purity_{m,train} - purity_{m,val}|)
    theta_m     <- alpha_m * theta_m^0 + (1 - alpha_m) * theta_m     for every parameter of encoder m

theta^0 is the encoder's parameters before the first step (batch-norm running statistics and the
optimizer's state are not touched). The features are taken after the epoch (eval mode, no
autograd) and the mix is applied when the next epoch starts, so that epoch e's validation
metrics and checkpoint are those of the model it trained, as in the official code. Between
re-initialisations the loss is plain fused cross-entropy. Nothing runs inside a step.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .base import GENERIC_FUSIONS, Method, StepState, check_number


def purity(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, seed: int = 0,
           n_init: int = 10) -> float:
    """The share of samples whose k-means cluster's majority class is their own: features [N, d]
    min-max scaled to [-1, 1] per dimension (a constant dimension becomes -1), k-means with
    `num_classes` clusters (k-means++, `n_init` starts, random_state `seed`; fewer samples than
    classes: one cluster per sample)."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import MinMaxScaler

    # (float32, as the official code hands its features over)
    x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features.detach().float().cpu().numpy())
    k = min(num_classes, len(x))  # (a split smaller than the class count: a cluster per sample)
    clusters = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(x)
    y = labels.cpu().numpy()
    table = np.zeros((k, int(y.max()) + 1), dtype=np.int64)  # [cluster, class] counts
    np.add.at(table, (clusters, y), 1)
    return float(table.max(axis=1).sum() / len(y))


class ReLearning(Method):
    name = "relearning"
    fusions = GENERIC_FUSIONS
    evaluation_features = True

    @dataclasses.dataclass
    class Params:
        lam: float = 3.0  # the official default (ours.py --move_lambda; the toolkit's move_lambda too)
        interval: int = 20  # epochs between diagnoses: the official default (--reinit_epoch; the toolkit 15)
        times: int = 3  # re-initialisations at most: the official default (--reinit_num; the toolkit 2)
        n_init: int = 10  # k-means starts: scikit-learn's default when the official code was written (1.4 made it 1)

        def check(self):
            check_number("relearning", "lam", self.lam, low=0)
            check_number("relearning", "interval", self.interval, low=1, integer=True)
            check_number("relearning", "times", self.times, low=0, integer=True)
            check_number("relearning", "n_init", self.n_init, low=1, integer=True)

    def diagnoses(self, epoch: int | None) -> bool:
        """Whether the encoders are diagnosed after `epoch` (0-based)."""
        p = self.params
        return epoch is not None and epoch > 0 and epoch % p.interval == 0 and epoch // p.interval <= p.times

    def evaluations(self, epoch):
        return ("train", "val") if self.diagnoses(epoch) else ()

    def fit_start(self, state: StepState) -> None:
        # theta^0: every encoder's parameters before the first step (restored from a checkpoint on a resume)
        self.initial = {name: [p.detach().clone() for p in enc.parameters()] for name, enc in state.encoders.items()}
        self.purities: dict[str, dict[str, float]] = {}  # the diagnosis in progress: split -> modality -> purity
        self.pending: dict[str, float] | None = None  # alphas to apply when the next epoch starts
        self.history: list[dict] = []  # every diagnosis: epoch, purities, alphas

    def evaluation_end(self, state: StepState) -> None:
        e = state.evaluation
        if not self.diagnoses(e["epoch"]) or e["split"] not in ("train", "val"):
            return
        C = e["fused"].shape[1]
        self.purities[e["split"]] = {name: purity(f, e["labels"], C, n_init=self.params.n_init)
                                     for name, f in zip(state.modalities, e["features"])}
        if len(self.purities) == 2:  # (both splits seen: the diagnosis is complete)
            train, val = self.purities["train"], self.purities["val"]
            self.pending = {m: math.tanh(self.params.lam * abs(train[m] - val[m])) for m in state.modalities}
            self.history.append({"epoch": e["epoch"], "purity_train": train, "purity_val": val,
                                 "alpha": dict(self.pending)})
            self.purities = {}

    def epoch_start(self, state: StepState) -> None:
        if self.pending is None:
            return
        with torch.no_grad():
            for name, alpha in self.pending.items():
                params = [p for p in state.encoders[name].parameters()]
                # (one foreach launch per encoder: theta <- theta + alpha (theta^0 - theta))
                torch._foreach_lerp_(params, self.initial[name], alpha)
        self.pending = None

    def summary(self):
        return {"diagnoses": self.history}

    def state_dict(self):
        return {"initial": {n: [t.clone() for t in ts] for n, ts in self.initial.items()}, "pending": self.pending,
                "history": list(self.history), "purities": dict(self.purities)}

    def load_state_dict(self, state):
        self.initial = {n: [t.to(self.initial[n][0].device) for t in ts] for n, ts in state["initial"].items()}
        self.pending, self.history = state["pending"], list(state["history"])
        self.purities = dict(state.get("purities", {}))

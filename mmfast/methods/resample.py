"""``resample``: re-sampling by Shapley-based modality valuation (Wei, Feng, Lin, Hu, CVPR 2024,
"Enhancing Multimodal Cooperation via Sample-level Modality Valuation"; docs/methods/resample.md),
as the official code computes it.

After each epoch from warmup_epochs - 1 on, every training sample is valued (the training split
through evaluation transforms, eval mode): the fused head's prediction with every coalition of
modalities, the absent ones' pooled features zeros, gives the per-sample characteristic function
v(S) = |S| * right(S), v({}) = 0, and each modality's Shapley value phi_m (mmfast/valuation.py;
two modalities: phi_a = (v_a + v_av - v_v) / 2). The next epoch trains on the clips plus extra
copies, each keeping one modality (the others' features zeroed for that copy):

  level "sample":   per sample and modality n(phi_m) copies keeping m:
                    n = 1 if 0.4 < phi < 0.9, 2 if -0.1 < phi < 0.4, 3 if phi < -0.1, else 0
  level "modality": (two modalities) phibar_m = mean of phi_m over part_ratio N samples drawn
                    with replacement; gap_m = 1 - phibar_m; r = |gap_1 - gap_2| * 2/3 * alpha;
                    floor(r N) samples drawn with replacement, each copied keeping only the
                    modality with the larger gap

The loss stays the fused cross-entropy. The draws of the modality level come from a generator of
the run's seed and the epoch. Everything runs between epochs; the step is joint training's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..valuation import coalition_logits, sample_values, shapley_values
from .base import POOLED_FUSIONS, Method, StepState, WindowParams, check_choice, check_number

# The official copy counts per value bucket (its sample-level dataset class; open intervals: a
# value on a boundary gets none). The top bucket ends at 0.9: for two or three modalities no value
# lies in [0.9, 1) (they are multiples of 1/2 and 1/6), so only mmfast's M >= 4 sees the edge.
BUCKETS = ((0.4, 0.9, 1), (-0.1, 0.4, 2), (-np.inf, -0.1, 3))


def copy_counts(phi: np.ndarray) -> np.ndarray:
    """The sample level's copies per value: n(phi) elementwise (int64)."""
    out = np.zeros(np.shape(phi), dtype=np.int64)
    for low, high, n in BUCKETS:
        out[(phi > low) & (phi < high)] = n
    return out


def modality_level_copies(phi: np.ndarray, part_ratio: float, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """[N, 2] copies of the modality level from the values phi [2, N]."""
    N = phi.shape[1]
    subset = rng.integers(0, N, size=int(part_ratio * N))
    gap = 1.0 - (phi[:, subset].mean(axis=1) if len(subset) else np.zeros(2))
    rate = abs(gap[0] - gap[1]) * 2.0 / 3.0 * alpha
    counts = np.zeros((N, 2), dtype=np.int64)
    np.add.at(counts[:, int(np.argmax(gap))], rng.integers(0, N, size=int(np.floor(rate * N))), 1)
    return counts


class Resample(Method):
    name = "resample"
    fusions = POOLED_FUSIONS
    evaluation_features = True

    @dataclasses.dataclass
    class Params(WindowParams):
        level: str = "sample"  # "sample" (the paper's fine-grained re-sampling) | "modality"
        warmup_epochs: int = 5  # the official warm-up: the clips alone for epochs 0-4
        part_ratio: float = 0.2  # the modality level's share of samples it averages over (official)
        alpha: float = 1.0  # the modality level's rate factor (official)

        def check(self):
            self.check_window("resample")
            check_choice("resample", "level", self.level, ("sample", "modality"))
            check_number("resample", "part_ratio", self.part_ratio, low=0.0, high=1.0)
            check_number("resample", "alpha", self.alpha, low=0.0)

    def fit_start(self, state: StepState) -> None:
        if self.params.level == "modality" and len(state.modalities) != 2:
            raise ValueError(f"resample level='modality' compares two modalities' gaps, got {state.modalities}; "
                             f"use level='sample'")
        self.seed = state.seed
        self.copies: tuple[np.ndarray, np.ndarray] | None = None  # (clip positions, counts [K, M])
        self.for_epoch: int | None = None  # the epoch the copies were made for
        self.shares: dict[str, torch.Tensor] = {}

    def evaluations(self, epoch):
        return ("train",) if epoch is not None and self.params.active(epoch + 1) else ()

    def evaluation_end(self, state: StepState) -> None:
        ev = state.evaluation
        if ev["split"] != "train":
            return
        head = state.head
        was_training = head.training
        head.eval()
        try:
            fused = coalition_logits(head, ev["features"])
        finally:
            head.train(was_training)
        phi = shapley_values(sample_values(fused, ev["labels"])).cpu().numpy()  # [M, N]
        if self.params.level == "sample":
            counts = copy_counts(phi).T
        else:
            rng = np.random.default_rng([self.seed, ev["epoch"], 16])
            counts = modality_level_copies(phi, self.params.part_ratio, self.params.alpha, rng)
        self.copies = (ev["index"].numpy().astype(np.int64), counts)
        self.for_epoch = ev["epoch"] + 1

    def sample_copies(self, epoch: int):
        if self.copies is None or self.for_epoch != epoch or not self.params.active(epoch):
            return None
        return self.copies

    def epoch_start(self, state: StepState) -> None:
        copies = self.sample_copies(state.epoch)
        counts = copies[1].sum(axis=0) if copies is not None else np.zeros(len(state.modalities), dtype=np.int64)
        self.shares = {f"resample/copies/{m}": torch.tensor(float(n), device=state.device)
                       for m, n in zip(state.modalities, counts)}  # (one copy to the device an epoch)

    def after_forward(self, state: StepState) -> None:
        state.metrics.update(self.shares)

    def summary(self):
        return {"copies_for_epoch": self.for_epoch,
                "copies": None if self.copies is None else self.copies[1].sum(axis=0).tolist()}

    def state_dict(self):
        if self.copies is None:
            return {"for_epoch": None}
        return {"for_epoch": self.for_epoch, "index": torch.from_numpy(self.copies[0]),
                "counts": torch.from_numpy(self.copies[1])}

    def load_state_dict(self, state):
        self.for_epoch = state["for_epoch"]
        self.copies = None if self.for_epoch is None else (state["index"].numpy(), state["counts"].numpy())

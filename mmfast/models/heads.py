"""Heads with trainable per-modality classifiers, for the methods that train them (OLM, boost).
Like every head they map the features to ``(fused [B, C], unimodal [M, B, C])``, but here the
uni-modal logits come from classifiers of their own and carry gradients (``trains_unimodal``):
the task loss trains them (the trainer adds their cross-entropies; OLM and boost compute their
own). The training formulas live in the methods' files; these modules hold what inference needs.

- late: one linear classifier per modality, and one on the fused representation (the
  concatenated features, or IRFB's bottleneck); the fused prediction is the fused classifier's.
- boost: per modality a growing list of classifiers Linear(d_m, 256) -> ReLU, into one head
  Linear(256, C) shared by all; fused prediction sum_r w_r sum_t z_t^r (w: fusion_weights).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LateHeads(nn.Module):
    """features: M modality features [B, d_m], optionally followed by a fused representation
    [B, fused_dim] (IRFB's bottleneck). Returns (fused logits, uni-modal logits [M, B, C]); both
    train. Without a fused representation the fused classifier sees the concatenated features.
    measure: the M undropped features when a dropping method changed `features`: every output
    that trains sees what the drop left (a dropped sample teaches no classifier of its
    modality), and a third item {"measured": [M, B, C]} holds the classifiers' logits on the
    undropped features, without autograd, for the balance statistics."""

    trains_unimodal = True

    def __init__(self, in_dims: Sequence[int], num_classes: int, fused_dim: int | None = None):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError(f"LateHeads needs at least 2 modalities, got {len(in_dims)}")
        self.num_modalities = len(in_dims)
        self.has_fused_input = fused_dim is not None
        self.unimodal = nn.ModuleList(nn.Linear(d, num_classes) for d in in_dims)
        self.fused = nn.Linear(fused_dim if fused_dim is not None else sum(in_dims), num_classes)

    @property
    def modality_modules(self) -> nn.ModuleList:
        """The head's part that belongs to each modality (its own classifier)."""
        return self.unimodal

    def forward(self, features, measure=None):
        M = self.num_modalities
        expected = M + 1 if self.has_fused_input else M
        if len(features) != expected:
            raise ValueError(f"LateHeads: expected {expected} feature tensors ({M} modalities"
                             f"{' and the fused representation' if self.has_fused_input else ''}), got {len(features)}")
        unimodal = torch.stack([fc(f) for fc, f in zip(self.unimodal, features)])
        fused_input = features[M] if self.has_fused_input else torch.cat(list(features[:M]), dim=1)
        if measure is None:
            return self.fused(fused_input), unimodal
        if len(measure) != M:
            raise ValueError(f"LateHeads: measure must hold the {M} modalities' features, got {len(measure)}")
        with torch.no_grad():
            measured = torch.stack([fc(f) for fc, f in zip(self.unimodal, measure)])
        return self.fused(fused_input), unimodal, {"measured": measured}


class BoostedClassifiers(nn.Module):
    """Sustained boosting's classifiers: per modality r a list of n_r configurable classifiers
    Linear(d_r, hidden) -> ReLU, all feeding one head Linear(hidden, C) shared by every classifier
    and modality; ``omega`` [M] weights the modalities' predictions in the loss (learned by the
    boost method's ACA), ``fusion_weights`` [M] in the fused prediction (set by the method).

    forward(features) -> (fused, unimodal, {"classifiers": [[n_r, B, C] per modality]}):
    unimodal[r] = sum_t z_t^r, fused = sum_r fusion_weights_r unimodal[r]. ``add_classifier(r)`` grows
    modality r by one (returns its parameters); a state dict with other classifier counts loads
    after resizing to them (resuming across an addition, or loading the best epoch's weights)."""

    trains_unimodal = True

    def __init__(self, in_dims: Sequence[int], num_classes: int, hidden: int = 256):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError(f"BoostedClassifiers needs at least 2 modalities, got {len(in_dims)}")
        self.in_dims, self.hidden = list(in_dims), hidden
        self.classifiers = nn.ModuleList(nn.ModuleList([self._classifier(d)]) for d in in_dims)
        self.head = nn.Linear(hidden, num_classes)
        self.register_buffer("omega", torch.ones(len(in_dims)))
        # The late fusion's weights (the boost method sets them: omega, equal or fixed).
        self.register_buffer("fusion_weights", torch.ones(len(in_dims)))
        # Modality index of every classifier added after construction, in order: the optimizer
        # gets one parameter group per addition, and a resumed run rebuilds them in this order.
        self.added: list[int] = []

    def _classifier(self, d: int) -> nn.Module:
        return nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU())

    def counts(self) -> list[int]:
        return [len(c) for c in self.classifiers]

    def add_classifier(self, modality: int) -> list[nn.Parameter]:
        ref = self.head.weight
        new = self._classifier(self.in_dims[modality]).to(device=ref.device, dtype=ref.dtype)
        self.classifiers[modality].append(new)
        self.added.append(modality)
        return list(new.parameters())

    def added_parameter_groups(self) -> list[list[nn.Parameter]]:
        """The parameters of each classifier added after construction, in the order of addition."""
        seen = [1] * len(self.classifiers)
        groups = []
        for r in self.added:
            groups.append(list(self.classifiers[r][seen[r]].parameters()))
            seen[r] += 1
        return groups

    def classifier_logits(self, features) -> list[torch.Tensor]:
        if len(features) != len(self.classifiers):
            raise ValueError(f"BoostedClassifiers: expected {len(self.classifiers)} feature tensors, "
                             f"got {len(features)}")
        return [torch.stack([self.head(c(f)) for c in cs]) for cs, f in zip(self.classifiers, features)]

    def forward(self, features, measure=None):
        if measure is not None:  # (boost trains no dropping method: Method.fusions keeps them apart)
            raise ValueError("BoostedClassifiers: its classifiers fuse undropped features only (measure=None)")
        per_classifier = self.classifier_logits(features)
        unimodal = torch.stack([z.sum(dim=0) for z in per_classifier])
        fused = (self.fusion_weights.to(unimodal.dtype).view(-1, 1, 1) * unimodal).sum(dim=0)
        return fused, unimodal, {"classifiers": per_classifier}

    def get_extra_state(self):
        return {"added": list(self.added)}

    def set_extra_state(self, state):
        self.added = list(state["added"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "fusion_weights" not in state_dict and prefix + "omega" in state_dict:
            # (a checkpoint from before fusion_weights: its fused prediction was omega-weighted)
            state_dict[prefix + "fusion_weights"] = state_dict[prefix + "omega"].clone()
        # Resize to the saved classifier counts before the parameters load.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            counts = [1] * len(self.classifiers)
            for r in extra["added"]:
                counts[r] += 1
            ref = self.head.weight
            for r, n in enumerate(counts):
                while len(self.classifiers[r]) > n:
                    del self.classifiers[r][-1]
                while len(self.classifiers[r]) < n:
                    self.classifiers[r].append(self._classifier(self.in_dims[r]).to(device=ref.device,
                                                                                     dtype=ref.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SharedHead(nn.Module):
    """One classifier h(z) = W z + b applied to every modality's feature (all of one size), for
    the methods that train the modalities in turn through a shared head (MLA, ReconBoost).
    Returns (fused, unimodal [M, B, C] = h(phi_m), trainable). The fused prediction (``combine``):

    - "entropy" (MLA's inference): sum_m g_m o_m per sample, g = softmax_m(-H_m), H_m the entropy
      of softmax(o_m): the more certain modality counts more;
    - "equal": the mean of the o_m (MLA's static fusion);
    - "ensemble" (ReconBoost): beta sum_m o_m with a learned scalar beta.
    """

    trains_unimodal = True
    COMBINES = ("entropy", "equal", "ensemble")

    def __init__(self, in_dims: Sequence[int], num_classes: int, combine: str = "entropy", beta: float = 1.0):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError(f"SharedHead needs at least 2 modalities, got {len(in_dims)}")
        if len(set(in_dims)) != 1:
            raise ValueError(f"a shared head needs every modality's feature of one size, got {list(in_dims)}")
        if combine not in self.COMBINES:
            raise ValueError(f"SharedHead: combine must be one of {self.COMBINES}, got {combine!r}")
        self.combine = combine
        self.fc = nn.Linear(in_dims[0], num_classes)
        self.beta = nn.Parameter(torch.tensor(float(beta))) if combine == "ensemble" else None

    def fuse(self, unimodal: torch.Tensor) -> torch.Tensor:
        if self.combine == "ensemble":
            return self.beta * unimodal.sum(dim=0)
        if self.combine == "equal":
            return unimodal.mean(dim=0)
        log_p = unimodal.float().log_softmax(dim=2)
        entropy = -(log_p.exp() * log_p).sum(dim=2)  # [M, B]
        return (torch.softmax(-entropy, dim=0).unsqueeze(2).to(unimodal.dtype) * unimodal).sum(dim=0)

    def forward(self, features, measure=None):
        """measure: the features before a method changed them (as LateHeads: a third item
        {"measured": [M, B, C]} without autograd, for the balance statistics)."""
        unimodal = torch.stack([self.fc(f) for f in features])
        if measure is None:
            return self.fuse(unimodal), unimodal
        with torch.no_grad():
            measured = torch.stack([self.fc(f) for f in measure])
        return self.fuse(unimodal), unimodal, {"measured": measured}

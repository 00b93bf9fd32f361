"""One training step and one epoch, the research code's way (see the package docstring).

Formulas: docs/methods/ogm.md and opm.md (mmfast keeps its own, vectorised, in
mmfast/ops/balance.py). The hyper-parameters and the order of random draws match mmfast's
methods of the same name, so with noise off both give the same parameters step for step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NAIVE_METHODS = ("joint", "ogm", "ogm_ge", "opm")


class NaiveStep:
    """Train `model` (an mmfast MultimodalModel with concat fusion) one batch at a time.

    method: joint | ogm | ogm_ge | opm; alpha, form ("paper" or "reference"): OGM's coefficient
    (defaults: the public code's form and CREMA-D alpha);
    q_base, lam, p_exe: OPM's drop; generator: where OPM's uniforms come from (mmfast's Balancer
    draws from a device generator seeded with the run's seed, in the same order; mmfast's opm
    with timing="current" draws like the research code); start_epoch,
    end_epoch, warmup_epochs: the modulation window. The model is put in the default (contiguous)
    memory layout, as the research code trains. After each step, `coeffs` and `drop_probs`
    hold the Python floats the step computed (the research code's host-side values)."""

    def __init__(self, model, optimizer, method: str = "joint", *, alpha: float = 0.8, form: str = "reference",
                 q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, generator: torch.Generator | None = None,
                 start_epoch: int = 0, end_epoch: int | None = None, warmup_epochs: int = 0):
        if method not in NAIVE_METHODS:
            raise ValueError(f"NaiveStep: method must be one of {NAIVE_METHODS}, got {method!r}")
        if form not in ("paper", "reference"):
            raise ValueError(f"NaiveStep: form must be 'paper' or 'reference', got {form!r}")
        if not hasattr(model.fusion, "fc") or not hasattr(model.fusion, "in_dims"):
            raise ValueError("NaiveStep: the research code's weight split needs a concat-fusion model")
        # (the research code trains in the default memory layout: a channels_last model is converted)
        model.to(memory_format=torch.contiguous_format)
        self.model, self.optimizer, self.method = model, optimizer, method
        self.alpha, self.form, self.q_base, self.lam, self.p_exe = alpha, form, q_base, lam, p_exe
        self.generator = generator
        self.window = (start_epoch, end_epoch, warmup_epochs)
        self.modalities = list(model.modalities)
        self.coeffs = [1.0] * len(self.modalities)
        self.drop_probs = [0.0] * len(self.modalities)
        self.epoch = 0

    def active(self) -> bool:
        start, end, warmup = self.window
        return self.epoch >= max(start, warmup) and (end is None or self.epoch <= end)

    def __call__(self, batch: dict) -> torch.Tensor:
        model, M = self.model, len(self.modalities)
        modulate = self.method != "joint" and self.active()
        labels = batch["label"]
        self.optimizer.zero_grad()
        features = []
        for name in self.modalities:
            x = batch[name]
            features.append(model.encoders[name](x.unsqueeze(1) if x.dim() == 3 else x))
        B = labels.shape[0]
        if self.method == "joint":
            fused = model.fusion.fc(torch.cat(features, dim=1))
            loss = F.cross_entropy(fused, labels)
            loss.backward()
            self.optimizer.step()
            return loss
        # The uni-modal logits, from the encoders' features of every sample before any drop: a
        # fresh product with each modality's block of the fused weight.
        weight, bias = model.fusion.fc.weight, model.fusion.fc.bias
        outs, start = [], 0
        for f, d in zip(features, model.fusion.in_dims):
            outs.append(torch.mm(f, torch.transpose(weight[:, start:start + d], 0, 1)) + bias / M)
            start += d
        scores = []
        for m, out in enumerate(outs):
            # (the research code takes the softmax of the whole batch for every sample)
            scores.append(sum([F.softmax(out, dim=1)[i][labels[i]] for i in range(B)],
                              torch.zeros((), device=out.device)))
        ratios = []
        for m in range(M):
            ratios.append(sum(scores[m] / scores[j] for j in range(M) if j != m) / (M - 1))
        kept = list(range(B))
        if self.method == "opm":
            # The research code's timing: this batch's probabilities drop this batch's features.
            for m in range(M):
                if ratios[m] > 1:
                    q = self.q_base * (1 + self.lam * math.tanh(ratios[m].item() - 1))
                    self.drop_probs[m] = min(max(q, 0.0), 1.0)
                else:
                    self.drop_probs[m] = 0.0
            if modulate:
                features, _, kept = self._drop(features)
        fused = model.fusion.fc(torch.cat(features, dim=1))
        loss = F.cross_entropy(fused[kept], labels[kept]) if kept else fused.sum() * 0.0
        loss.backward()
        if self.method in ("ogm", "ogm_ge"):
            for m in range(M):
                if ratios[m] > 1:
                    if self.form == "paper":
                        self.coeffs[m] = max(1 - self.alpha * math.tanh(ratios[m].item() - 1), 0.0)
                    else:
                        self.coeffs[m] = 1 - math.tanh(self.alpha * ratios[m].item())
                else:
                    self.coeffs[m] = 1.0
            if modulate:
                self._modulate(noise=self.method == "ogm_ge")
        self.optimizer.step()
        return loss

    def _modulate(self, noise: bool) -> None:
        for m, name in enumerate(self.modalities):
            for param in self.model.encoders[name].parameters():
                if param.grad is None or len(param.grad.size()) != 4:
                    continue
                if noise:
                    param.grad = param.grad * self.coeffs[m] + \
                        torch.zeros_like(param.grad).normal_(0, param.grad.std().item() + 1e-8)
                else:
                    param.grad = param.grad * self.coeffs[m]

    def _drop(self, features):
        """OPM's drop with this step's probabilities (measured on this batch, before the drop):
        one execute draw, then an [M, B] block of uniforms, decided sample by sample."""
        M, B = len(features), features[0].shape[0]
        device = features[0].device
        execute = torch.rand((), generator=self.generator, device=device).item() < self.p_exe
        draws = torch.rand((M, B), generator=self.generator, device=device)
        probs = [float(torch.tensor(q, dtype=torch.float32)) if execute else 0.0 for q in self.drop_probs]
        dims = [f.shape[1] for f in features]
        theta = sum(d * q for d, q in zip(dims, probs)) / sum(dims)
        scale = 1.0 / (1.0 - theta) if theta < 1.0 else 0.0
        keep = [[draws[m][i].item() >= probs[m] for i in range(B)] for m in range(M)]
        dropped = []
        for m, f in enumerate(features):
            mask = torch.tensor([scale if keep[m][i] else 0.0 for i in range(B)], device=device)
            dropped.append(f * mask.view(B, 1))
        kept = [i for i in range(B) if any(keep[m][i] for m in range(M))]
        return dropped, keep, kept


def naive_epoch(step: NaiveStep, loader, device: torch.device) -> int:
    """One pass over `loader` (batches of CPU tensors): returns the number of samples trained on."""
    step.model.train()
    samples = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        step(batch)
        samples += len(batch["label"])
    return samples

"""``ogm``, ``ogm_ge``, ``ogm_star``: on-the-fly gradient modulation (docs/methods/ogm.md;
TPAMI 2024 eq. 11-17, CVPR 2022).

After backward, every selected encoder gradient g of modality m becomes
``k[m] * g`` (ogm, ogm_star) or ``k[m] * g + N(0, std(g)^2)`` (ogm_ge), with k from this step's
balance statistics (formulas in mmfast/ops/balance.py; ogm_star uses form="star", which raises
the weak modality's gradients instead), in one fused call (mmfast.ops.grad_modulate_) keyed by
the run's seed and the device step counter. Inside the inclusive epoch window
[start_epoch, end_epoch] and after warmup_epochs; elsewhere gradients are untouched.

Which gradients (``weights``): "auto" (default) takes, per encoder, its 4-D convolution weights
(the public code's choice) when convolutions hold most of its weight elements (a CNN), and every
weight of dim > 1 otherwise (a Transformer, MLP or Conv1d stream, also with a conv stem: the paper
modulates every encoder parameter, section 3.2.2);
"conv" the 4-D weights only; "all" every encoder weight of dim > 1. A run in which some modality
would get no modulated gradient is refused, naming it. Their order (modality by modality, then
the encoder's parameters() order) fixes each tensor's noise stream. ``coverage`` (also in the
run's summary.json) counts the tensors and elements modulated per modality.
"""
from __future__ import annotations

import dataclasses

from ..ops import grad_modulate_
from ..ops.balance import ALPHA_DEFAULTS, FORMS, KINDS, ZS
from .base import Method, StepState, WindowParams, check_choice, check_number

WEIGHT_MODES = ("auto", "conv", "all")
# (ALPHA_DEFAULTS, in mmfast/ops/balance.py beside the formulas, says where each comes from.)


def is_convolutional(weights) -> bool:
    """Whether 4-D (convolution) weights hold most of these weights' elements: a CNN encoder."""
    conv = sum(p.numel() for p in weights if p.dim() == 4)
    return conv > 0 and 2 * conv > sum(p.numel() for p in weights if p.dim() > 1)


def select_encoder_params(encoders, mode: str):
    """(parameters, modality index of each) of the encoders (a name -> module mapping, in
    modality order): 4-D weights for mode 'conv', every weight of dim > 1 for 'all', and for
    'auto' a convolutional encoder's 4-D weights (most of its weight elements are convolutions),
    every weight of dim > 1 of any other encoder (a Transformer with a conv stem included)."""
    params, index = [], []
    for m, encoder in enumerate(encoders.values()):
        trainable = [p for p in encoder.parameters() if p.requires_grad]
        conv_only = mode == "conv" or (mode == "auto" and is_convolutional(trainable))
        for p in trainable:
            if p.dim() == 4 if conv_only else p.dim() > 1:
                params.append(p)
                index.append(m)
    return params, index


class OGM(Method):
    name = "ogm"
    measures_balance = True

    @dataclasses.dataclass
    class Params(WindowParams):
        alpha: float | None = None  # None: the form's default, ALPHA_DEFAULTS (each names its source)
        form: str = "paper"  # "paper" (TPAMI eq. 11), "reference" (public code: 1 - tanh(alpha * rho))
        z: str = "tanh"
        kind: str = "ratio"
        noise: bool = False  # Gaussian noise of the gradient's std (GE)
        weights: str = "auto"  # which encoder gradients (module docstring); the paper: all of them
        eps: float = 1e-8

        def check(self, name="ogm"):
            check_choice(name, "form", self.form, FORMS)
            if self.alpha is None:
                self.alpha = ALPHA_DEFAULTS[self.form]
            check_number(name, "alpha", self.alpha, low=0)
            check_choice(name, "z", self.z, ZS)
            check_choice(name, "kind", self.kind, KINDS)
            check_choice(name, "weights", self.weights, WEIGHT_MODES)
            check_choice(name, "noise", self.noise, (True, False))
            self.check_window(name)
            check_number(name, "eps", self.eps, low=0)
            if self.form == "star" and self.kind != "ratio":
                raise ValueError(f"{name}.form='star' needs kind='ratio'")

    def balance_params(self):
        p = self.params
        return {"alpha": p.alpha, "form": p.form, "z": p.z, "kind": p.kind}

    def fit_start(self, state: StepState) -> None:
        self.modulated, self.modality_index = select_encoder_params(state.encoders, self.params.weights)
        self.coverage = {name: {"tensors": 0, "elements": 0} for name in state.encoders}
        names = list(state.encoders)
        for p, m in zip(self.modulated, self.modality_index):
            self.coverage[names[m]]["tensors"] += 1
            self.coverage[names[m]]["elements"] += p.numel()
        bare = [name for name, c in self.coverage.items() if c["tensors"] == 0]
        if bare:
            hint = " (no 4-D convolution weights: use weights='auto' or 'all')" if self.params.weights == "conv" else ""
            raise ValueError(f"{self.name}: weights={self.params.weights!r} modulates no gradient of the encoder(s) "
                             f"{bare}{hint}")

    def summary(self) -> dict:
        return {"modulated": self.coverage}

    def after_backward(self, state: StepState) -> None:
        if not self.params.active(state.epoch):
            return
        coeffs = state.stats().coeffs
        for m, name in enumerate(state.modalities):
            state.metrics[f"coeff/{name}"] = coeffs[m]
        pairs = [(p.grad, m) for p, m in zip(self.modulated, self.modality_index) if p.grad is not None]
        if pairs:
            grads, index = zip(*pairs)
            grad_modulate_(list(grads), coeffs, list(index), noise=self.params.noise, seed=state.seed,
                           step=state.step, eps=self.params.eps)


class OGMGE(OGM):
    name = "ogm_ge"

    @dataclasses.dataclass
    class Params(OGM.Params):
        noise: bool = True

        def check(self):
            super().check("ogm_ge")


class OGMStar(OGM):
    name = "ogm_star"

    @dataclasses.dataclass
    class Params(OGM.Params):
        form: str = "star"

        def check(self):
            super().check("ogm_star")

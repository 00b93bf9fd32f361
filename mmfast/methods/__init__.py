"""Balancing methods: one small object per method, reacting to named events of the step
(mmfast/methods/base.py). ``create(name, **hparams)`` builds the methods a name stands for;
``METHODS`` lists them with their typed hyper-parameters.

| name | what it does | file |
|---|---|---|
| joint | plain joint training | joint.py |
| unimodal | one modality alone (modality=...) | unimodal.py |
| ogm | scale the dominant modality's encoder gradients by k | ogm.py |
| ogm_ge | ogm plus Gaussian noise of each gradient's std | ogm.py |
| ogm_star | raise the weak modality's gradients instead | ogm.py |
| opm | drop the dominant modality's features with adaptive probability | feature_dropping.py |
| moddrop | drop features with fixed per-modality probabilities | feature_dropping.py |
| opm_ogm | opm and ogm_ge together | (opm + ogm_ge) |
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import EVENTS, Method, StepState, merge_balance_params
from .feature_dropping import OPM, ModDrop
from .joint import Joint
from .ogm import OGM, OGMGE, OGMStar, select_encoder_params
from .unimodal import Unimodal

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Joint, Unimodal, OGM, OGMGE, OGMStar, OPM, ModDrop)}
# Names standing for several methods at once; a hyper-parameter goes to every part that has it.
COMBINATIONS: dict[str, tuple[str, ...]] = {"opm_ogm": ("opm", "ogm_ge")}
NAMES = tuple(METHODS) + tuple(COMBINATIONS)


def hyper_parameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of a method name with their defaults."""
    parts = COMBINATIONS.get(name, (name,))
    if any(p not in METHODS for p in parts):
        raise ValueError(f"unknown method {name!r}; known: {NAMES}")
    out = {}
    for part in parts:
        for f in dataclasses.fields(METHODS[part].Params):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.setdefault(f.name, default)
    return out


def create(name: str, **hparams) -> list[Method]:
    """The method objects `name` stands for, built from keyword hyper-parameters (errors name
    the method and the key)."""
    if name not in NAMES:
        raise ValueError(f"unknown method {name!r}; known: {NAMES}")
    parts = COMBINATIONS.get(name, (name,))
    known = hyper_parameters(name)
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"method {name!r}: unknown hyper-parameter(s) {unknown}; known: {sorted(known)}")
    methods = []
    for part in parts:
        fields = {f.name for f in dataclasses.fields(METHODS[part].Params)}
        methods.append(METHODS[part](**{k: v for k, v in hparams.items() if k in fields}))
    merge_balance_params(methods)  # conflicts are configuration errors, found now
    return methods


__all__ = ["COMBINATIONS", "EVENTS", "METHODS", "NAMES", "Method", "StepState", "create", "hyper_parameters",
           "merge_balance_params", "select_encoder_params"]

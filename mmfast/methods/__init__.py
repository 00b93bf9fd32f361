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
| olm | learned logit coefficients towards rebalanced target norms (late or irfb heads) | olm.py |
| boost | sustained boosting: growing per-modality classifiers, adaptive assignment (boost head) | boost.py |

``Balancer`` (balancer.py) drives the methods through a step: the trainer uses it, and so can a
user's own training loop.
"""
from __future__ import annotations

from .balancer import Balancer
from .base import EVENTS, Method, StepState, join_optimizer, merge_balance_params
from .ogm import select_encoder_params
from .registry import COMBINATIONS, METHODS, NAMES, create, fusions, hyper_parameters, register

__all__ = ["Balancer", "COMBINATIONS", "EVENTS", "METHODS", "NAMES", "Method", "StepState", "create", "fusions",
           "hyper_parameters", "join_optimizer", "merge_balance_params", "register", "select_encoder_params"]

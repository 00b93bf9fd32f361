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
| mmcosine | scaled cosine logits per modality, summed (cosine head) | mmcosine.py |
| mbsd | uni-modal losses and confidence-gap self-distillation between modalities | mbsd.py |
| cml | penalise confidence that rises when modalities are removed | cml.py |
| agm | Shapley responses from zeroed forwards; their gradients scaled towards running scores | agm.py |
| mmpareto | per-encoder Pareto combination of multimodal and uni-modal gradients (late heads) | mmpareto.py |
| pmr | prototype cross-entropy for the slower modality (class prototypes per epoch) | pmr.py |
| mslr | a learning rate per modality's branch (sum head) | mslr.py |
| mla | the modalities in turn through one shared classifier, with a gradient projection | mla.py |
| reconboost | alternating boosting stages per modality, then global rectification (ensemble head) | reconboost.py |
| gblending | every head's loss, weighted by each head's generalisation over overfitting (late heads) | gblending.py |

``Balancer`` (balancer.py) drives the methods through a step: the trainer uses it, and so can a
user's own training loop.
"""
from __future__ import annotations

from .balancer import Balancer
from .base import EVENTS, HeldOut, Method, ScratchRun, StepState, TeacherRun, join_optimizer, merge_balance_params, split_optimizer
from .ogm import select_encoder_params
from .registry import COMBINATIONS, METHODS, NAMES, create, fusions, hyper_parameters, mmtm_stages, register

__all__ = ["Balancer", "COMBINATIONS", "EVENTS", "METHODS", "NAMES", "HeldOut", "Method", "ScratchRun", "StepState", "TeacherRun", "create",
           "fusions", "hyper_parameters", "join_optimizer", "merge_balance_params", "mmtm_stages", "register", "select_encoder_params",
           "split_optimizer"]

"""The research code's way of training with OGM-GE and OPM, in plain PyTorch: the baseline mmfast
is measured against (bench/step.py) and checked against (tests/test_naive_baseline.py).

Written from the methods' descriptions (docs/methods/), in the public research code's style on purpose: a torch
Dataset decoding with PIL and librosa in DataLoader workers (mmfast.data.naive), per-sample
Python loops for the scores, host reads (`.item()`, Python branches on tensors) for the ratios,
coefficients and drop decisions, one `zeros_like(g).normal_(0, std)` per modulated parameter, a
fresh weight-split product for the uni-modal logits, fp32, no channels_last. It runs on mmfast's
model modules (concat fusion), so both sides start from the same initialisation.
"""
from .train import NAIVE_METHODS, NaiveStep, naive_epoch

__all__ = ["NAIVE_METHODS", "NaiveStep", "naive_epoch"]

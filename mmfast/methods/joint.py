"""``joint``: plain joint training (fused loss only, nothing modulated); the baseline."""
from __future__ import annotations

from .base import GENERIC_FUSIONS, Method


class Joint(Method):
    name = "joint"
    # Also boost's head (one classifier per modality, omega 1, every head's cross-entropy):
    # plain training of the model boost trains, the baseline its own cost is measured against.
    fusions = (*GENERIC_FUSIONS, "boost")

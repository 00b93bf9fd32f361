"""``joint``: plain joint training (fused loss only, nothing modulated); the baseline."""
from __future__ import annotations

from .base import GENERIC_FUSIONS, Method


class Joint(Method):
    name = "joint"
    # Also the method-specific heads (boost's; the shared classifier of MLA and ReconBoost), trained
    # plainly with every head's cross-entropy: the same-model baselines their costs are measured against.
    fusions = (*GENERIC_FUSIONS, "boost", "shared", "ensemble", "amco")

"""``joint``: plain joint training (fused loss only, nothing modulated); the baseline."""
from __future__ import annotations

from .base import Method


class Joint(Method):
    name = "joint"

"""Fused ops of mmfast. Each has a slow, obvious reference beside it (``*_reference``)."""
from .grad_modulation import (
    gaussian_noise,
    gaussian_noise_reference,
    grad_modulate_,
    grad_modulate_reference_,
    philox4x32_10_reference,
)

__all__ = [
    "gaussian_noise",
    "gaussian_noise_reference",
    "grad_modulate_",
    "grad_modulate_reference_",
    "philox4x32_10_reference",
]

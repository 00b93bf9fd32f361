"""Fused ops of mmfast. Each has a slow, obvious reference beside it (``*_reference``)."""
from .balance import (
    BalanceStats,
    Coefficients,
    balance_coefficients,
    balance_stats,
    discrepancy_ratio,
    discrepancy_ratio_reference,
    modality_scores,
    modality_scores_reference,
    ogm_coefficients,
    ogm_coefficients_reference,
    opm_drop_probabilities,
    opm_drop_probabilities_reference,
)
from .feature_drop import FeatureDrop, feature_drop, feature_drop_reference, weighted_mean
from .grad_modulation import (
    gaussian_noise,
    gaussian_noise_reference,
    grad_modulate_,
    grad_modulate_reference_,
    memory_order,
    philox4x32_10_reference,
)

__all__ = [
    "BalanceStats",
    "Coefficients",
    "balance_coefficients",
    "FeatureDrop",
    "balance_stats",
    "discrepancy_ratio",
    "discrepancy_ratio_reference",
    "feature_drop",
    "feature_drop_reference",
    "gaussian_noise",
    "gaussian_noise_reference",
    "grad_modulate_",
    "grad_modulate_reference_",
    "memory_order",
    "modality_scores",
    "modality_scores_reference",
    "ogm_coefficients",
    "ogm_coefficients_reference",
    "opm_drop_probabilities",
    "opm_drop_probabilities_reference",
    "philox4x32_10_reference",
    "weighted_mean",
]

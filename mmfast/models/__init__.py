"""Encoders used by the published balanced-multimodal recipes."""
from .resnet import resnet18_encoder

__all__ = ["resnet18_encoder"]

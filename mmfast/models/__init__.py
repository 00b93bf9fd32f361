"""Encoders used by the published balanced-multimodal recipes."""
from .resnet import resnet18_encoder
from .small import SmallConvEncoder

__all__ = ["SmallConvEncoder", "resnet18_encoder"]

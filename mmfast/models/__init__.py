"""Encoders, fusion heads and the multimodal model contract (encode -> features -> head)."""
from .fusion import FUSIONS, SPLITTABLE, make_fusion
from .irfb import IRFBEncoder
from .multimodal import MultimodalModel, build_model
from .resnet import ResNet18Encoder, resnet18_encoder
from .small import SmallConvEncoder

__all__ = ["FUSIONS", "IRFBEncoder", "MultimodalModel", "ResNet18Encoder", "SPLITTABLE", "SmallConvEncoder", "build_model",
           "make_fusion", "resnet18_encoder"]

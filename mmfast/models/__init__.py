"""Encoders, fusion heads and the multimodal model contract (encode -> features -> head)."""
from .fusion import FUSIONS, SPLITTABLE, make_fusion
from .heads import BoostedClassifiers, LateHeads
from .irfb import IRFBEncoder
from .multimodal import FUSION_NAMES, IRFBModel, MultimodalModel, build_model
from .resnet import ResNet18Encoder, resnet18_encoder
from .small import SmallConvEncoder

__all__ = ["BoostedClassifiers", "FUSIONS", "FUSION_NAMES", "IRFBEncoder", "IRFBModel", "LateHeads", "MultimodalModel",
           "ResNet18Encoder", "SPLITTABLE", "SmallConvEncoder", "build_model", "make_fusion", "resnet18_encoder"]

"""Encoders, fusion heads and the multimodal model contract (encode -> features -> head)."""
from .fusion import FUSIONS, SPLITTABLE, make_fusion
from .heads import BoostedClassifiers, LateHeads, SharedHead
from .irfb import IRFBEncoder
from .mmtm import MMTMBlock, MMTMExchange
from .multimodal import IRFBModel, MMTMModel, MultimodalModel, build_model
from .registry import FUSION_KINDS, FUSION_NAMES, FusionKind, fusion_kind, fusions_where, task_loss_per_sample
from .resnet import ResNet18Encoder, resnet18_encoder
from .sequence import SequenceEncoder
from .small import SmallConvEncoder

__all__ = ["BoostedClassifiers", "FUSIONS", "FUSION_KINDS", "FUSION_NAMES", "FusionKind", "IRFBEncoder", "IRFBModel",
           "LateHeads", "MMTMBlock", "MMTMExchange", "MMTMModel", "MultimodalModel", "ResNet18Encoder", "SPLITTABLE",
           "SequenceEncoder", "SharedHead", "SmallConvEncoder", "build_model",
           "fusion_kind", "fusions_where", "make_fusion", "resnet18_encoder", "task_loss_per_sample"]

"""Data: dataset layouts, audio/frame recipes, the DALI and naive loaders, the embedded dataset.

    from mmfast.data import DataConfig, build_loader, crema_d
    cfg = DataConfig(root="data/cremad", layout="crema_d", audio=crema_d())
    for batch in build_loader(cfg, "train", backend="dali"):
        batch["audio"], batch["visual"], batch["label"]
"""
from .audio import AudioRecipe, crema_d, kaldi_fbank, kinetics_sounds, vggsound
from .errors import DataError, SkipReport
from .features import FeatureRecipe, mask_key
from .layouts import Clip, DatasetIndex, read_layout
from .base import DataConfig
from .loader import build_loader
from .synth import SynthSpec, generate
from .video import FrameRecipe

__all__ = [
    "AudioRecipe", "Clip", "DataConfig", "DataError", "DatasetIndex", "FeatureRecipe", "FrameRecipe", "SkipReport",
    "SynthSpec", "build_loader", "crema_d", "generate", "kaldi_fbank", "kinetics_sounds", "mask_key", "read_layout",
    "vggsound",
]

"""What both data backends share: the configuration, probing of every clip when a loader is
built, and the loader base class (probed clips of one split, epoch order, skip bookkeeping).
The backends (dali_loader.py, naive.py) build on it; loader.py picks one."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import AudioRecipe, check_wave
from .errors import DataError, SkipReport, check_on_error
from .layouts import DatasetIndex
from .video import FrameRecipe, frame_files, probe_video

log = logging.getLogger("mmfast.data")


@dataclass
class DataConfig:
    root: str
    layout: str = "crema_d"
    modalities: dict | None = None  # generic layout: {name: "audio" | "video" | "frames"}
    audio: AudioRecipe = field(default_factory=AudioRecipe)
    frames: FrameRecipe = field(default_factory=FrameRecipe)
    batch_size: int = 32
    num_workers: int = 2  # DataLoader workers (naive) = DALI CPU threads (dali)
    seed: int = 0
    on_error: str = "raise"
    device: str = "auto"  # DALI: "cuda" decodes and transforms on the GPU; "auto": cuda if present

    def check(self):
        check_on_error(self.on_error)
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ProbedClip:
    """A clip that passed probing, with what the loaders need to know in advance."""

    clip_id: str
    label: int
    files: dict
    audio_seconds: dict  # audio modality -> duration at the file's own rate
    num_frames: dict  # video/frames modality -> frames available
    frame_files: dict  # frames modality -> sorted list of frame files
    codecs: dict  # video modality -> codec name


def probe(index: DatasetIndex, clips, cfg: DataConfig, report: SkipReport) -> list:
    import soundfile as sf

    probed = []
    for clip in clips:
        try:
            seconds, counts, listed, codecs = {}, {}, {}, {}
            for modality, kind in index.kinds.items():
                path = Path(clip.files[modality])
                if kind == "audio":
                    if not path.exists():
                        raise DataError(path, "missing file")
                    try:
                        declared = sf.info(str(path)).frames
                        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
                    except Exception as exc:
                        raise DataError(path, f"corrupt audio: {type(exc).__name__}: {exc}") from None
                    if len(wave) < declared:
                        raise DataError(path, f"truncated audio: the header declares {declared} samples, "
                                              f"the file holds {len(wave)}")
                    check_wave(path, wave.mean(axis=1), rate, cfg.audio.min_duration)
                    seconds[modality] = len(wave) / rate
                elif kind == "video":
                    counts[modality], codecs[modality] = probe_video(path)
                else:
                    listed[modality] = frame_files(path)
                    counts[modality] = len(listed[modality])
            probed.append(ProbedClip(clip.clip_id, clip.label, dict(clip.files), seconds, counts, listed, codecs))
        except DataError as err:
            if cfg.on_error == "raise":
                raise
            report.add(err)
    return probed


class ClipLoader:
    """Base of both backends: the probed clips of one split and the epoch bookkeeping."""

    def __init__(self, cfg: DataConfig, index: DatasetIndex, split: str, train: bool):
        self.cfg, self.index, self.split, self.train = cfg, index, split, train
        # Skipped while reading the layout and probing; `skipped` adds the current epoch's
        # decode-time skips (naive loader) and starts again from this every epoch.
        self.skipped_at_build = index.skipped.copy()
        self.clips = probe(index, index.split(split), cfg, self.skipped_at_build)
        if not self.clips:
            raise DataError(index.root, f"split {split!r} has no usable clips ({self.skipped_at_build.summary()})")
        self.skipped = self.skipped_at_build.copy()
        self.epoch = 0

    @property
    def modalities(self):
        return self.index.kinds

    def __len__(self) -> int:
        return -(-len(self.clips) // self.cfg.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.clips)
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.train else np.arange(n)

    def sample_rng(self, epoch: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, epoch, position, 1])

    def end_epoch(self) -> None:
        if self.skipped.total:
            log.warning("%s split %r, epoch %d: %s", self.index.name, self.split, self.epoch, self.skipped.summary())
        self.last_epoch_skipped = self.skipped
        self.skipped = self.skipped_at_build.copy()
        self.epoch += 1

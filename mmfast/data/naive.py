"""The naive reference loader, the way the research code loads data: a torch Dataset decoding
each sample with librosa (audio) and PIL/PyAV (frames) inside DataLoader worker processes.
Kept for parity tests and as the benchmark baseline; the research code's frame-selection bug is
not reproduced (see video.py)."""
from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from .audio import audio_features, cut_window, load_wave
from .base import ClipLoader
from .errors import DataError
from .transforms import transform_frames
from .video import decode_video_frames, segment_indices


class ClipDataset(torch.utils.data.Dataset):
    """Items are addressed by (epoch, clip number): the sampler, in the main process, decides the
    order, so persistent workers need no shared state."""

    def __init__(self, loader: "NaiveLoader"):
        self.clips, self.kinds, self.cfg = loader.clips, dict(loader.modalities), loader.cfg
        self.train, self.sample_rng = loader.train, loader.sample_rng

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, key):
        epoch, number = key
        clip = self.clips[number]
        rng = self.sample_rng(epoch, number)
        try:
            sample = {}
            for modality, kind in self.kinds.items():
                if kind == "audio":
                    recipe = self.cfg.audio
                    wave = load_wave(clip.files[modality], recipe)
                    window = cut_window(wave, recipe, recipe.offset_fraction(self.train, rng))
                    sample[modality] = audio_features(window, recipe)
                else:
                    idx = segment_indices(clip.num_frames[modality], self.cfg.frames.num_frames, self.train, rng)
                    if kind == "video":
                        frames = decode_video_frames(clip.files[modality], idx)
                    else:
                        frames = np.stack([_read_image(clip.frame_files[modality][i]) for i in idx])
                    sample[modality] = torch.from_numpy(transform_frames(frames, self.cfg.frames, self.train, rng))
        except DataError as err:
            if self.cfg.on_error == "raise":
                raise
            return {"_skipped": err.path, "_reason": err.reason}  # as data: a path may hold ": "
        sample["label"] = torch.tensor(clip.label, dtype=torch.int64)
        sample["index"] = torch.tensor(number, dtype=torch.int64)
        return sample


def _read_image(path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise DataError(path, f"corrupt image: {type(exc).__name__}: {exc}") from None


def _collate(samples):
    good = [s for s in samples if "_skipped" not in s]
    skipped = [(s["_skipped"], s["_reason"]) for s in samples if "_skipped" in s]
    batch = torch.utils.data.default_collate(good) if good else {}
    return batch, skipped


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, loader: "NaiveLoader"):
        self.loader = loader

    def __len__(self):
        return len(self.loader.clips)

    def __iter__(self):
        epoch = self.loader.epoch
        return iter([(epoch, int(i)) for i in self.loader.order(epoch)])


def _worker_start_method():
    """fork, unless DALI is loaded: forking a process whose native threads (DALI's) may hold locks
    can deadlock the child, so then workers come from a fork server (which, like spawn, needs
    the usual `if __name__ == "__main__":` guard in scripts)."""
    return "forkserver" if "nvidia.dali.backend_impl" in sys.modules else "fork"


class NaiveLoader(ClipLoader):
    """Worker processes are started once per loader (persistent across epochs)."""

    def __init__(self, cfg, index, split, train):
        super().__init__(cfg, index, split, train)
        workers = cfg.num_workers
        self.loader = torch.utils.data.DataLoader(
            ClipDataset(self), batch_size=cfg.batch_size, sampler=_EpochSampler(self), num_workers=workers,
            collate_fn=_collate, persistent_workers=workers > 0,
            multiprocessing_context=_worker_start_method() if workers > 0 else None)

    def __iter__(self):
        for batch, skipped in self.loader:
            for path, reason in skipped:
                self.skipped.add(DataError(path, reason))
            if batch:
                yield batch
        self.end_epoch()

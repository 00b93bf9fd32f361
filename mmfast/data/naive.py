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
from .base import ClipLoader, sample_rng
from .errors import DataError
from .features import feature_sample, mask_key
from .transforms import transform_frames
from .video import decode_video_frames, segment_indices


class ClipDataset(torch.utils.data.Dataset):
    """Items are addressed by (epoch, plan item, clip position): the sampler, in the main process,
    decides the order (and which clip a copy repeats), so persistent workers need no shared state.
    The item keys the sample's random draws."""

    def __init__(self, loader: "NaiveLoader"):
        # (no reference back to the loader: see NaiveLoader)
        self.clips, self.kinds, self.cfg, self.train = (loader.base_clips, dict(loader.modalities), loader.cfg,
                                                        loader.train)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, key):
        epoch, number, source = key
        clip = self.clips[source]
        try:
            sample = decode_sample(clip, self.kinds, self.cfg, self.train, sample_rng(self.cfg.seed, epoch, number))
        except DataError as err:
            # Returned as data, also under on_error="raise": the main process raises it in batch
            # order (an exception raised in a worker process would come back as a bare RuntimeError).
            return {"_error": (err.path, err.reason, clip.clip_id)}
        sample["label"] = torch.tensor(clip.label, dtype=torch.int64)
        sample["index"] = torch.tensor(number, dtype=torch.int64)
        return sample


def decode_sample(clip, kinds: dict, cfg, train: bool, rng: np.random.Generator) -> dict:
    """Every modality of one probed clip, decoded and transformed the reference way; a DataError
    names the file that failed. (The DALI loader also calls it to find which file of a clip DALI
    could not decode.)"""
    sample = {}
    for modality, kind in kinds.items():
        if kind == "audio":
            recipe = cfg.audio
            wave = load_wave(clip.files[modality], recipe)
            window = cut_window(wave, recipe, recipe.offset_fraction(train, rng))
            sample[modality] = audio_features(window, recipe)
        elif kind == "features":
            u = cfg.features.offset_fraction(train, rng)
            values, mask = feature_sample(clip.files[modality], clip.feature_dims[modality], cfg.features, u)
            sample[modality], sample[mask_key(modality)] = torch.from_numpy(values), torch.from_numpy(mask)
        else:
            idx = segment_indices(clip.num_frames[modality], cfg.frames.num_frames, train, rng)
            if kind == "video":
                frames = decode_video_frames(clip.files[modality], idx)
            else:
                frames = np.stack([_read_image(clip.frame_files[modality][i]) for i in idx])
            sample[modality] = torch.from_numpy(transform_frames(frames, cfg.frames, train, rng))
    return sample


def _read_image(path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise DataError(path, f"corrupt image: {type(exc).__name__}: {exc}") from None


def _collate(samples):
    good = [s for s in samples if "_error" not in s]
    errors = [DataError(*s["_error"]) for s in samples if "_error" in s]
    batch = torch.utils.data.default_collate(good) if good else {}
    return batch, errors


class _PassPlan:
    """The current pass's epoch, batches (ClipLoader.plan) and the clip each plan item decodes
    (copy_source; None: itself), set by the loader, read by the sampler."""

    def __init__(self):
        self.epoch, self.batches, self.source = 0, [], None


class _PlanSampler(torch.utils.data.Sampler):
    """Batches of (epoch, plan item, clip position) keys: the current pass's plan."""

    def __init__(self, plan: _PassPlan):
        self.plan = plan

    def __len__(self):
        return len(self.plan.batches)

    def __iter__(self):
        epoch, source = self.plan.epoch, self.plan.source
        return iter([[(epoch, int(i), int(i if source is None else source[i])) for i in ids]
                     for ids in self.plan.batches])


def _worker_start_method():
    """fork, unless DALI is loaded: forking a process whose native threads (DALI's) may hold locks
    can deadlock the child, so then workers come from a fork server (which, like spawn, needs
    the usual `if __name__ == "__main__":` guard in scripts)."""
    return "forkserver" if "nvidia.dali.backend_impl" in sys.modules else "fork"


class NaiveLoader(ClipLoader):
    """Worker processes are started once per loader (persistent across epochs); each pass asks
    the DataLoader for a fresh iterator, which starts from a clean state.

    Neither the dataset nor the sampler refers back to the loader: in a reference cycle the
    DataLoader would be freed by the garbage collector, which closes its queues (their weakref
    finalizers) before the iterator's shutdown can tell the workers to stop, so every collected
    loader waited 5 s per worker before killing them. Freed by reference count, the workers stop
    at once."""

    def __init__(self, cfg, index, split, train):
        super().__init__(cfg, index, split, train)
        workers = cfg.num_workers
        self.pass_plan = _PassPlan()
        self.loader = torch.utils.data.DataLoader(
            ClipDataset(self), batch_sampler=_PlanSampler(self.pass_plan), num_workers=workers,
            collate_fn=_collate, persistent_workers=workers > 0,
            multiprocessing_context=_worker_start_method() if workers > 0 else None)

    def batches(self, start: int = 0):
        self.pass_plan.batches, this_pass = self._begin_pass(start)
        self.pass_plan.epoch, self.pass_plan.source = self.epoch, self.copy_source
        return self._run_pass(iter(self.loader), this_pass)

    def _run_pass(self, batches, this_pass: int):
        for batch, errors in batches:
            self._check_current(this_pass)
            self._faults(errors)
            self.position += 1
            if batch:
                yield self.mark_copies(batch)
        self._check_current(this_pass)  # (persistent workers: a newer pass reuses the iterator)
        self.end_epoch()

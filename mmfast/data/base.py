"""What both data backends share: the configuration, probing of every clip when a loader is
built, and the loader base class (probed clips of one split, epoch order, skip bookkeeping).
The backends (dali_loader.py, naive.py) build on it; loader.py picks one."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..distributed import shard_bounds
from .audio import AudioRecipe, check_wave
from .errors import DataError, SkipReport, check_on_error
from .features import FeatureRecipe, load_features
from .layouts import DatasetIndex
from .video import FrameRecipe, probe_frames, probe_video

log = logging.getLogger("mmfast.data")


@dataclass
class DataConfig:
    root: str
    layout: str = "crema_d"
    modalities: dict | None = None  # generic layout: {name: "audio" | "video" | "frames" | "features"}
    audio: AudioRecipe = field(default_factory=AudioRecipe)
    frames: FrameRecipe = field(default_factory=FrameRecipe)
    features: FeatureRecipe = field(default_factory=FeatureRecipe)  # features modalities: length, window
    batch_size: int = 32
    num_workers: int = 2  # DataLoader workers (naive) = DALI CPU threads (dali)
    seed: int = 0
    on_error: str = "raise"
    allow_overlap: bool = False  # accept a clip listed in two splits (refused by default)
    device: str = "auto"  # DALI: "cuda" decodes and transforms on the GPU; "auto": cuda if present
    cache: str = "off"  # decoded-sample cache (DALI): "off", "auto" (the user's cache folder) or a folder
    cache_max_gb: float = 20.0  # its disk budget (no published value: a size that fits most disks)

    def check(self):
        check_on_error(self.on_error)
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if not isinstance(self.cache, str) or not self.cache:
            raise ValueError(f"cache must be 'off', 'auto' or a folder, got {self.cache!r}")
        if not (isinstance(self.cache_max_gb, (int, float)) and 0 <= self.cache_max_gb < float("inf")):
            raise ValueError(f"cache_max_gb must be a finite number >= 0, got {self.cache_max_gb!r}")
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
    frame_sizes: dict  # video/frames modality -> (width, height)
    audio_rates: dict  # audio modality -> the file's sample rate
    audio_formats: dict  # audio modality -> container format as soundfile names it (WAV, FLAC, MP3, ...)
    audio_subtypes: dict  # audio modality -> sample format as soundfile names it (PCM_16, FLOAT, ...)
    feature_dims: dict = field(default_factory=dict)  # features modality -> D (the layout's, for every clip)


def probe(index: DatasetIndex, clips, cfg: DataConfig, report: SkipReport) -> list:
    import soundfile as sf

    probed = []
    for clip in clips:
        try:
            seconds, counts, listed, codecs, sizes, rates, formats, subtypes = {}, {}, {}, {}, {}, {}, {}, {}
            for modality, kind in index.kinds.items():
                path = Path(clip.files[modality])
                if kind == "audio":
                    if not path.exists():
                        raise DataError(path, "missing file")
                    try:
                        info = sf.info(str(path))
                        declared, rates[modality], formats[modality] = info.frames, info.samplerate, info.format
                        subtypes[modality] = info.subtype
                        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)
                    except Exception as exc:
                        raise DataError(path, f"corrupt audio: {type(exc).__name__}: {exc}") from None
                    if len(wave) < declared:
                        raise DataError(path, f"truncated audio: the header declares {declared} samples, "
                                              f"the file holds {len(wave)}")
                    check_wave(path, wave.mean(axis=1), rate, cfg.audio.min_duration)
                    seconds[modality] = len(wave) / rate
                elif kind == "video":
                    counts[modality], codecs[modality], sizes[modality] = probe_video(path)
                elif kind == "features":  # (read whole: the values must be finite)
                    load_features(path, index.feature_dims[modality])
                else:
                    listed[modality], sizes[modality] = probe_frames(path)
                    counts[modality] = len(listed[modality])
            probed.append(ProbedClip(clip.clip_id, clip.label, dict(clip.files), seconds, counts, listed, codecs,
                                     sizes, rates, formats, subtypes, dict(index.feature_dims)))
        except DataError as err:
            if cfg.on_error == "raise":
                raise
            err.clip = clip.clip_id
            report.add(err)
    return probed


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of every per-sample draw of clip `position` (its place in the split) in
    `epoch`: both backends draw from it in the same order, so they pick the same samples."""
    return np.random.default_rng([seed, epoch, position, 1])


def held_out_positions(seed: int, clips: int, count: int) -> np.ndarray:
    """[count] positions of the training split's `clips` clips a method holds out (HeldOut), drawn
    from the run's seed (a key of its own: no epoch's order or sample draw shares it)."""
    return np.random.default_rng([seed, 0, 0, 2]).permutation(clips)[:count]


class ClipLoader:
    """Base of both backends: the probed clips of one split, the epoch's batch plan, and the
    skip bookkeeping.

    A pass is ``for batch in loader`` (or ``loader.batches(start=k)``, which begins at batch k of
    the epoch, as a resumed run does); every pass starts from a clean state, also after an
    interrupted one. ``loader.epoch`` picks the order (training: a permutation drawn from
    (seed, epoch)); a completed pass moves it on. ``loader.position`` counts the batches of the
    plan consumed so far in the current pass (a batch whose every clip failed is consumed but
    not yielded).

    Copies (``set_copies``, training): a method that re-samples the training set (Shapley-based
    re-sampling) gives per clip and modality a number of extra copies for the coming epochs, each
    keeping only that modality. The copies join the plan after the clips (positions N, N+1, ...
    of ``clips``, each the same probed clip), the epoch's permutation runs over all of them, each
    copy draws its own random choices (its position keys its generator), and a batch then carries
    ``keep`` [B, M] (bool: the modalities each sample keeps) with ``index`` the clip's position.

    Held out (``set_held_out``, training): clips a method keeps out of training (LFM's held-out
    batch) leave every pass's plan, with their copies; the others keep their positions (and so
    their draws), and the permutation runs over what is left. ``decode`` reads chosen clips
    through the training transforms as one batch, outside the passes.

    Skips: ``skipped_at_build`` holds this split's clips left out when the list was read and
    probed (logged once, when the loader is built); ``skipped`` the clips that failed to decode
    during the current pass; ``last_epoch_skipped`` those of the last completed pass (logged at
    its end).
    """

    def __init__(self, cfg: DataConfig, index: DatasetIndex, split: str, train: bool):
        self.cfg, self.index, self.split, self.train = cfg, index, split, train
        self.skipped_at_build = index.skipped_in(split)
        self.clips = probe(index, index.split(split), cfg, self.skipped_at_build)
        self.base_clips = list(self.clips)  # (clips: these, then the copies set_copies adds)
        self.copy_source: np.ndarray | None = None  # [len(clips)] clip position of every plan item
        self.copy_keep: np.ndarray | None = None  # [len(clips), M] the modalities each item keeps
        self.held_out: np.ndarray | None = None  # base clip positions left out of every pass (set_held_out)
        self._fixed_order: np.ndarray | None = None  # (decode: the clips of its one-off pass)
        self._items: np.ndarray | None = None  # (_plan_items, kept)
        if not self.clips:
            raise DataError(index.root, f"split {split!r} has no usable clips ({self.skipped_at_build.summary()})")
        if self.skipped_at_build.total:
            log.warning("%s split %r: %s", index.name, split, self.skipped_at_build.summary())
        self.skipped = SkipReport()
        self.last_epoch_skipped = SkipReport()
        self.epoch = 0
        self.position = 0
        self._pass = 0  # passes started: the generator of an older pass refuses to go on
        self.rank, self.world_size = 0, 1  # set_shard: this process's share of each batch

    def set_copies(self, counts, index=None) -> None:
        """Extra copies of the training clips from the next pass on: counts [K, M] (non-negative
        integers, M = the loader's modalities in order) for the clips at positions `index` [K]
        (None: every clip, K = N, in order): counts[k, m] copies of clip index[k] keeping only
        modality m. counts None: the clips alone (the plan as without copies)."""
        N, M = len(self.base_clips), len(self.modalities)
        self._items = None
        if counts is None:
            self.clips, self.copy_source, self.copy_keep = list(self.base_clips), None, None
            return
        if not self.train:
            raise ValueError(f"{self.split!r} loader: copies are for a training loader")
        given = np.asarray(counts)
        rows = np.arange(N) if index is None else np.asarray(index)
        if given.ndim != 2 or given.shape != (len(rows), M) or not np.issubdtype(given.dtype, np.integer) \
                or (given < 0).any():
            raise ValueError(f"{self.split!r} loader: copies must be non-negative integers [clips={len(rows)}, "
                             f"modalities={M}], got {given.dtype} {given.shape}")
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or ((rows < 0) | (rows >= N)).any() \
                or len(np.unique(rows)) != len(rows):
            raise ValueError(f"{self.split!r} loader: copies name clip positions outside [0, {N}) or twice")
        table = np.zeros((N, M), dtype=np.int64)
        table[rows] = given
        clip_of, modality_of = np.nonzero(table)  # (clip-major: clip 0's copies first)
        repeats = table[clip_of, modality_of]
        source = np.concatenate([np.arange(N), np.repeat(clip_of, repeats)])
        keep = np.ones((len(source), M), dtype=bool)
        keep[N:] = np.eye(M, dtype=bool)[np.repeat(modality_of, repeats)]
        self.clips = [self.base_clips[i] for i in source]
        self.copy_source, self.copy_keep = source, keep

    def set_held_out(self, positions) -> None:
        """Leave the clips at `positions` (of the split's clips, before copies) out of every pass
        from the next one on, with any copies of them; None: every clip trains. The other plan
        items keep their positions and draws."""
        self._items = None
        if positions is None:
            self.held_out = None
            return
        if not self.train:
            raise ValueError(f"{self.split!r} loader: holding clips out is for a training loader")
        N = len(self.base_clips)
        rows = np.asarray(positions)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or ((rows < 0) | (rows >= N)).any() \
                or len(np.unique(rows)) != len(rows):
            raise ValueError(f"{self.split!r} loader: held-out clips must be distinct positions in [0, {N}), got "
                             f"{positions!r}")
        if len(rows) >= N:
            raise ValueError(f"{self.split!r} loader: holding out {len(rows)} of its {N} clips leaves none to train on")
        self.held_out = np.sort(rows)

    def _plan_items(self) -> np.ndarray:
        """The positions in ``clips`` a pass covers, in position order (kept until set_copies or
        set_held_out changes them: len(loader) asks every step of some runs)."""
        if self._fixed_order is not None:
            return self._fixed_order
        if self._items is None:
            items = np.arange(len(self.clips))
            if self.held_out is not None:
                source = items if self.copy_source is None else self.copy_source
                items = items[~np.isin(source, self.held_out)]
            self._items = items
        return self._items

    def decode(self, positions, epoch: int) -> dict:
        """The clips at `positions` (of ``clips``), in that order, as one batch through this
        loader's transforms with the draws of `epoch`, on this process alone (no shard). Call it
        between passes (it is a pass of its own: an unfinished pass's iterator goes stale); the
        loader's epoch, position, skip counts and shard are left as they were. A clip that fails
        to decode is an error (on_error skip: it is left out, and none left is an error)."""
        rows = np.asarray(positions)
        if rows.ndim != 1 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer) \
                or ((rows < 0) | (rows >= len(self.clips))).any():
            raise ValueError(f"{self.split!r} loader: decode needs clip positions in [0, {len(self.clips)}), got "
                             f"{positions!r}")
        saved = (self.epoch, self.position, self.skipped, self.last_epoch_skipped, self.rank, self.world_size)
        self._fixed_order, self.epoch, self.rank, self.world_size = rows, epoch, 0, 1
        try:
            parts = list(self.batches())
        finally:
            self._fixed_order = None
            self.epoch, self.position, self.skipped, self.last_epoch_skipped, self.rank, self.world_size = saved
        parts = [p for p in parts if p]
        if not parts:
            raise DataError(self.index.root, f"split {self.split!r}: none of the clips {rows.tolist()} decoded")
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def mark_copies(self, batch: dict) -> dict:
        """A decoded batch of the plan with copies: ``keep`` [B, M] added, ``index`` back to the
        clips' positions (unchanged without copies)."""
        if self.copy_source is not None and "index" in batch:
            index = batch["index"]
            items = index.cpu().numpy()
            batch["keep"] = torch.from_numpy(self.copy_keep[items]).to(index.device)
            batch["index"] = torch.from_numpy(self.copy_source[items]).to(index.device)
        return batch

    def set_shard(self, rank: int, world_size: int) -> None:
        """Decode only rank's contiguous shard of every batch of the plan (a distributed run: the
        plan, and so the global batches, are the same on every rank; mmfast.distributed).
        Training: a batch with fewer clips than ranks is left out on every rank, so that none
        trains on an empty shard. Evaluation (train=False) keeps every clip: a rank whose shard
        of the last batch is empty skips that batch."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"{self.split!r} loader: shard needs 0 <= rank < world_size, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        if self.cfg.batch_size < world_size:
            raise ValueError(f"data.batch_size={self.cfg.batch_size} is the global batch: it must be at least the "
                             f"world size {world_size} (every rank needs samples)")
        self.rank, self.world_size = rank, world_size

    def batch_shard(self, b: int) -> tuple[int, int]:
        """(start, total) of plan batch b: this rank's first clip in it and the batch's size."""
        total = min(self.cfg.batch_size, len(self._plan_items()) - b * self.cfg.batch_size)
        return shard_bounds(total, self.rank, self.world_size)[0], total

    @property
    def modalities(self):
        return self.index.kinds

    def _plan_length(self) -> int:
        """Batches in the epoch's plan (the same on every rank)."""
        n, size = len(self._plan_items()), self.cfg.batch_size
        batches = -(-n // size)
        if self.train and self.world_size > 1 and 0 < n - (batches - 1) * size < self.world_size:
            batches -= 1  # a last batch with fewer clips than ranks is left out (set_shard)
        return batches

    def __len__(self) -> int:
        """Batches this rank's pass goes through."""
        batches = self._plan_length()
        if not self.train and self.world_size > 1:
            last = len(self._plan_items()) - (batches - 1) * self.cfg.batch_size
            if self.rank >= last:  # its shard of the last batch is empty
                batches -= 1
        return batches

    def __iter__(self):
        return self.batches()

    def batches(self, start: int = 0):
        """A pass over the current epoch from batch `start` on (a generator of batch dicts)."""
        raise NotImplementedError

    def order(self, epoch: int) -> np.ndarray:
        items = self._plan_items()
        if not self.train or self._fixed_order is not None:
            return items
        return items[np.random.default_rng([self.cfg.seed, epoch]).permutation(len(items))]

    def plan(self, start: int) -> list:
        """The current epoch's batches from batch `start` on, as arrays of clip positions; batch
        boundaries do not depend on `start`."""
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self._plan_length():
            raise ValueError(f"start must be a batch number in [0, {self._plan_length()}], got {start!r}")
        order, size = self.order(self.epoch), self.cfg.batch_size
        batches = [order[b * size:(b + 1) * size] for b in range(start, self._plan_length())]
        if self.world_size == 1:
            return batches
        shards = []
        for ids in batches:
            lo, hi = shard_bounds(len(ids), self.rank, self.world_size)
            shards.append(ids[lo:hi])
        return [ids for ids in shards if len(ids)]  # (empty: only an evaluation's last batch)

    def _begin_pass(self, start: int) -> tuple:
        """(the plan from batch `start`, this pass's number); resets the pass's bookkeeping."""
        plan = self.plan(start)
        self._pass += 1
        self.skipped = SkipReport()
        self.position = start
        return plan, self._pass

    def _check_current(self, this_pass: int) -> None:
        if this_pass != self._pass:
            raise RuntimeError(f"{self.split!r} loader: a newer pass has started; this iterator is stale")

    def sample_rng(self, epoch: int, position: int) -> np.random.Generator:
        return sample_rng(self.cfg.seed, epoch, position)

    def _faults(self, errors: list) -> None:
        """Clips that failed to decode during the pass: raise the first (on_error="raise") or
        count them all (on_error="skip"). The list is emptied as it goes and the raised error is
        no local of any frame of its own traceback: such a reference cycle would leave the loader
        to the garbage collector, which stops the naive loader's workers only after timeouts."""
        while errors:
            err = errors.pop(0)
            if self.cfg.on_error != "raise":
                self.skipped.add(err)
                continue
            try:
                raise err
            finally:
                del err

    def end_epoch(self) -> None:
        if self.skipped.total:
            log.warning("%s split %r, epoch %d: %s", self.index.name, self.split, self.epoch, self.skipped.summary())
        self.last_epoch_skipped = self.skipped
        self.skipped = SkipReport()
        self.epoch += 1

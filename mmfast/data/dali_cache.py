"""The DALI loader's side of the decoded-sample cache (the store is cache.py).

With a cache, the training pipeline's source holds decoded clips instead of files, and the
pipeline applies only what is random per sample (window, frame choice, crop, flip) and the
transforms after it. What an entry holds, per modality of a clip:

    audio, fixed window (the recipe's offset is not random for this split, or the window is the
            whole looped clip: CREMA-D, Kinetics-Sounds)      the features (STFT recipes)
    audio, random window (VGGSound's 5 s of 10 s in training; fbank recipes)
                                                               the waveform at the recipe's rate
    video / frames, training                                  every frame, uint8 [N, H, W, 3]
    video / frames, evaluation                                the frames at the fixed indices
    features                                                  none: the source reads the .npy
                                                              file every epoch, as without a cache

Entries are decoded by small DALI pipelines built from the training pipeline's own operators
(DaliLoader.wave_node, features_node, frames_node), so a cached clip is the same, bit for bit,
as one decoded in the training pipeline: the random choices come from the same per-clip
generator (DaliLoader.draw) and go through the same transforms. A clip without an entry (the
first epoch, one over the budget, a damaged entry) is decoded for its batch, and written when
the budget allows. A training clip whose every frame cannot be decoded (a video shorter than its
header says, a damaged frame file that is not chosen) is decoded as without a cache, with only
its chosen frames, every epoch: it fails exactly when the uncached loader fails.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .cache import CacheStore, entry_key, source_signature
from .dali_loader import dali_device_id
from .errors import DataError, detached


class _Failure(Exception):
    """A pipeline's failure on one clip, kept as its message (not the exception, whose traceback
    would hold the frames that hold the loader)."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))


@dataclass
class _Entry:
    key: str | None  # None: not cacheable now (a source cannot be read, or frames that do not all decode)
    sources: list | None
    indices: list | None  # frames the entry holds (video/frames)
    rows: list | None  # the entry's rows the sample takes (training frames), None: all


class CachedSource:
    """Reads entries for the DALI loader's source and decodes the clips that have none."""

    def __init__(self, loader, cache_dir):
        self._loader = weakref.ref(loader)  # (the loader holds this; a cycle would wait for the GC)
        self.store = CacheStore(cache_dir, loader.cfg.cache_max_gb)
        # (features modalities are stored decoded already: they have no entries)
        self.contents = {m: self._contents(loader, m, kind) for m, kind in loader.modalities.items()
                         if kind != "features"}
        self.uncacheable: set = set()  # (clip, modality) whose entry cannot be decoded whole
        self._pipes: dict = {}
        self._keys: dict = {}  # (clip, modality) -> (sources, key) last computed
        # Modalities whose entries are the sample itself (fixed-window audio features) skip the
        # pipeline: read into the batch directly (attach), which saves DALI's copies of them.
        self.bypass = [m for m, c in self.contents.items() if c["what"] == "audio-features"]
        self.side: dict = {}  # clip -> {bypassed modality: its array}, until its batch is out
        self.decoded = 0  # modality-clips decoded by this source (the rest were read)
        self._lock = threading.Lock()
        self._ahead = None
        # A thread prepares the next pieces where the step runs on a GPU (the host's cores are
        # free); on a CPU device the step uses every core, and a thread beside it (and its
        # decoding pipelines' threads) only competed for them: on 2 cores the first epoch took
        # 2.2-2.4 s with it against 1.8-2.0 s without (docs/data.md).
        self.prepare_ahead = loader.device == "cuda"
        weakref.finalize(loader, CachedSource.stop, self)  # (a loader dropped mid-pass stops the thread)

    @property
    def loader(self):
        return self._loader()

    # -- what the source feeds ----------------------------------------------------------------
    def fields(self) -> list:
        loader, fields = self.loader, []
        for m, kind in loader.modalities.items():
            if kind == "features":
                fields += [(m, "values"), (m, "mask")]
                continue
            if kind == "audio":
                fields += [] if m in self.bypass else [(m, "wave"), (m, "start")]
                continue
            fields += [(m, "frames")]
            if loader.train:
                fields += [(m, "roi_start"), (m, "roi_end"), (m, "mirror")]
        return fields + [("label", ""), ("index", "")]

    @staticmethod
    def _contents(loader, m, kind) -> dict:
        """What modality m's entries hold, and everything their bytes depend on besides the sources."""
        import nvidia.dali

        base = {"dali": nvidia.dali.__version__}
        if kind == "audio":
            recipe = loader.cfg.audio
            decode = {"via": "dali", "lowpass": None}
            if m in loader.pcm_modalities:
                import soundfile

                decode["via"] = f"soundfile {soundfile.__libsndfile_version__}"
            if m in loader.lowpass:
                kernels = loader.lowpass[m]
                decode["lowpass"] = hashlib.sha256(b"".join(kernels[r].tobytes() for r in sorted(kernels))).hexdigest()
            mode = recipe.train_offset if loader.train else recipe.eval_offset
            if recipe.features == "stft" and (mode != "random" or recipe.loop_samples == recipe.window_samples):
                return {**base, **decode, "what": "audio-features", "recipe": asdict(recipe),
                        "start": _fixed_start(recipe, mode), "device": loader.device}
            return {**base, **decode, "what": "audio-wave", "sample_rate": recipe.sample_rate}
        decoder = f"dali-{kind}-{loader.device}"
        if m in loader.pyav_modalities:
            import av

            decoder = f"pyav {av.__version__}"
        return {**base, "what": "frames", "decoder": decoder}

    def entry(self, i: int, m, kind: str, draw: dict) -> _Entry:
        loader = self.loader
        clip = loader.clips[i]
        if kind == "audio":
            indices = rows = None
            paths = [clip.files[m]]
            contents = dict(self.contents[m], rate=clip.audio_rates[m])
        else:
            indices = list(range(clip.num_frames[m])) if loader.train else list(draw["idx"])
            rows = list(draw["idx"]) if loader.train else None
            paths = [clip.frame_files[m][j] for j in indices] if kind == "frames" else [clip.files[m]]
            contents = dict(self.contents[m], indices=["all", len(indices)] if loader.train else indices)
        sources = None if (i, m) in self.uncacheable else source_signature(paths)
        if not sources:
            return _Entry(None, None, indices, rows)
        known = self._keys.get((i, m))  # (the sources are stat'ed every time; the hash only on a change)
        if known is None or known[0] != sources:
            known = self._keys[i, m] = (sources, entry_key(contents, sources))
        return _Entry(known[1], sources, indices, rows)

    # -- a pass ---------------------------------------------------------------------------------
    def start_pass(self, pieces: list, epoch: int) -> None:
        """The pass's pieces, in the order the source will ask for them: with `prepare_ahead`, a
        thread prepares them (reads entries, decodes and writes the missing ones) while the step
        computes."""
        self.stop()
        self.side.clear()
        if self.prepare_ahead:
            self._ahead = _Ahead(self, pieces, epoch)

    def stop(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.cancel()

    def encode_piece(self, clips: list, epoch: int) -> list:
        """The source outputs of each clip (or its DataError): entries read, the rest decoded."""
        ahead = self._ahead
        if ahead is not None and ahead.epoch == epoch:
            prepared = ahead.take(clips)
            if prepared is not None:
                return prepared
        return self.prepare(clips, epoch)  # (a piece not planned: a failed batch's retry)

    def prepare(self, clips: list, epoch: int) -> list:
        with self._lock:  # (the decoding pipelines serve one caller at a time)
            return self._prepare(clips, epoch)

    def _prepare(self, clips: list, epoch: int) -> list:
        loader = self.loader
        draws = {i: loader.draw(i, epoch) for i in clips}
        # The bypassed modalities are read straight into one batch array per modality.
        batches = {m: np.empty((len(clips),) + loader.cfg.audio.shape, np.float32) for m in self.bypass}
        rows = {(i, m): batch[k] for m, batch in batches.items() for k, i in enumerate(clips)}
        arrays, errors = self.arrays(clips, draws, epoch, out=rows)
        features = {}  # clip -> the source's fields of its features modalities (read every epoch)
        for i in clips:
            if i in errors:
                continue
            try:
                features[i] = {f: v for m, kind in loader.modalities.items() if kind == "features"
                               for f, v in loader.feature_fields(loader.clips[i], m, draws[i][m]).items()}
            except DataError as err:
                errors.setdefault(i, detached(err))
        out = []
        for k, i in enumerate(clips):
            if i in errors:
                out.append(errors[i])
                continue
            fields = dict(features[i])
            for m, kind in loader.modalities.items():
                d = draws[i][m]
                if kind == "features":
                    continue
                if kind == "audio":
                    if m in self.bypass:
                        self.side.setdefault(i, {})[m] = (batches[m], k)
                    else:
                        fields[m, "wave"] = arrays[i, m]
                        fields[m, "start"] = np.array([d["start"]], dtype=np.int32)
                    continue
                fields[m, "frames"] = arrays[i, m]
                if loader.train:
                    loader.crop_fields(fields, m, d)
            fields["label", ""] = np.array(loader.clips[i].label, dtype=np.int64)
            fields["index", ""] = np.array(i, dtype=np.int64)
            out.append([fields[f] for f in loader.fields])
        return out

    def attach(self, part: dict) -> None:
        """Adds the bypassed modalities to a batch the pipeline returned (its clips: "index")."""
        if not self.bypass:
            return
        clips = part["index"].tolist()
        device = self.loader.device
        for m in self.bypass:
            rows = [self.side[i].pop(m) for i in clips]
            batch = rows[0][0]
            if not (all(b is batch for b, _ in rows) and [k for _, k in rows] == list(range(len(batch)))):
                batch = np.stack([b[k] for b, k in rows])  # (a piece with clips left out, or a retry)
            part[m] = torch.from_numpy(batch).to(device)
        for i in clips:
            if not self.side.get(i):
                self.side.pop(i, None)

    def arrays(self, clips: list, draws: dict, epoch: int, *, need=True, out=None) -> tuple[dict, dict]:
        """({(clip, modality): the decoded array the sample takes}, {clip: DataError}). `need`
        False (filling the cache): entries present are not read. `out`: {(clip, modality): an
        array to fill}, for entries taken whole."""
        loader = self.loader
        arrays, errors, todo, out = {}, {}, {}, out or {}
        for i in clips:
            for m, kind in loader.modalities.items():
                if m not in self.contents:  # (features: no entries)
                    continue
                e = self.entry(i, m, kind, draws[i][m])
                if e.key is not None:
                    if not need and self.store.has(e.key):
                        continue
                    found = self.store.read(e.key, e.rows, out=out.get((i, m))) if need else None
                    if found is not None:
                        arrays[i, m] = found
                        continue
                todo.setdefault(m, []).append((i, e))
        for m, items in todo.items():
            kind = loader.modalities[m]
            # A clip the cache will not hold (no key; the budget spent) decodes what an uncached
            # one does: its chosen frames, not every frame.
            write = [e.key is not None and not self.store.full for _, e in items]
            units = [(i, e.indices if w or e.rows is None else e.rows) for (i, e), w in zip(items, write)]
            # (DALI's decoding pipelines hand back views of their buffers: written, then copied)
            results = self._decode(m, kind, units)
            self.store.write_many([(e.key, r) for (i, e), r, w in zip(items, results, write)
                                   if w and not isinstance(r, BaseException)])
            for (i, e), result, w in zip(items, results, write):
                if not isinstance(result, BaseException):
                    if (i, m) in out:
                        arrays[i, m] = out[i, m]
                        np.copyto(out[i, m], result)
                    else:
                        arrays[i, m] = result[e.rows] if w and e.rows is not None else np.array(result)
                    continue
                if w and e.rows is not None:
                    # Not every frame decodes: the chosen ones, as without a cache (every epoch).
                    retry = self._decode(m, kind, [(i, e.rows)])[0]
                    if not isinstance(retry, BaseException):
                        self.uncacheable.add((i, m))
                        arrays[i, m] = np.array(retry)
                        continue
                    result = retry
                errors.setdefault(i, result if isinstance(result, DataError) else loader._clip_error(i, result, epoch))
        return arrays, errors

    def fill(self, progress=None) -> dict:
        """Writes every missing entry of the loader's clips (`mmfast data cache`); returns counts.
        `progress(n)` is called after each batch of n clips."""
        loader = self.loader
        size, failed = loader.cfg.batch_size, {}
        for start in range(0, len(loader.clips), size):
            clips = list(range(start, min(start + size, len(loader.clips))))
            with self._lock:
                _, errors = self.arrays(clips, {i: loader.draw(i, 0) for i in clips}, 0, need=False)
            failed.update({loader.clips[i].clip_id: str(err) for i, err in errors.items()})
            if progress is not None:
                progress(len(clips))
        return {"clips": len(loader.clips), "written": self.store.written, "failed": failed}

    def keys(self) -> set:
        """The keys of every entry the loader's clips have (what `mmfast data cache --prune` keeps)."""
        loader, out = self.loader, set()
        for i in range(len(loader.clips)):
            draws = loader.draw(i, 0)
            for m, kind in loader.modalities.items():
                if m not in self.contents:  # (features: no entries)
                    continue
                key = self.entry(i, m, kind, draws[m]).key
                if key is not None:
                    out.add(key)
        return out

    # -- decoding -------------------------------------------------------------------------------
    def _decode(self, m, kind: str, units: list) -> list:
        """The decoded array of each unit (clip, frame indices), or the exception it raised."""
        from .video import decode_video_frames

        loader = self.loader
        self.decoded += len(units)
        if kind == "video" and m in loader.pyav_modalities:
            out = []
            for i, indices in units:
                try:
                    out.append(decode_video_frames(loader.clips[i].files[m], indices))
                except DataError as err:
                    out.append(detached(err))
            return out
        if kind == "frames":  # one sample per frame file, stacked per clip afterwards
            flat = [(i, loader.clips[i].frame_files[m][j]) for i, indices in units for j in indices]
            images = self._run(("frames", m), kind, m, [_files(jpeg=path) for _, path in flat])
            out, k = [], 0
            for i, indices in units:
                mine = images[k:k + len(indices)]
                k += len(indices)
                bad = next((x for x in mine if isinstance(x, BaseException)), None)
                out.append(bad if bad is not None else np.stack(mine))
            return out
        feeds = []
        for i, indices in units:
            clip = loader.clips[i]
            if kind == "audio":
                feeds.append(_audio_feeds(loader, m, clip))
            else:
                feeds.append(_files(bytes=clip.files[m], frames=np.asarray(indices, dtype=np.int32)))
        return self._run((kind, m), kind, m, feeds)

    def _run(self, name, kind, m, feeds: list) -> list:
        """Runs the decoding pipeline `name` on the feeds (dicts of input arrays, or the DataError
        of a file that could not be read) in batches; a batch that fails is run again feed by
        feed, so only the broken one fails."""
        out = [None] * len(feeds)
        good = [k for k, f in enumerate(feeds) if not isinstance(f, BaseException)]
        for k, f in enumerate(feeds):
            if isinstance(f, BaseException):
                out[k] = f
        size = self.loader.cfg.batch_size
        views = len(good) <= size  # (one run: its views stay valid until the pipeline runs again)
        for start in range(0, len(good), size):
            chunk = good[start:start + size]
            try:
                for k, array in zip(chunk, self._run_batch(name, kind, m, [feeds[k] for k in chunk], copy=not views)):
                    out[k] = array
            except Exception:
                self._pipes.pop(name, None)  # (DALI may leave a pipeline invalid after an error)
                for k in chunk:
                    try:
                        out[k] = self._run_batch(name, kind, m, [feeds[k]], copy=True)[0]
                    except Exception as exc:  # (kept without its traceback, which holds this frame)
                        self._pipes.pop(name, None)
                        out[k] = _Failure(exc)
        return out

    def _run_batch(self, name, kind, m, feeds: list, copy: bool) -> list:
        """The pipeline's outputs for the feeds: copies, or views of its buffers (valid until it
        runs again)."""
        pipe = self._pipes.get(name)
        if pipe is None:
            pipe = self._pipes[name] = self._define(kind, m, sorted(feeds[0]))
            pipe.build()
        for input_name in sorted(feeds[0]):
            pipe.feed_input(input_name, [f[input_name] for f in feeds])
        (batch,) = pipe.run()
        if type(batch).__name__ == "TensorListGPU":
            batch = batch.as_cpu()
        return [(np.array if copy else np.asarray)(batch[k]) for k in range(len(feeds))]

    def _define(self, kind: str, m, inputs: list, gpu: bool | None = None):
        """A decoding pipeline: the training pipeline's decoding operators, fed by name (defined,
        not built: tests check the GPU graphs on CPU-only machines)."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        loader, cfg = self.loader, self.loader.cfg
        gpu = loader.device == "cuda" if gpu is None else gpu

        @pipeline_def
        def pipeline():
            s = {name: fn.external_source(name=name) for name in inputs}
            if kind == "audio":
                wave = loader.wave_node(s, m)
                if self.contents[m]["what"] == "audio-features":
                    return loader.features_node(wave, s["start"], m, gpu)
                return wave
            if kind == "frames":
                return fn.decoders.image(s["jpeg"], device="mixed" if gpu else "cpu", output_type=types.RGB)
            return loader.frames_node(s, m, kind, gpu)

        return pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                        device_id=dali_device_id(gpu), seed=cfg.seed, prefetch_queue_depth=1)


class _Ahead:
    """Prepares a pass's pieces in a thread, at most `depth` ahead of the source."""

    def __init__(self, source: CachedSource, pieces: list, epoch: int, depth: int = 3):
        self.source, self.epoch, self.depth = source, epoch, depth
        self.pending = deque(tuple(p) for p in pieces)
        self.results: dict = {}
        self.current = None
        self.unread = 0  # prepared, not yet taken
        self.cancelled = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._work, name="mmfast-cache-ahead", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.cancelled and self.pending and self.unread >= self.depth:
                    self.cond.wait()
                if self.cancelled or not self.pending:
                    return
                self.current = clips = self.pending.popleft()
            try:
                result = self.source.prepare(list(clips), self.epoch)
            except BaseException as exc:  # (re-raised where the source takes it)
                result = exc
            with self.cond:
                self.results[clips] = result
                self.current = None
                self.unread += 1
                self.cond.notify_all()

    def take(self, clips: list):
        """The piece's prepared outputs (waiting for them), or None when it is not planned."""
        key = tuple(clips)
        with self.cond:
            if key not in self.results and key != self.current and key not in self.pending:
                return None
            while key not in self.results and not self.cancelled:
                self.cond.wait()
            if key not in self.results:
                return None
            result = self.results.pop(key)
            self.unread -= 1
            self.cond.notify_all()
        if isinstance(result, BaseException):
            raise result
        return result

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()


def _files(**fields) -> dict:
    """Input arrays for a decoding pipeline: the fields "jpeg" and "bytes" name files, read as
    bytes. The DataError of a file that cannot be read is returned in place of the dict."""
    from .dali_loader import _read_bytes

    try:
        return {k: _read_bytes(v) if k in ("jpeg", "bytes") else v for k, v in fields.items()}
    except DataError as err:
        return detached(err)


def _audio_feeds(loader, m, clip):
    """The audio decoding pipeline's inputs for a clip (DaliLoader.audio_source, and the fixed
    window's start where the entry is the spectrogram), or the DataError of its file."""
    try:
        feeds = loader.audio_source(clip, m)
    except DataError as err:
        return detached(err)
    contents = loader.cached.contents[m]
    if contents["what"] == "audio-features":
        feeds["start"] = np.array([contents["start"]], dtype=np.int32)
    return feeds


def _fixed_start(recipe, mode: str) -> int:
    """The window's start where it is fixed (a "random" offset is fixed only where the window is
    the whole looped clip, so every fraction gives 0)."""
    return recipe.window_start({"center": 0.5}.get(mode, 0.0))


def build_cache(cfg, splits=None, *, progress: bool = True, prune: bool = False) -> dict:
    """Writes every missing entry of the dataset `cfg` (a DataConfig with a cache) describes,
    split by split (training splits hold every frame, evaluation splits their fixed frames), on
    cfg.num_workers threads; with `prune`, removes the folder's entries no split of it has.
    Returns {split: {clips, written, failed}, "cache": {entries, bytes, removed}}."""
    from .cache import resolve_cache_dir
    from .layouts import read_layout
    from .loader import build_loader

    if resolve_cache_dir(cfg.cache) is None:
        raise ValueError("data.cache is off: set data.cache=auto or a folder to build a cache")
    index = read_layout(cfg.root, cfg.layout, modalities=cfg.modalities, on_error=cfg.on_error,
                        allow_overlap=cfg.allow_overlap)
    splits = list(splits or index.splits)
    unknown = sorted(set(splits) - set(index.splits))
    if unknown:
        raise ValueError(f"no split {unknown} in {cfg.root} (its splits: {sorted(index.splits)})")
    # (pruning keeps the entries of every split, also those not decoded now)
    loaders = {split: build_loader(cfg, split, "dali") for split in (index.splits if prune else splits)}
    if any(ld.cached is None for ld in loaders.values()):
        raise ValueError(f"data.cache={cfg.cache!r}: the cache folder cannot be used (see the warning above)")
    total = sum(len(loaders[split].clips) for split in splits)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="clip", desc="decoding into the cache")
    report, keep = {}, set()
    try:
        for split in splits:
            report[split] = loaders[split].cached.fill(bar.update if bar is not None else None)
        if prune:
            for loader in loaders.values():
                keep |= loader.cached.keys()
    finally:
        if bar is not None:
            bar.close()
    store = next(iter(loaders.values())).cached.store
    removed = store.prune(keep) if prune else 0
    report["cache"] = {**store.usage(), "removed": removed, "folder": str(store.root)}
    return report

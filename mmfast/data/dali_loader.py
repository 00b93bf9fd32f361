"""The DALI loader: files are read in Python (bytes only) and everything else runs in a DALI
pipeline, on the CPU or, with device="cuda", on the GPU where DALI has GPU operators.

    audio   decoders.audio (downmix; formats DALI cannot read, such as MP3: soundfile in the source)
            -> when a file is not at the recipe's rate: anti-aliasing low-pass (filter, a
            Kaiser-windowed sinc per source rate) and audio_resample (DALI's resampler alone
            does not low-pass when it downsamples: a 10 kHz tone at 48 kHz came out as a
            full-amplitude 6 kHz tone at 16 kHz) -> loop (cat) -> window (slice) -> clip ->
            spectrogram (periodic Hann, centred, pad mode of the recipe) -> log(|X| + eps);
            the Kaldi fbank recipe takes the window out of the pipeline and computes the filter
            bank with batched torch ops on the same device (DALI's spectrogram has no per-frame
            DC removal, which Kaldi's definition needs)
    video   decoders.video at the chosen frame indices (CPU: VP8/VP9/MJPEG; GPU "mixed": also
            H.264/HEVC/AV1/MPEG-4) -> resize (training: of the crop box) -> crop_mirror_normalize.
            On the CPU, a video modality holding any other codec is decoded with PyAV in the
            source instead (the chosen frames only) and fed to the same transforms
    frames  decoders.image per frame -> stack -> the same transforms
    features  nothing to decode: the source reads the .npy file with NumPy, cuts or pads it to
            the recipe's length (features.feature_sample, as the naive loader does) and feeds
            the values and the padding mask, which the pipeline passes through (to the GPU with
            device="cuda"); the decoded-sample cache does not apply to them

Every per-sample choice (window start, frame indices, training crop box and flip) is drawn in
Python from the same (seed, epoch, clip) generator as the naive loader, in the same order, so
both loaders pick the same samples, and the pipeline holds no random state: rebuilding it (after
a fault, an interrupted pass, a resume) changes nothing.

Faults: the source feeds the plan's batches as pieces and remembers which are in flight, so a
DALI failure is pinned on its batch; that batch is then decoded again clip by clip on a rebuilt
pipeline, which names the broken clip (on_error="raise") or leaves it out and counts it
(on_error="skip") while the rest of the batch and the epoch go on. Batches are yielded in plan
order either way.
"""
from __future__ import annotations

import math
import re
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .audio import DALI_AUDIO_FORMATS, antialias_kernel, kaldi_fbank_features
from .base import ClipLoader, log
from .errors import DataError, detached
from .features import feature_sample, mask_key
from .transforms import random_resized_crop_box
from .video import decode_video_frames, segment_indices

_CPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg")
_INTEGER_PCM = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32")  # soundfile's names
_DECODER_KINDS = {"decoders.audio": "audio", "decoders.video": "video", "decoders.image": "frames"}


@dataclass
class _Piece:
    """Clips fed to the pipeline as one batch; `group` is the plan batch they belong to (a batch
    that failed comes back as single-clip pieces of the same group)."""

    group: int
    clips: list


class _Feeder:
    """The pipeline's external source: feeds the pass's pieces in order and keeps what is in
    flight (DALI returns, or fails, batches in the order they were fed).

    It refers to its loader weakly: the loader holds the pipeline, which holds the feeder, and
    that cycle would leave a dropped loader's pipeline and buffers to the garbage collector."""

    def __init__(self, loader: "DaliLoader"):
        self._loader = weakref.ref(loader)
        self.reset(0, [])

    def reset(self, epoch: int, pieces: list) -> None:
        self.epoch = epoch
        self.plan = deque(pieces)
        self.in_flight: deque = deque()
        self.outstanding = {p.group: 1 for p in pieces}  # group -> pieces not yet resolved
        self.faults: dict = {}  # group -> [DataError] of clips that could not be fed
        self.crashed: BaseException | None = None  # a bug in the source, re-raised by the loop

    def __call__(self):
        loader = self._loader()
        while self.plan:
            piece = self.plan.popleft()
            samples, kept = [], []
            try:
                encoded = loader.encode_piece(piece.clips, self.epoch)
            except BaseException as exc:  # not a data fault: end the pass and re-raise it there
                self.crashed = exc
                raise StopIteration from None
            for i, sample in zip(piece.clips, encoded):
                if isinstance(sample, DataError):
                    sample.clip = loader.clips[i].clip_id
                    self.faults.setdefault(piece.group, []).append(sample)
                else:
                    samples.append(sample)
                    kept.append(i)
            if not kept:  # every clip of the piece failed before decoding
                self.outstanding[piece.group] -= 1
                continue
            self.in_flight.append(_Piece(piece.group, kept))
            return tuple(_batch_field([sample[k] for sample in samples]) for k in range(len(samples[0])))
        raise StopIteration

    def split_failed(self) -> _Piece:
        """The piece DALI failed on goes back to the front of the plan clip by clip (unless it
        is one clip already), followed by the pieces that were in flight behind it."""
        failed = self.in_flight.popleft()
        behind = list(self.in_flight)
        self.in_flight.clear()
        if len(failed.clips) > 1:
            singles = [_Piece(failed.group, [i]) for i in failed.clips]
            self.outstanding[failed.group] += len(singles) - 1
            self.plan.extendleft(reversed(singles + behind))
        else:
            self.outstanding[failed.group] -= 1
            self.plan.extendleft(reversed(behind))
        return failed


def dali_device_id(gpu: bool):
    """The GPU a pipeline runs on: this process's current CUDA device (a distributed run's rank
    sets its own), None for a CPU pipeline. (0 where no GPU is present: tests define GPU graphs.)"""
    if not gpu:
        return None
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _batch_field(arrays: list):
    """One field of a piece as DALI takes it: a single array when every sample's has the same
    shape and type (one copy into DALI, instead of one per sample), else the list."""
    first = arrays[0]
    if all(a.shape == first.shape and a.dtype == first.dtype for a in arrays):
        return np.stack(arrays)
    return arrays


def _read_pcm(path) -> np.ndarray:
    """Mono float32 samples at the file's own rate (soundfile: MP3 and the rest libsndfile reads)."""
    import soundfile as sf

    try:
        wave, _ = sf.read(str(path), dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise DataError(path, "missing file") from None
    except Exception as exc:
        raise DataError(path, f"corrupt audio: {type(exc).__name__}: {exc}") from None
    return wave.mean(axis=1)


def _read_bytes(path) -> np.ndarray:
    try:
        return np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DataError(path, f"missing file: {exc}") from None


def _dali_reason(exc: BaseException) -> tuple:
    """(decoder kind or None, the reason DALI gives) from a pipeline error's message."""
    text = str(exc)
    op = re.search(r"operator `nvidia\.dali\.fn\.([\w.]+)`", text)
    why = re.search(r"encountered:\s*(.*?)\s*(?:Current pipeline object|$)", text, re.S)
    reason = " ".join((why.group(1) if why else text).split())[:300]
    name = op.group(1) if op else None
    return _DECODER_KINDS.get(name), f"{name or 'DALI'}: {reason}"


class DaliLoader(ClipLoader):
    def __init__(self, cfg, index, split, train):
        super().__init__(cfg, index, split, train)
        import nvidia.dali  # noqa: F401  (a clear ImportError here rather than mid-pipeline)

        self.device = cfg.resolved_device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' needs a CUDA GPU; use device='cpu' for CPU-only DALI")
        # Video modalities DALI cannot decode here: CPU DALI reads VP8, VP9 and MJPEG only.
        self.pyav_modalities = set()
        if self.device == "cpu":
            for modality, kind in self.modalities.items():
                if kind == "video" and any(c.codecs[modality] not in _CPU_VIDEO_CODECS for c in self.clips):
                    self.pyav_modalities.add(modality)
                    log.info("%s: codecs other than %s: decoding %r with PyAV, transforms in DALI",
                             index.name, "/".join(_CPU_VIDEO_CODECS), modality)
        # Audio modalities holding a format DALI cannot decode: decoded with soundfile in the source.
        self.pcm_modalities = {m for m, k in self.modalities.items() if k == "audio" and any(
            c.audio_formats[m] not in DALI_AUDIO_FORMATS for c in self.clips)}
        # Audio modalities holding a file not at the recipe's rate: low-pass + resample in DALI,
        # with one kernel per source rate, zero-padded to one length (centred: same delay).
        target = cfg.audio.sample_rate
        self.lowpass = {}
        for m, k in self.modalities.items():
            rates = sorted({c.audio_rates[m] for c in self.clips}) if k == "audio" else []
            if rates and rates != [target]:
                kernels = {r: antialias_kernel(r, target) for r in rates}
                width = max(len(v) for v in kernels.values())
                self.lowpass[m] = {r: np.pad(v, (width - len(v)) // 2)[None, :] for r, v in kernels.items()}
        # Audio modalities whose decoded samples cannot leave [-1, 1]: integer PCM at the recipe's
        # rate (scaled by 2^-(bits-1); a downmix averages). The recipe's clamp to [-clip, clip]
        # then changes nothing and is left out (it costs ~8% of an uncached CPU pass).
        self.within_unit = {m for m, k in self.modalities.items() if k == "audio" and m not in self.lowpass
                            and all(c.audio_subtypes[m] in _INTEGER_PCM for c in self.clips)}
        # The decoded-sample cache (data.cache; dali_cache.py): the pipeline then reads decoded
        # clips (from the cache, or decoded by it for this batch) and applies the random parts.
        from .cache import resolve_cache_dir

        cache_dir = resolve_cache_dir(cfg.cache)
        self.cached = None
        if cache_dir is not None:
            from .dali_cache import CachedSource

            try:
                self.cached = CachedSource(self, cache_dir)
            except ValueError as err:
                if cfg.cache != "auto":
                    raise
                # ("auto" is best effort: a read-only home decodes every epoch, as without a cache)
                log.warning("%s; decoding every epoch without a cache", err)
        self.fields = self.cached.fields() if self.cached is not None else self._source_fields()
        self.outputs = [m for m in self.modalities if self.cached is None or m not in self.cached.bypass]
        # The pipeline's outputs by name: each modality's, and after a features modality its mask.
        self.output_names = [n for m in self.outputs
                             for n in ([m, mask_key(m)] if self.modalities[m] == "features" else [m])]
        self.feeder = _Feeder(self)
        self._dirty = False  # a pass ended early or failed: rebuild before the next one
        self.pipe = self._build()

    def _source_fields(self) -> list:
        """The external source's outputs, (modality, field) in order: audio bytes + window
        start; video bytes + frame indices (or decoded frames, for PyAV-decoded modalities);
        one JPEG per frame; in training the crop box and flip of each visual modality; feature
        values and mask; then the label and the clip's position."""
        fields = []
        for modality, kind in self.modalities.items():
            if kind == "features":
                fields += [(modality, "values"), (modality, "mask")]
                continue
            if kind == "audio":
                fields += [(modality, "pcm"), (modality, "rate")] if modality in self.pcm_modalities else \
                    [(modality, "bytes")]
                fields += [(modality, "start")] + ([(modality, "lowpass")] if modality in self.lowpass else [])
                continue
            if kind == "frames":
                fields += [(modality, f"jpeg{t}") for t in range(self.cfg.frames.num_frames)]
            elif modality in self.pyav_modalities:
                fields += [(modality, "decoded")]
            else:
                fields += [(modality, "bytes"), (modality, "frames")]
            if self.train:
                fields += [(modality, "roi_start"), (modality, "roi_end"), (modality, "mirror")]
        return fields + [("label", ""), ("index", "")]

    def draw(self, i: int, epoch: int) -> dict:
        """modality -> the random choices for clip i (its position in self.clips) in `epoch`:
        audio window start; features window fraction; frame indices, and in training the crop
        box and flip. Drawn from
        its generator in the naive loader's order (transforms.transform_frames)."""
        clip, recipe, frames = self.clips[i], self.cfg.audio, self.cfg.frames
        rng = self.sample_rng(epoch, i)
        out = {}
        for modality, kind in self.modalities.items():
            if kind == "audio":
                out[modality] = {"start": recipe.window_start(recipe.offset_fraction(self.train, rng))}
                continue
            if kind == "features":
                out[modality] = {"u": self.cfg.features.offset_fraction(self.train, rng)}
                continue
            d = {"idx": segment_indices(clip.num_frames[modality], frames.num_frames, self.train, rng)}
            if self.train:
                d["box"] = random_resized_crop_box(*clip.frame_sizes[modality], frames, rng)
                d["flip"] = frames.flip and rng.random() < 0.5
            out[modality] = d
        return out

    def crop_fields(self, out: dict, modality, d: dict) -> None:
        """The training crop box and flip of a visual modality, as the pipeline takes them."""
        left, top, w, h = d["box"]
        out[modality, "roi_start"] = np.array([top, left], dtype=np.float32)  # (y, x), as the layout
        out[modality, "roi_end"] = np.array([top + h, left + w], dtype=np.float32)
        out[modality, "mirror"] = np.array(int(d["flip"]), dtype=np.int32)

    def encode_piece(self, clips: list, epoch: int) -> list:
        """The source outputs of each clip of a piece: a list of fields, or the DataError of a
        clip that could not be read."""
        if self.cached is not None:
            return self.cached.encode_piece(clips, epoch)
        out = []
        for i in clips:
            try:
                out.append(self.encode(i, epoch))
            except DataError as err:
                out.append(detached(err))
        return out

    def encode(self, i: int, epoch: int) -> list:
        """The source outputs of clip i, field by field (files read, nothing decoded)."""
        clip, draws = self.clips[i], self.draw(i, epoch)
        out = {}
        for modality, kind in self.modalities.items():
            d = draws[modality]
            if kind == "features":
                out.update(self.feature_fields(clip, modality, d))
                continue
            if kind == "audio":
                out.update({(modality, name): v for name, v in self.audio_source(clip, modality).items()})
                out[modality, "start"] = np.array([d["start"]], dtype=np.int32)
                continue
            if kind == "frames":
                for t, j in enumerate(d["idx"]):
                    out[modality, f"jpeg{t}"] = _read_bytes(clip.frame_files[modality][j])
            elif modality in self.pyav_modalities:
                out[modality, "decoded"] = decode_video_frames(clip.files[modality], d["idx"])
            else:
                out[modality, "bytes"] = _read_bytes(clip.files[modality])
                out[modality, "frames"] = np.asarray(d["idx"], dtype=np.int32)
            if self.train:
                self.crop_fields(out, modality, d)
        out["label", ""] = np.array(clip.label, dtype=np.int64)
        out["index", ""] = np.array(i, dtype=np.int64)
        return [out[f] for f in self.fields]

    def feature_fields(self, clip, modality, draw: dict) -> dict:
        """The source's values [L, D] and mask [L] of a clip's features (read and cut or padded
        here, as the naive loader does: nothing in them is left to decode)."""
        values, mask = feature_sample(clip.files[modality], clip.feature_dims[modality], self.cfg.features, draw["u"])
        return {(modality, "values"): values, (modality, "mask"): mask}

    def audio_source(self, clip, modality) -> dict:
        """What wave_node takes of a clip's audio file: its bytes (or, for formats DALI cannot
        read, its samples and rate), and the low-pass kernel of its rate where one applies."""
        if modality in self.pcm_modalities:
            out = {"pcm": _read_pcm(clip.files[modality]),
                   "rate": np.array(clip.audio_rates[modality], dtype=np.float32)}
        else:
            out = {"bytes": _read_bytes(clip.files[modality])}
        if modality in self.lowpass:
            out["lowpass"] = self.lowpass[modality][clip.audio_rates[modality]]
        return out

    def _audio_copies(self, modality) -> int:
        """How many copies of the shortest clip cover loop_to seconds (DALI has no wrap-around)."""
        recipe = self.cfg.audio
        shortest = min(c.audio_seconds[modality] for c in self.clips) * recipe.sample_rate
        return max(1, math.ceil(recipe.loop_samples / max(1.0, shortest - 2)))

    def _build(self):
        pipe = self._define(gpu=self.device == "cuda")
        pipe.build()
        return pipe

    def _define(self, gpu: bool):
        """The training pipeline, defined but not built (defining needs no GPU, so tests check
        the GPU graph's operators and arguments on CPU-only machines too). With a cache, its
        source holds decoded clips (CachedSource.fields) instead of files."""
        import nvidia.dali.fn as fn
        from nvidia.dali import pipeline_def

        cfg = self.cfg

        @pipeline_def
        def pipeline():
            nodes = fn.external_source(source=self.feeder, num_outputs=len(self.fields), batch=True, no_copy=False)
            src = {}
            for (modality, name), node in zip(self.fields, nodes):
                src.setdefault(modality, {})[name] = node
            outs = []
            for modality in self.outputs:
                s, kind = src[modality], self.modalities[modality]
                if kind == "features":  # (read and padded in the source: passed through)
                    outs += [s["values"].gpu(), s["mask"].gpu()] if gpu else [s["values"], s["mask"]]
                    continue
                if kind == "audio":
                    wave = s["wave"] if "wave" in s else self.wave_node(s, modality)
                    outs.append(self.features_node(wave, s["start"], modality, gpu))
                else:
                    if self.cached is not None:  # decoded frames [T, H, W, 3]
                        frames = fn.reshape(s["frames"], layout="FHWC")
                        frames = frames.gpu() if gpu else frames
                    else:
                        frames = self.frames_node(s, modality, kind, gpu)
                    outs.append(self.transform_node(frames, s))
            return (*outs, src["label"][""], src["index"][""])

        return pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                        device_id=dali_device_id(gpu), seed=cfg.seed, prefetch_queue_depth=2)

    # The graph's pieces, shared by the training pipeline and the cache's decoding pipelines
    # (dali_cache.py), so that a cached clip goes through the very operators an uncached one does.
    def wave_node(self, s: dict, modality):
        """Mono float32 samples at the recipe's rate from the source's audio fields."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        target = float(self.cfg.audio.sample_rate)
        if modality in self.pcm_modalities:
            wave, rate = s["pcm"], s["rate"]
        elif modality in self.lowpass:
            wave, rate = fn.decoders.audio(s["bytes"], dtype=types.FLOAT, downmix=True)
        else:  # every file at the recipe's rate: nothing to resample
            wave, rate = fn.decoders.audio(s["bytes"], dtype=types.FLOAT, downmix=True, sample_rate=target)
        if modality in self.lowpass:
            image = fn.reshape(wave, shape=[1, -1, 1], layout="HWC")
            wave = fn.reshape(fn.filter(image, s["lowpass"], border="constant"), shape=[-1])
            wave = fn.audio_resample(wave, in_rate=rate, out_rate=target, dtype=types.FLOAT)
        return wave

    def features_node(self, wave, start, modality, gpu: bool):
        """Loop, window from `start`, clip, then the log-magnitude spectrogram (fbank: the window;
        its features are computed on the batch after the pipeline)."""
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath

        recipe = self.cfg.audio
        copies = self._audio_copies(modality)
        looped = fn.cat(*([wave] * copies), axis=0) if copies > 1 else wave
        window = fn.slice(looped, start=start, shape=[recipe.window_samples], axes=[0])
        if recipe.clip is not None and not (recipe.clip >= 1.0 and modality in self.within_unit):
            window = dmath.clamp(window, -recipe.clip, recipe.clip)
        if gpu:
            window = window.gpu()
        if recipe.features == "fbank":
            return window
        power = fn.spectrogram(window, nfft=recipe.n_fft, window_length=recipe.n_fft,
                               window_step=recipe.hop_length, window_fn=recipe.hann_window().tolist(),
                               center_windows=True, reflect_padding=recipe.pad_mode == "reflect", power=2, layout="ft")
        # |X| = sqrt(|X|^2): DALI's power-2 spectrogram plus a sqrt is faster than power=1.
        return dmath.log(dmath.sqrt(power) + recipe.log_eps)

    def frames_node(self, s: dict, modality, kind: str, gpu: bool):
        """uint8 frames [T, H, W, 3] decoded from the source's fields."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        if kind == "frames":
            images = [fn.decoders.image(s[f"jpeg{t}"], device="mixed" if gpu else "cpu", output_type=types.RGB)
                      for t in range(self.cfg.frames.num_frames)]
            return fn.stack(*images, axis_name="F")
        if modality in self.pyav_modalities:  # already decoded frames [T, H, W, 3]
            return fn.reshape(s["decoded"], layout="FHWC")
        return fn.decoders.video(s["bytes"], device="mixed" if gpu else "cpu", frames=s["frames"],
                                 pad_mode="none")  # a missing frame is an error, not zeros

    def transform_node(self, x, s: dict):
        """Training: resize of the crop box drawn in the source, and its flip; evaluation: resize.
        Then normalised, channels first."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        recipe = self.cfg.frames
        size = [recipe.size] * 2
        if self.train:
            x = fn.resize(x, size=size, roi_start=s["roi_start"], roi_end=s["roi_end"], roi_relative=False)
            mirror = s["mirror"]
        else:
            x = fn.resize(x, size=size)
            mirror = 0
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="FCHW", mean=[255 * m for m in recipe.mean],
                                        std=[255 * v for v in recipe.std], mirror=mirror)

    def batches(self, start: int = 0):
        """A pass over the current epoch from plan batch `start` on."""
        plan, this_pass = self._begin_pass(start)
        if self._dirty:  # an earlier pass stopped early or failed: pieces may still be in flight
            self.pipe = self._build()
        self._dirty = True
        pieces = [_Piece(start + b, list(map(int, ids))) for b, ids in enumerate(plan)]
        if self.cached is not None:
            self.cached.start_pass([p.clips for p in pieces], self.epoch)
        self.feeder.reset(self.epoch, pieces)
        return self._run_pass(this_pass, start, start + len(plan))

    def _run_pass(self, this_pass: int, group: int, end: int):
        feeder, names = self.feeder, self.output_names + ["label", "index"]
        done: dict = {}  # group -> decoded batches of its pieces
        while group < end:
            while group < end and feeder.outstanding[group] == 0:  # in plan order
                self._faults(feeder.faults.pop(group, []))
                parts = done.pop(group, [])
                group += 1
                self.position = group
                if parts:
                    yield self.mark_copies(self._finish(parts))
                    self._check_current(this_pass)
            if group >= end:
                break
            try:
                outputs = self.pipe.run()
            except StopIteration:
                if feeder.crashed is not None:
                    raise feeder.crashed
                if not feeder.plan:
                    raise RuntimeError(f"internal error: the DALI pass ended with batch {group} unresolved")
                self.pipe.reset()  # the plan ran out while a failed piece was in flight: feed its retry
                continue
            except Exception as exc:
                failed = feeder.split_failed()
                self.pipe = self._build()  # DALI may leave the pipeline invalid after an error
                if len(failed.clips) == 1:  # (no local name: this frame would hold the error it raises)
                    feeder.faults.setdefault(failed.group, []).append(
                        self._clip_error(failed.clips[0], exc, feeder.epoch))
                continue
            piece = feeder.in_flight.popleft()
            part = {n: _to_torch(o) for n, o in zip(names, outputs)}
            if self.cached is not None:
                self.cached.attach(part)
            done.setdefault(piece.group, []).append(part)
            feeder.outstanding[piece.group] -= 1
        try:  # the source is exhausted: let DALI say so, then rewind it for the next pass
            self.pipe.run()
            raise RuntimeError("internal error: the DALI pipeline returned a batch past the end of the plan")
        except StopIteration:
            self.pipe.reset()
        self._dirty = False
        self.end_epoch()

    def _clip_error(self, i: int, exc: BaseException, epoch: int) -> DataError:
        """The DataError of clip i, which DALI failed to decode on its own. The reference decoders
        (naive.decode_sample) read the clip again to name the broken file and say what is wrong
        with it; when they read it fine, the error names the clip and gives DALI's reason."""
        from .naive import decode_sample

        clip = self.clips[i]
        kind, reason = _dali_reason(exc)
        try:
            decode_sample(clip, self.modalities, self.cfg, self.train, self.sample_rng(epoch, i))
        except DataError as err:
            return DataError(err.path, f"{err.reason} (DALI: {reason})", clip=clip.clip_id)
        candidates = [m for m, k in self.modalities.items() if k == kind and m not in self.pyav_modalities]
        path = clip.files[candidates[0]] if len(candidates) == 1 else clip.clip_id
        return DataError(path, f"decode failed: {reason}", clip=clip.clip_id)

    def _finish(self, parts: list) -> dict:
        batch = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for modality, kind in self.modalities.items():
            if kind == "audio" and self.cfg.audio.features == "fbank":
                batch[modality] = kaldi_fbank_features(batch[modality], self.cfg.audio)
        return batch


def _to_torch(batch) -> torch.Tensor:
    if hasattr(batch, "as_cpu") and type(batch).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        tensor = batch.as_tensor()
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device="cuda")
        feed_ndarray(tensor, out)
        return out
    return torch.from_numpy(np.array(batch.as_tensor(), copy=True))

"""The DALI loader: files are read in Python (bytes only) and everything else runs in a DALI
pipeline, on the CPU or, with device="cuda", on the GPU where DALI has GPU operators.

    audio   decoders.audio (resample, downmix) -> loop (cat) -> window (slice) -> clip ->
            spectrogram (periodic Hann, centred, pad mode of the recipe) -> log(|X| + eps);
            the Kaldi fbank recipe takes the window out of the pipeline and computes the filter
            bank with batched torch ops on the same device (DALI's spectrogram has no per-frame
            DC removal, which Kaldi's definition needs)
    video   decoders.video at the chosen frame indices (CPU: VP8/VP9/MJPEG; GPU "mixed": also
            H.264/HEVC/AV1/MPEG-4) -> resize / random_resized_crop -> crop_mirror_normalize.
            On the CPU, a video modality holding any other codec is decoded with PyAV in the
            source instead (the chosen frames only) and fed to the same transforms
    frames  decoders.image per frame -> stack -> the same transforms

Per-sample choices (window starts, frame indices) are drawn in Python from the same
(seed, epoch, clip) generators as the naive loader, so evaluation batches agree exactly with it.
Random crops and flips in training come from DALI's own generator (seeded from cfg.seed).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .audio import kaldi_fbank_features
from .base import ClipLoader, log
from .errors import DataError
from .video import decode_video_frames, segment_indices

_CPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg")


class _BatchSource:
    """External source: one batch of encoded files and per-sample choices per call; raises
    StopIteration at the end of an epoch and then starts the next one."""

    def __init__(self, loader: "DaliLoader"):
        self.loader = loader
        self.epoch = 0
        self.order = loader.order(0)
        self.pos = 0
        self.last_clips = []

    def __call__(self):
        ld = self.loader
        if self.pos >= len(self.order):
            self.epoch += 1
            self.order, self.pos = ld.order(self.epoch), 0
            raise StopIteration
        ids = self.order[self.pos:self.pos + ld.cfg.batch_size]
        self.pos += len(ids)
        outputs = [[] for _ in range(ld.num_source_outputs)]
        self.last_clips = [ld.clips[i].clip_id for i in ids]
        for i in ids:
            clip = ld.clips[i]
            rng = ld.sample_rng(self.epoch, int(i))
            k = 0
            for modality, kind in ld.modalities.items():
                if kind == "audio":
                    recipe = ld.cfg.audio
                    outputs[k].append(_read_bytes(clip.files[modality]))
                    start = recipe.window_start(recipe.offset_fraction(ld.train, rng))
                    outputs[k + 1].append(np.array([start], dtype=np.int32))
                    k += 2
                    continue
                idx = segment_indices(clip.num_frames[modality], ld.cfg.frames.num_frames, ld.train, rng)
                if kind == "video" and modality in ld.pyav_modalities:
                    outputs[k].append(decode_video_frames(clip.files[modality], idx))
                    k += 1
                elif kind == "video":
                    outputs[k].append(_read_bytes(clip.files[modality]))
                    outputs[k + 1].append(np.asarray(idx, dtype=np.int32))
                    k += 2
                else:
                    for t, j in enumerate(idx):
                        outputs[k + t].append(_read_bytes(clip.frame_files[modality][j]))
                    k += ld.cfg.frames.num_frames
            outputs[k].append(np.array(clip.label, dtype=np.int64))
            outputs[k + 1].append(np.array(i, dtype=np.int64))
        return tuple(outputs)


def _read_bytes(path) -> np.ndarray:
    try:
        return np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DataError(path, f"missing file: {exc}") from None


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
        self.num_source_outputs = sum(self._source_outputs(m, k) for m, k in self.modalities.items()) + 2
        self.source = _BatchSource(self)
        self.pipe = self._build()

    def _source_outputs(self, modality, kind) -> int:
        """Source outputs per modality: audio bytes + window start; video bytes + frame indices
        (decoded frames only, for PyAV-decoded modalities); one JPEG per frame."""
        if kind == "frames":
            return self.cfg.frames.num_frames
        return 1 if modality in self.pyav_modalities else 2

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
        """The pipeline, defined but not built (defining needs no GPU, so tests check the GPU
        graph's operators and arguments on CPU-only machines too)."""
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        cfg, train = self.cfg, self.train
        frames_recipe = cfg.frames
        mean = [255 * m for m in frames_recipe.mean]
        std = [255 * s for s in frames_recipe.std]

        def transform(x):
            if train:
                x = fn.random_resized_crop(x, size=[frames_recipe.size] * 2, random_area=list(frames_recipe.crop_scale),
                                           random_aspect_ratio=list(frames_recipe.crop_ratio))
                mirror = fn.random.coin_flip(probability=0.5) if frames_recipe.flip else 0
            else:
                x = fn.resize(x, resize_x=frames_recipe.size, resize_y=frames_recipe.size)
                mirror = 0
            return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="FCHW", mean=mean, std=std,
                                            mirror=mirror)

        @pipeline_def
        def pipeline():
            src = list(fn.external_source(source=self.source, num_outputs=self.num_source_outputs, batch=True,
                                          no_copy=False))
            outs, k = [], 0
            for modality, kind in self.modalities.items():
                if kind == "audio":
                    recipe = cfg.audio
                    wave, _ = fn.decoders.audio(src[k], dtype=types.FLOAT, downmix=True,
                                                sample_rate=float(recipe.sample_rate))
                    copies = self._audio_copies(modality)
                    looped = fn.cat(*([wave] * copies), axis=0) if copies > 1 else wave
                    window = fn.slice(looped, start=src[k + 1], shape=[recipe.window_samples], axes=[0])
                    if recipe.clip is not None:
                        window = dmath.clamp(window, -recipe.clip, recipe.clip)
                    if gpu:
                        window = window.gpu()
                    if recipe.features == "fbank":  # computed on the batch after the pipeline
                        outs.append(window)
                        k += 2
                        continue
                    power = fn.spectrogram(window, nfft=recipe.n_fft, window_length=recipe.n_fft,
                                           window_step=recipe.hop_length, window_fn=recipe.hann_window().tolist(),
                                           center_windows=True, reflect_padding=recipe.pad_mode == "reflect",
                                           power=2, layout="ft")
                    # |X| = sqrt(|X|^2): DALI's power-2 spectrogram plus a sqrt is faster than power=1.
                    outs.append(dmath.log(dmath.sqrt(power) + recipe.log_eps))
                    k += 2
                elif kind == "video":
                    if modality in self.pyav_modalities:  # already decoded frames [T, H, W, 3]
                        frames = fn.reshape(src[k], layout="FHWC")
                    else:
                        frames = fn.decoders.video(src[k], device="mixed" if gpu else "cpu", frames=src[k + 1])
                    outs.append(transform(frames))
                    k += self._source_outputs(modality, kind)
                else:
                    images = [fn.decoders.image(src[k + t], device="mixed" if gpu else "cpu", output_type=types.RGB)
                              for t in range(frames_recipe.num_frames)]
                    outs.append(transform(fn.stack(*images, axis_name="F")))
                    k += frames_recipe.num_frames
            return (*outs, src[k], src[k + 1])

        return pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers),
                        device_id=0 if gpu else None, seed=cfg.seed, prefetch_queue_depth=2)

    def __iter__(self):
        names = list(self.modalities) + ["label", "index"]
        while True:
            try:
                outputs = self.pipe.run()
            except StopIteration:
                self.pipe.reset()
                break
            except Exception as exc:
                raise DataError(", ".join(self.source.last_clips[:4]) + ", ...",
                                f"DALI failed on one of the clips fed last: {exc}") from exc
            batch = {name: _to_torch(out) for name, out in zip(names, outputs)}
            for modality, kind in self.modalities.items():
                if kind == "audio" and self.cfg.audio.features == "fbank":
                    batch[modality] = kaldi_fbank_features(batch[modality], self.cfg.audio)
            yield batch
        self.end_epoch()


def _to_torch(batch) -> torch.Tensor:
    if hasattr(batch, "as_cpu") and type(batch).__name__ == "TensorListGPU":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        tensor = batch.as_tensor()
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device="cuda")
        feed_ndarray(tensor, out)
        return out
    return torch.from_numpy(np.array(batch.as_tensor(), copy=True))

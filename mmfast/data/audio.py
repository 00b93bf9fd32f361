"""Audio recipes: decode, resample, loop, cut a window, clip, log-magnitude STFT.

One recipe drives both loaders (DALI and the naive reference), so their spectrograms agree:

    wave    = the clip resampled to `sample_rate` (mono)
    looped  = wave repeated until it holds L = loop_to * sample_rate samples
    start   = floor(u * (L - D)),  D = duration * sample_rate,
              u ~ U[0, 1) in training (train_offset="random"), 0 ("start") or 0.5 ("center")
    window  = clip(looped[start : start + D], -clip, clip)
    feature = log(|STFT(window)| + log_eps)   periodic Hann, centred frames, pad_mode padding
            -> [n_fft // 2 + 1, 1 + D // hop_length]

With features="fbank" the window instead gets Kaldi's log-mel filter bank (``kaldi_fbank_features``,
torchaudio.compliance.kaldi.fbank's definition, computed with batched torch ops on the loader's
device): the window's mean removed, 25 ms frames every 10 ms (snip_edges), each frame's DC
offset removed, pre-emphasis 0.97, symmetric Hann window, |FFT 512|^2, `num_mel_bins`
triangular mel filters (mel = 1127 ln(1 + f / 700)) from low_freq to Nyquist, log with a floor
of float32 epsilon; then padded with zeros or cut to `target_frames` frames and normalised
(x - norm_mean) / (2 norm_std) -> [target_frames, num_mel_bins].

Presets follow the published recipes (the public code's, as the dataset configs say): ``crema_d()`` (22.05 kHz,
3 s, STFT 512/353 -> 257 x 188), ``kinetics_sounds()`` (16 kHz, 10 s, 512/353 -> 257 x 454),
``vggsound()`` (16 kHz, a 5 s window of the clip looped to 10 s, 256/128 -> 129 x 626),
``kaldi_fbank()`` (16 kHz, 10 s, 128 mel bins, 1024 frames, normalised with mean -4.503877 and
std 5.141276, the Kinetics-Sounds fbank variant).
The research code tiles a CREMA-D clip exactly three times, which leaves clips under one
second short of 3 s (and their spectrograms narrower); looping until L fixes that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .errors import DataError

OFFSETS = ("random", "start", "center")
FEATURES = ("stft", "fbank")
PAD_MODES = ("constant", "reflect")


@dataclass(frozen=True)
class AudioRecipe:
    sample_rate: int = 22050
    loop_to: float = 3.0  # seconds the clip is looped to
    duration: float = 3.0  # seconds of the window cut from it
    train_offset: str = "random"
    eval_offset: str = "start"
    n_fft: int = 512
    hop_length: int = 353
    pad_mode: str = "constant"  # librosa >= 0.10's default; "reflect" for older librosa
    clip: float | None = 1.0  # clip samples to [-clip, clip]; None: no clipping
    log_eps: float = 1e-7
    min_duration: float = 0.25  # shorter clips are bad input ("too short")
    features: str = "stft"  # or "fbank" (Kaldi log-mel filter bank; the fields below)
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    target_frames: int = 1024
    norm_mean: float = -4.503877
    norm_std: float = 5.141276

    def __post_init__(self):
        if self.sample_rate <= 0 or self.n_fft <= 0 or self.hop_length <= 0:
            raise ValueError("sample_rate, n_fft and hop_length must be positive")
        if not 0 < self.duration <= self.loop_to:
            raise ValueError(f"need 0 < duration ({self.duration}) <= loop_to ({self.loop_to})")
        if self.train_offset not in OFFSETS or self.eval_offset not in OFFSETS:
            raise ValueError(f"train_offset/eval_offset must be one of {OFFSETS}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if self.min_duration <= 0:
            raise ValueError("min_duration must be > 0")
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
        if self.features == "fbank":
            if self.frame_samples > self.window_samples:
                raise ValueError("fbank: the window is shorter than one frame")
            if not 0 <= self.low_freq < self.sample_rate / 2 or self.num_mel_bins < 1 or self.norm_std <= 0:
                raise ValueError("fbank: need 0 <= low_freq < Nyquist, num_mel_bins >= 1, norm_std > 0")

    @property
    def window_samples(self) -> int:
        return int(round(self.duration * self.sample_rate))

    @property
    def loop_samples(self) -> int:
        return int(round(self.loop_to * self.sample_rate))

    @property
    def frame_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def shift_samples(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def shape(self) -> tuple:
        if self.features == "fbank":
            return (self.target_frames, self.num_mel_bins)
        return (self.n_fft // 2 + 1, 1 + self.window_samples // self.hop_length)

    def offset_fraction(self, train: bool, rng: np.random.Generator) -> float:
        mode = self.train_offset if train else self.eval_offset
        return float(rng.random()) if mode == "random" else (0.0 if mode == "start" else 0.5)

    def window_start(self, u: float) -> int:
        return int(math.floor(u * (self.loop_samples - self.window_samples)))

    def hann_window(self) -> np.ndarray:
        """Periodic Hann window of n_fft samples (librosa's and scipy's fftbins=True)."""
        n = np.arange(self.n_fft)
        return (0.5 - 0.5 * np.cos(2 * np.pi * n / self.n_fft)).astype(np.float32)


def crema_d(**changes) -> AudioRecipe:
    return replace(AudioRecipe(), **changes)


def kinetics_sounds(**changes) -> AudioRecipe:
    return replace(AudioRecipe(sample_rate=16000, loop_to=10.0, duration=10.0), **changes)


def kaldi_fbank(**changes) -> AudioRecipe:
    return replace(AudioRecipe(sample_rate=16000, loop_to=10.0, duration=10.0, features="fbank", clip=None),
                   **changes)


def vggsound(**changes) -> AudioRecipe:
    return replace(AudioRecipe(sample_rate=16000, loop_to=10.0, duration=5.0, eval_offset="center", n_fft=256,
                               hop_length=128), **changes)


# ------------------------------------------------------------------------------------------------
# The reference implementation (NumPy + librosa), used by the naive loader and the parity tests.

# Formats DALI's audio decoder reads (libsndfile inside DALI); others (MP3, ...) are decoded with
# soundfile in the DALI loader's source and fed to the pipeline as samples.
DALI_AUDIO_FORMATS = ("WAV", "WAVEX", "FLAC", "OGG", "AIFF")
ANTIALIAS_DB = 80.0  # stopband attenuation of the anti-aliasing low-pass


def antialias_kernel(rate: float, target: float) -> np.ndarray:
    """Low-pass FIR (odd length, unit DC gain) applied at `rate` before resampling down to
    `target`: passband to 0.9 x the target Nyquist frequency, stopband (ANTIALIAS_DB down) from
    the target Nyquist frequency on, so nothing above it folds back (a Kaiser-windowed sinc, the
    textbook design: Oppenheim & Schafer, 7.6). [1.0] when `rate` <= `target` (nothing to fold)."""
    if rate <= target:
        return np.ones(1, np.float32)
    nyquist = target / 2
    width = 2 * np.pi * 0.1 * nyquist / rate  # transition band, radians per sample
    taps = int(np.ceil((ANTIALIAS_DB - 8) / (2.285 * width))) | 1
    beta = 0.1102 * (ANTIALIAS_DB - 8.7)
    cutoff = 0.95 * nyquist / rate  # cycles per sample, centre of the transition band
    n = np.arange(taps) - (taps - 1) / 2
    kernel = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, beta)
    return (kernel / kernel.sum()).astype(np.float32)


def check_wave(path, wave: np.ndarray, sample_rate: float, min_duration: float) -> None:
    """Bad audio: too short, non-finite, or silent (every sample zero)."""
    if wave.size < min_duration * sample_rate:
        raise DataError(path, f"too short: {wave.size / sample_rate:.3f} s of audio, "
                              f"at least {min_duration} s needed")
    if not np.isfinite(wave).all():
        raise DataError(path, "corrupt audio: non-finite samples")
    if not np.any(wave):
        raise DataError(path, "silent audio: every sample is zero")


def load_wave(path, recipe: AudioRecipe) -> np.ndarray:
    """Mono float32 at recipe.sample_rate (librosa: soundfile, soxr resampling when needed)."""
    import librosa

    try:
        wave, _ = librosa.load(str(path), sr=recipe.sample_rate, mono=True)
    except FileNotFoundError:
        raise DataError(path, "missing file") from None
    except Exception as exc:  # soundfile/audioread say "format not recognised", "truncated", ...
        raise DataError(path, f"corrupt audio: {type(exc).__name__}: {exc}") from None
    check_wave(path, wave, recipe.sample_rate, recipe.min_duration)
    return wave


def cut_window(wave: np.ndarray, recipe: AudioRecipe, u: float) -> np.ndarray:
    looped = np.tile(wave, math.ceil(recipe.loop_samples / wave.size))
    start = recipe.window_start(u)
    window = looped[start:start + recipe.window_samples]
    if recipe.clip is not None:
        window = np.clip(window, -recipe.clip, recipe.clip)
    return window.astype(np.float32)


def log_spectrogram(window: np.ndarray, recipe: AudioRecipe) -> np.ndarray:
    import librosa

    spec = librosa.stft(window, n_fft=recipe.n_fft, hop_length=recipe.hop_length, window=recipe.hann_window(),
                        center=True, pad_mode=recipe.pad_mode)
    return np.log(np.abs(spec) + recipe.log_eps).astype(np.float32)


def _kaldi_mel_banks(recipe: AudioRecipe, fft_size: int):
    """[num_mel_bins, fft_size // 2 + 1] triangular filters in the Kaldi mel domain (Nyquist
    column zero, as Kaldi has num_fft_bins = fft_size / 2)."""
    import torch

    def mel(f):
        return 1127.0 * torch.log1p(f / 700.0)

    nyquist = recipe.sample_rate / 2
    low, high = mel(torch.tensor(recipe.low_freq, dtype=torch.float64)), mel(torch.tensor(nyquist, dtype=torch.float64))
    delta = (high - low) / (recipe.num_mel_bins + 1)
    b = torch.arange(recipe.num_mel_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
    fft_mel = mel(recipe.sample_rate / fft_size * torch.arange(fft_size // 2, dtype=torch.float64)).unsqueeze(0)
    banks = torch.clamp(torch.minimum((fft_mel - left) / (center - left), (right - fft_mel) / (right - center)), min=0)
    return torch.nn.functional.pad(banks, (0, 1)).float()


def kaldi_fbank_features(window, recipe: AudioRecipe):
    """Kaldi log-mel filter bank of a batch of windows [..., samples] (torch, any device)
    -> [..., target_frames, num_mel_bins], normalised. See the module docstring."""
    import torch

    x = window.float()
    x = x - x.mean(dim=-1, keepdim=True)
    frames = x.unfold(-1, recipe.frame_samples, recipe.shift_samples)  # snip_edges framing
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = frames - recipe.preemphasis * previous
    frames = frames * torch.hann_window(recipe.frame_samples, periodic=False, device=x.device)
    fft_size = 1 << (recipe.frame_samples - 1).bit_length()
    power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)
    mel = power @ _kaldi_mel_banks(recipe, fft_size).to(x.device).T
    logmel = torch.log(torch.clamp(mel, min=torch.finfo(torch.float32).eps))
    n = logmel.shape[-2]
    if n < recipe.target_frames:
        logmel = torch.nn.functional.pad(logmel, (0, 0, 0, recipe.target_frames - n))
    else:
        logmel = logmel[..., :recipe.target_frames, :]
    return (logmel - recipe.norm_mean) / (2 * recipe.norm_std)


def audio_features(window: np.ndarray, recipe: AudioRecipe):
    """The recipe's features of one window (naive loader): a float32 torch tensor."""
    import torch

    if recipe.features == "fbank":
        return kaldi_fbank_features(torch.from_numpy(window), recipe)
    return torch.from_numpy(log_spectrogram(window, recipe))

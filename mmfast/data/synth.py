"""The embedded dataset: a small, deterministic audio-visual classification set in the CREMA-D
layout (mmfast.data.layouts), where one modality is clearly more discriminative than the other
(or, with dominant="none", neither is).

Each class has an audio signature (a tone at a class frequency, in noise) and a visual signature
(a grating patch at a class orientation, random place and phase, in noise). The dominant modality's signature has amplitude
1; the other's is divided by `imbalance`, so it is learnable alone but slower, which is what makes
plain joint training starve it. The modalities are complementary, as in real data: a share of
the clips (`dominant_missing`) carries no signature in the dominant modality and another
(`weak_missing`, disjoint) none in the weak one, so neither modality alone is perfect and a joint
model that neglects the weak encoder loses fused accuracy on the first share. Clip lengths vary (so audio looping and frame sampling are
exercised). Videos are VP8 in WebM, a codec DALI decodes on the CPU; audio is 16-bit PCM WAV at
the CREMA-D recipe's 22,050 Hz. Every clip is generated from (seed, clip index) alone.

The three-modality variant (``text=True``) adds a third modality, "text": pre-extracted feature
sequences (TEXT_RATE steps a second of the clip, TEXT_DIM values a step, float32 .npy) whose
class signature is a class direction (orthonormal across classes) of amplitude
``text_amplitude`` added to every step, in Gaussian noise; a share ``text_missing`` of the clips,
drawn independently of the other two shares, carries none. It is written in the generic layout
(audio/, visual/, text/, clips.csv), and its audio and video are those of the two-modality
dataset of the same options, byte for byte.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .layouts import CREMA_D_CLASSES

SAMPLE_RATE = 22050
DOMINANTS = ("audio", "visual", "none")
FPS = 4
SIZE = 64
TEXT_RATE = 6  # feature steps per second of the clip (2 to 3.5 s: 12 to 21 steps; the dataset's choice)
TEXT_DIM = 32  # values per step (the dataset's choice: at least the 26 classes, for orthonormal class directions)


@dataclass
class SynthSpec:
    clips: int = 480
    classes: int = 6
    dominant: str = "audio"
    imbalance: float = 2.5
    seed: int = 0
    min_seconds: float = 2.0
    max_seconds: float = 3.5
    noise: float = 0.6
    dominant_missing: float = 0.3  # share of clips without a dominant-modality signature
    weak_missing: float = 0.1  # share of (other) clips without a weak-modality signature
    jpeg_frames: bool = False  # also write 1-fps JPEG frame folders (Image-01-FPS)
    text: bool = False  # add the "text" modality of feature sequences (the generic layout then)
    text_amplitude: float = 0.45  # its signature's amplitude per step (calibrated: the comment above make_text)
    text_missing: float = 0.2  # share of clips without a text signature (drawn apart from the other two; no
    # published value: enough that the text alone is not perfect, as for the other two modalities)

    def check(self):
        if self.clips < 2 * self.classes:
            raise ValueError(f"clips must be at least 2 per class ({2 * self.classes}), got {self.clips}")
        if not 2 <= self.classes <= 26:
            raise ValueError(f"classes must be in [2, 26], got {self.classes}")
        if self.dominant not in DOMINANTS:
            raise ValueError(f"dominant must be one of {DOMINANTS}, got {self.dominant!r}")
        if not self.imbalance >= 1:
            raise ValueError(f"imbalance must be >= 1, got {self.imbalance}")
        if not 0.5 <= self.min_seconds <= self.max_seconds:
            raise ValueError("need 0.5 <= min_seconds <= max_seconds")
        if not (self.text_amplitude >= 0 and 0 <= self.text_missing < 1):
            raise ValueError(f"text_amplitude must be >= 0 and text_missing in [0, 1), got {self.text_amplitude} and "
                             f"{self.text_missing}")
        if not (0 <= self.dominant_missing and 0 <= self.weak_missing and self.dominant_missing + self.weak_missing < 1):
            raise ValueError(f"dominant_missing and weak_missing must be >= 0 with a sum below 1 (every clip keeps "
                             f"one signature), got {self.dominant_missing} and {self.weak_missing}")

    def signatures(self, index: int) -> tuple[bool, bool]:
        """(audio, visual): whether clip `index` carries each modality's class signature."""
        u = np.random.default_rng([self.seed, index, 2]).random()
        has = {"audio": True, "visual": True}
        if self.dominant == "none":  # (each modality lacks its signature on half the missing share)
            first, second, share = "audio", "visual", (self.dominant_missing + self.weak_missing) / 2
            cut = (share, 2 * share)
        else:
            first, second = self.dominant, "visual" if self.dominant == "audio" else "audio"
            cut = (self.dominant_missing, self.dominant_missing + self.weak_missing)
        if u < cut[0]:
            has[first] = False
        elif u < cut[1]:
            has[second] = False
        return has["audio"], has["visual"]

    def text_signature(self, index: int) -> bool:
        """Whether clip `index` carries the text modality's class signature (text=True)."""
        return bool(np.random.default_rng([self.seed, index, 4]).random() >= self.text_missing)


def class_names(k: int) -> list:
    extra = [f"C{i:02d}" for i in range(len(CREMA_D_CLASSES), k)]
    return (CREMA_D_CLASSES + extra)[:k]


# How the weak modality's signature shrinks with `imbalance`: a tone concentrates in one STFT bin
# and stays easy to detect far below the noise, so audio needs a much steeper attenuation than
# the grating to become comparably hard (calibrated with bench/imbalance.py).
WEAK_EXPONENT = {"audio": 3.0, "visual": 1.0}


# dominant="none": amplitudes at which joint training favours neither modality (calibrated on the
# embedded config, 20 epochs, seed 0: audio 0.2 gave a mean discrepancy ratio of 1.46 for audio,
# 0.1 gave 0.72, 0.14 gave 1.10; at 0.14 each encoder's linear probe inside the joint model is
# within 0.011 of its probe trained alone, against 0.39 for the weak one at imbalance 2.5).
BALANCED = {"audio": 0.14, "visual": 1.0}


def _amplitudes(spec: SynthSpec):
    """(audio, visual) signature amplitudes: 1 for the dominant modality, smaller for the other;
    with no dominant modality, the calibrated pair BALANCED (imbalance unused)."""
    if spec.dominant == "none":
        return BALANCED["audio"], BALANCED["visual"]
    weak = "visual" if spec.dominant == "audio" else "audio"
    amp = {spec.dominant: 1.0, weak: spec.imbalance ** -WEAK_EXPONENT[weak]}
    return amp["audio"], amp["visual"]


def make_audio(rng: np.random.Generator, label: int, seconds: float, spec: SynthSpec,
               signature: bool = True) -> np.ndarray:
    amp = _amplitudes(spec)[0] if signature else 0.0
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    freq = 220.0 * 2 ** (label * 7 / 12)  # a fifth apart: distinct bins at n_fft 512
    phase = rng.uniform(0, 2 * np.pi)
    tone = amp * np.sin(2 * np.pi * freq * t + phase)
    x = 0.25 * (tone + spec.noise * rng.standard_normal(n))
    return np.clip(x, -1, 1).astype(np.float32)


def make_frames(rng: np.random.Generator, label: int, seconds: float, spec: SynthSpec,
                signature: bool = True) -> np.ndarray:
    """An oriented grating patch (orientation = class) at a random place, random phase, in noise:
    recognising it takes learned features, unlike a colour or brightness cue a linear probe on
    untrained features would read off."""
    amp = _amplitudes(spec)[1] if signature else 0.0
    n = max(1, int(round(seconds * FPS)))
    theta = np.pi * label / spec.classes
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    cy, cx = rng.uniform(SIZE * 0.3, SIZE * 0.7, size=2)
    background = rng.uniform(0.3, 0.6, size=3)
    frames = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for f in range(n):
        dy, dx = rng.normal(0, 1.0, size=2)
        y, x = yy - cy - dy, xx - cx - dx
        envelope = np.exp(-(y ** 2 + x ** 2) / (2 * (SIZE / 6) ** 2))
        grating = np.cos(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / 8.0 + rng.uniform(0, 2 * np.pi))
        signal = 0.3 * amp * envelope * grating
        img = background + signal[..., None] + 0.25 * spec.noise * rng.standard_normal((SIZE, SIZE, 3))
        frames[f] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return frames


def text_directions(spec: SynthSpec) -> np.ndarray:
    """[classes, TEXT_DIM]: each class's direction of the text signature, orthonormal."""
    q, _ = np.linalg.qr(np.random.default_rng([spec.seed, 7]).standard_normal((TEXT_DIM, spec.classes)))
    return q.T


# text_amplitude 0.45 puts the text between the two others (calibrated at seed 0, 480 clips, the
# first 16 steps): a SequenceEncoder and a linear classifier trained on the text alone (the
# embedded config's SGD: lr 0.01, momentum 0.9, batch 32) for 20 epochs reached test accuracy 0.51
# at amplitude 0.35 and 0.71 at 0.5 (the nearest class direction, which knows the directions: 0.69
# and 0.80), where audio alone reaches 0.79 and visual alone 0.55 (docs/demo.md); trained jointly
# through the embedded_text config for 20 epochs at 0.45, the text encoder's linear probe reached
# 0.39 against 0.78 for audio and 0.18 for visual: audio dominates, the text is starved in part
# and the visual wholly.
def make_text(rng: np.random.Generator, label: int, seconds: float, spec: SynthSpec,
              signature: bool = True) -> np.ndarray:
    """[steps, TEXT_DIM] float32: the class direction times text_amplitude on every step (none
    without a signature), plus Gaussian noise of standard deviation `noise`."""
    steps = max(1, int(round(seconds * TEXT_RATE)))
    x = spec.noise * rng.standard_normal((steps, TEXT_DIM))
    if signature:
        x += spec.text_amplitude * text_directions(spec)[label]
    return x.astype(np.float32)


def write_video(path: Path, frames: np.ndarray) -> None:
    import av

    # bitexact: no random segment UID or muxing date, so the same clip gives the same bytes.
    with av.open(str(path), "w", format="webm", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libvpx", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"threads": "1", "deadline": "good", "cpu-used": "4"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate(out, spec: SynthSpec | None = None, **overrides) -> Path:
    """Writes the dataset to `out` (created; must be empty or absent) and returns its path."""
    import soundfile as sf
    from PIL import Image

    spec = spec or SynthSpec(**overrides)
    spec.check()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite it")
    names = class_names(spec.classes)
    # folders of the audio, the videos, the frame folders (jpeg_frames) and the text
    audio_dir, video_dir, frames_dir = ("audio", "visual", "visual") if spec.text else \
        ("AudioWAV", "VideoFlash", "Image-01-FPS")
    for d in (audio_dir, video_dir) + (("text",) if spec.text else ()):
        (out / d).mkdir(parents=True, exist_ok=True)
    labels = np.arange(spec.clips) % spec.classes
    order = np.random.default_rng(spec.seed).permutation(spec.clips)
    splits = {}
    for rank, i in enumerate(order):
        frac = rank / spec.clips
        splits.setdefault("train" if frac < 0.7 else "val" if frac < 0.8 else "test", []).append(int(i))
    for i in range(spec.clips):
        rng = np.random.default_rng([spec.seed, i])
        label = int(labels[i])
        clip = f"{1001 + i:04d}_SYN_{names[label]}_XX"
        seconds = float(rng.uniform(spec.min_seconds, spec.max_seconds))
        has_audio, has_visual = spec.signatures(i)
        sf.write(out / audio_dir / f"{clip}.wav", make_audio(rng, label, seconds, spec, has_audio), SAMPLE_RATE,
                 subtype="PCM_16")
        frames = make_frames(rng, label, seconds, spec, has_visual)
        write_video(out / video_dir / f"{clip}.webm", frames)
        if spec.jpeg_frames:
            folder = out / frames_dir / clip
            folder.mkdir(parents=True)
            for j, frame in enumerate(frames[::FPS]):
                Image.fromarray(frame).save(folder / f"{j + 1:06d}.jpg", quality=95)
        if spec.text:  # (a generator of its own: the audio and video stay those of the two-modality dataset)
            text = make_text(np.random.default_rng([spec.seed, i, 3]), label, seconds, spec, spec.text_signature(i))
            np.save(out / "text" / f"{clip}.npy", text)
    clip_ids = {i: f"{1001 + i:04d}_SYN_{names[labels[i]]}_XX" for i in range(spec.clips)}
    if spec.text:  # the generic layout: one list with the split column
        with (out / "clips.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["clip", "label", "split"])
            for split, ids in splits.items():
                writer.writerows([clip_ids[i], names[labels[i]], split] for i in sorted(ids))
    for split, ids in ({} if spec.text else splits).items():
        with (out / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([clip_ids[i], names[labels[i]]] for i in sorted(ids))
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    return out


# The layout's modalities of the three-modality variant (data.modalities of its config).
TEXT_MODALITIES = {"audio": "audio", "visual": "video", "text": "features"}

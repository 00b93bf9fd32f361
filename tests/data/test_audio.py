"""Audio recipes (mmfast/data/audio.py): shapes, windows, spectrograms against librosa, resampling
without aliasing, the Kaldi filter bank, both loaders."""
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from mmfast.data import AudioRecipe, build_loader, crema_d, kinetics_sounds, vggsound
from mmfast.data.audio import cut_window, log_spectrogram
from mmfast.data.synth import SAMPLE_RATE

from datasupport import config, collect

pytest.importorskip("nvidia.dali")


# --- recipes and frame selection --------------------------------------------------------------------

def test_recipe_shapes_match_the_published_ones():
    assert crema_d().shape == (257, 188)
    assert kinetics_sounds().shape == (257, 454)
    assert vggsound().shape == (129, 626)
    with pytest.raises(ValueError, match="duration"):
        AudioRecipe(duration=4.0, loop_to=3.0)
    with pytest.raises(ValueError, match="pad_mode"):
        AudioRecipe(pad_mode="wrap")


def test_cut_window_loops_short_clips_and_clips_amplitude(gen):
    recipe = AudioRecipe(sample_rate=1000, loop_to=3.0, duration=2.0, n_fft=64, hop_length=16)
    wave = (torch.randn(700, generator=gen) * 2).numpy().astype(np.float32)
    for u in (0.0, 0.37, 0.999):
        window = cut_window(wave, recipe, u)
        start = int(np.floor(u * 1000))
        expected = np.clip(np.tile(wave, 5)[start:start + 2000], -1, 1)
        assert window.shape == (2000,) and np.array_equal(window, expected)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_dali_spectrogram_matches_librosa_for_both_pad_modes(synth, pad_mode):
    cfg = config(synth, audio=crema_d(pad_mode=pad_mode))
    batch = next(iter(build_loader(cfg, "test", backend="dali")))
    ld = build_loader(cfg, "test", backend="naive")
    clip = ld.clips[int(batch["index"][0])]
    wave, _ = sf.read(clip.files["audio"], dtype="float32")
    expected = log_spectrogram(cut_window(wave, cfg.audio, 0.0), cfg.audio)
    got = batch["audio"][0].numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4


def test_dali_leaves_out_the_clamp_only_where_it_changes_nothing(synth, tmp_path):
    """Integer PCM at the recipe's rate cannot leave [-1, 1]: the pipeline without the clamp
    gives the very spectrograms of the one with it. Float samples beyond 1 keep the clamp."""
    cfg = config(synth)
    loader = build_loader(cfg, "test", backend="dali")
    assert loader.within_unit == {"audio"} and {c.audio_subtypes["audio"] for c in loader.clips} == {"PCM_16"}
    without = collect(loader)["audio"]
    loader.within_unit = set()
    loader.pipe = loader._build()
    assert torch.equal(collect(loader)["audio"], without)

    full = tmp_path / "full_scale"  # (stereo PCM_16 at full scale, -32768 included, downmixed)
    shutil.copytree(synth, full, ignore=shutil.ignore_patterns("Image-01-FPS"))
    for path in sorted((full / "AudioWAV").glob("*.wav")):
        n = len(sf.read(path, dtype="int16")[0])
        square = np.where(np.arange(n) % 40 < 20, 32767, -32768).astype(np.int16)
        sf.write(path, np.stack([square, square], axis=1), SAMPLE_RATE, subtype="PCM_16")
    loader = build_loader(config(full), "test", backend="dali")
    assert loader.within_unit == {"audio"}
    without = collect(loader)["audio"]
    loader.within_unit = set()
    loader.pipe = loader._build()
    assert torch.equal(collect(loader)["audio"], without)

    loud = tmp_path / "loud"
    shutil.copytree(synth, loud, ignore=shutil.ignore_patterns("Image-01-FPS"))
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    for path in sorted((loud / "AudioWAV").glob("*.wav")):
        wave, rate = sf.read(path, dtype="float32")
        sf.write(path, wave * rng.uniform(2, 4), rate, subtype="FLOAT")
    cfg = config(loud)
    dali = build_loader(cfg, "test", backend="dali")
    assert dali.within_unit == set()
    got, naive = collect(dali)["audio"], collect(build_loader(cfg, "test", backend="naive"))["audio"]
    assert (got - naive).norm() / naive.norm() < 1e-4  # (unclamped, they would differ by far more)


# --- resampling and audio formats -------------------------------------------------------------------

def _retone(synth, tmp_path, rate, fmt, make):
    """A copy of the embedded dataset whose audio files hold make(native samples, native rate) at
    `rate`, written as `fmt` (WAV, FLAC or MP3)."""
    import librosa

    root = tmp_path / f"audio_{rate}_{fmt}"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    for path in sorted((root / "AudioWAV").glob("*.wav")):
        wave, native = sf.read(path, dtype="float32")
        path.unlink()
        out = make(librosa.resample(wave, orig_sr=native, target_sr=rate), rate).astype(np.float32)
        sf.write(path.with_suffix({"WAV": ".wav", "FLAC": ".flac", "MP3": ".mp3"}[fmt]), out, rate, format=fmt)
    return root


def _tone_db(spectrogram, recipe, freq, amplitude):
    """Power at `freq` (the three nearest bins) relative to a full tone of `amplitude`, in dB: a
    periodic Hann window puts amplitude * n_fft / 4 in a tone's bin and a quarter of that power in
    each neighbour (1.5x in all three)."""
    magnitude = spectrogram.exp().double()  # log(|X| + eps): eps is far below what is measured
    k = int(round(freq * recipe.n_fft / recipe.sample_rate))
    power = (magnitude[:, k - 1:k + 2, 2:-2] ** 2).sum(dim=1).mean() / 1.5
    return float(10 * torch.log10(power / (amplitude * recipe.n_fft / 4) ** 2))


@pytest.mark.parametrize("rate,tone,recipe", [(48000, 10000, kinetics_sounds()), (44100, 12000, vggsound()),
                                             (48000, 15000, crema_d())])
@pytest.mark.parametrize("backend", ["dali", "naive"])
def test_downsampling_does_not_alias(synth, tmp_path, rate, tone, recipe, backend):
    """A tone above the recipe's Nyquist frequency in a file at a higher rate must not fold back
    into the band: its alias stays 60 dB down (DALI's resampler alone gave it at full level)."""
    root = _retone(synth, tmp_path, rate, "WAV",
                   lambda wave, r: 0.5 * np.sin(2 * np.pi * tone * np.arange(len(wave)) / r))
    batch = collect(build_loader(config(root, audio=recipe, num_workers=1), "test", backend=backend))
    alias = recipe.sample_rate - tone
    assert _tone_db(batch["audio"], recipe, alias, 0.5) < -60


@pytest.mark.parametrize("backend", ["dali", "naive"])
def test_upsampling_leaves_no_image(synth, tmp_path, backend):
    root = _retone(synth, tmp_path, 8000, "WAV", lambda wave, r: 0.5 * np.sin(2 * np.pi * 3000 * np.arange(len(wave)) / r))
    recipe = kinetics_sounds()
    batch = collect(build_loader(config(root, audio=recipe, num_workers=1), "test", backend=backend))
    assert abs(_tone_db(batch["audio"], recipe, 3000, 0.5)) < 1  # the tone, at its level
    assert _tone_db(batch["audio"], recipe, 5000, 0.5) < -60  # its image about the source's Nyquist


@pytest.mark.parametrize("rate,fmt", [(48000, "WAV"), (44100, "FLAC"), (44100, "MP3"), (8000, "WAV")])
def test_dali_and_naive_agree_on_resampled_and_mp3_audio(synth, tmp_path, rate, fmt):
    """Real datasets hold 44.1/48 kHz audio, FLAC and MP3 (which CPU DALI cannot decode: read
    with soundfile in the source). Below 0.85 x the lower Nyquist frequency both loaders' spectrograms
    agree closely; above it the two anti-aliasing filters differ by design."""
    root = _retone(synth, tmp_path, rate, fmt, lambda wave, r: wave)
    recipe = kinetics_sounds()
    cfg = config(root, audio=recipe, num_workers=1)
    dali, naive = (collect(build_loader(cfg, "test", backend=b)) for b in ("dali", "naive"))
    band = int(0.85 * min(rate, recipe.sample_rate) / 2 * recipe.n_fft / recipe.sample_rate)
    d, n = dali["audio"][:, :band], naive["audio"][:, :band]
    assert (d - n).norm() / n.norm() < 2e-2
    assert (d.exp() - n.exp()).norm() / n.exp().norm() < 2e-3
    loader = build_loader(cfg, "test", backend="dali")
    assert loader.pcm_modalities == ({"audio"} if fmt == "MP3" else set())
    from nvidia.dali.pipeline import Pipeline

    assert isinstance(loader._define(gpu=True), Pipeline)  # the GPU graph with the low-pass is well-formed


# --- Kaldi filter bank -----------------------------------------------------------------------------

def kaldi_fbank_reference(wave, sample_rate, num_bins, low_freq=20.0, preemph=0.97):
    """Kaldi's fbank written out frame by frame in float64 (dither 0, snip_edges, use_power,
    htk mel, no energy), without normalisation or padding."""
    wave = np.asarray(wave, np.float64) - np.mean(wave)
    length, shift, fft = int(sample_rate * 0.025), int(sample_rate * 0.010), 1
    while fft < length:
        fft *= 2
    window = np.array([0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1)) for n in range(length)])

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(low_freq), mel(sample_rate / 2)
    delta = (hi - lo) / (num_bins + 1)
    banks = np.zeros((num_bins, fft // 2 + 1))
    for b in range(num_bins):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        for k in range(fft // 2):  # Kaldi leaves the Nyquist bin out
            m = mel(k * sample_rate / fft)
            if left < m < right:
                banks[b, k] = (m - left) / (center - left) if m <= center else (right - m) / (right - center)
    out = []
    for start in range(0, len(wave) - length + 1, shift):
        frame = wave[start:start + length].copy()
        frame -= frame.mean()
        frame = np.concatenate([[frame[0] * (1 - preemph)], frame[1:] - preemph * frame[:-1]])
        spectrum = np.abs(np.fft.rfft(frame * window, n=fft)) ** 2
        out.append(np.log(np.maximum(banks @ spectrum, np.finfo(np.float32).eps)))
    return np.array(out)


def test_kaldi_fbank_matches_the_written_out_definition(gen):
    from mmfast.data import kaldi_fbank
    from mmfast.data.audio import kaldi_fbank_features

    recipe = kaldi_fbank(sample_rate=8000, loop_to=1.0, duration=1.0, num_mel_bins=23, target_frames=120)
    wave = (0.1 * torch.randn(8000, generator=gen) + 0.05 * torch.sin(torch.arange(8000) * 0.3)).numpy()
    got = kaldi_fbank_features(torch.from_numpy(wave).unsqueeze(0), recipe)[0].numpy()
    ref = (kaldi_fbank_reference(wave, 8000, 23) - recipe.norm_mean) / (2 * recipe.norm_std)
    assert got.shape == (120, 23) and ref.shape == (98, 23)
    np.testing.assert_allclose(got[:98], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[98:], (0 - recipe.norm_mean) / (2 * recipe.norm_std), rtol=1e-6)  # zero padding
    assert kaldi_fbank().shape == (1024, 128)


def test_kaldi_fbank_recipe_through_both_loaders(synth):
    from mmfast.data import kaldi_fbank

    recipe = kaldi_fbank(sample_rate=SAMPLE_RATE, loop_to=3.0, duration=3.0, target_frames=320)
    cfg = config(synth, audio=recipe)
    dali, naive = (collect(build_loader(cfg, "test", backend=b)) for b in ("dali", "naive"))
    assert dali["audio"].shape[1:] == naive["audio"].shape[1:] == (320, 128)
    assert (dali["audio"] - naive["audio"]).abs().max() < 1e-4

"""The embedded dataset (mmfast/data/synth.py): deterministic, in the CREMA-D layout, the dominant
modality stronger, the modalities complementary; its three-modality variant's text features."""
import numpy as np
import pytest
import soundfile as sf

from mmfast.data import generate, read_layout
from mmfast.data.synth import SAMPLE_RATE

pytest.importorskip("nvidia.dali")


# --- the embedded dataset ---------------------------------------------------------------------------

def test_synth_is_deterministic_and_in_the_crema_d_layout(tmp_path):
    a = generate(tmp_path / "a", clips=12, classes=3, seed=9)
    b = generate(tmp_path / "b", clips=12, classes=3, seed=9)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    index = read_layout(a, "crema_d")
    assert index.classes == ["NEU", "HAP", "SAD"] and index.kinds == {"audio": "audio", "visual": "video"}
    assert sum(len(c) for c in index.splits.values()) == 12
    wave, rate = sf.read(index.splits["train"][0].files["audio"])
    assert rate == SAMPLE_RATE and len(wave) >= 2 * SAMPLE_RATE
    with pytest.raises(FileExistsError):
        generate(a, clips=12, classes=3)


def test_synth_dominant_modality_carries_the_stronger_signal(tmp_path):
    from mmfast.data.synth import SynthSpec, make_audio, make_frames

    spec = SynthSpec(dominant="visual", imbalance=4.0, noise=0.0)
    rng = np.random.default_rng(0)
    audio_peak = np.abs(make_audio(rng, 0, 1.0, spec)).max()
    strong = SynthSpec(dominant="audio", imbalance=4.0, noise=0.0)
    assert np.abs(make_audio(rng, 0, 1.0, strong)).max() > 3 * audio_peak
    frames_weak = make_frames(rng, 0, 1.0, strong).astype(float)
    frames_strong = make_frames(rng, 0, 1.0, spec).astype(float)
    assert frames_strong.max() - np.median(frames_strong) > 2 * (frames_weak.max() - np.median(frames_weak))


def test_synth_modalities_are_complementary():
    from mmfast.data.synth import SynthSpec

    spec = SynthSpec(clips=4000, dominant="visual", dominant_missing=0.3, weak_missing=0.1, seed=3)
    has = np.array([spec.signatures(i) for i in range(spec.clips)])  # columns: audio, visual
    assert has.any(axis=1).all()  # every clip keeps at least one signature
    assert abs((~has[:, 1]).mean() - 0.3) < 0.03 and abs((~has[:, 0]).mean() - 0.1) < 0.03
    with pytest.raises(ValueError, match="sum below 1"):
        SynthSpec(dominant_missing=0.6, weak_missing=0.5).check()


def test_synth_balanced_variant_splits_the_missing_share_and_uses_the_calibrated_amplitudes():
    from mmfast.data.synth import BALANCED, SynthSpec, make_audio

    spec = SynthSpec(clips=4000, dominant="none", dominant_missing=0.3, weak_missing=0.1, seed=5)
    has = np.array([spec.signatures(i) for i in range(spec.clips)])
    assert has.any(axis=1).all()
    assert abs((~has[:, 0]).mean() - 0.2) < 0.03 and abs((~has[:, 1]).mean() - 0.2) < 0.03
    quiet = SynthSpec(dominant="none", noise=0.0)
    wave = make_audio(np.random.default_rng(0), 0, 1.0, quiet)
    assert np.abs(wave).max() == pytest.approx(0.25 * BALANCED["audio"], rel=1e-3)  # (a full tone's peak)
    with pytest.raises(ValueError, match="dominant must be one of"):
        SynthSpec(dominant="both").check()


# --- the three-modality variant ---------------------------------------------------------------------

def test_text_variant_adds_feature_sequences_in_the_generic_layout(tmp_path):
    from mmfast.data.synth import TEXT_DIM, TEXT_MODALITIES, TEXT_RATE, SynthSpec, make_text

    spec = SynthSpec(clips=8, classes=2, seed=6, text=True)
    root = generate(tmp_path / "three", spec)
    plain = generate(tmp_path / "two", clips=5, classes=2, seed=6)  # clip i depends on (seed, i) alone
    index = read_layout(root, "generic", modalities=TEXT_MODALITIES)
    assert index.feature_dims == {"text": TEXT_DIM} and index.classes == ["NEU", "HAP"]
    clips = {c.clip_id: c for clips in index.splits.values() for c in clips}
    assert len(clips) == 8 and set(index.splits) == {"train", "val", "test"}
    two = {c.clip_id: c for clips in read_layout(plain, "crema_d").splits.values() for c in clips}
    for clip_id, c in two.items():  # the audio and the video of the two-modality dataset, byte for byte
        assert clips[clip_id].files["audio"].read_bytes() == c.files["audio"].read_bytes()
        assert clips[clip_id].files["visual"].read_bytes() == c.files["visual"].read_bytes()
    for i in range(spec.clips):  # every text file: the generator's sequence for (seed, i)
        clip = clips[f"{1001 + i:04d}_SYN_{['NEU', 'HAP'][i % 2]}_XX"]
        seconds = np.random.default_rng([spec.seed, i]).uniform(spec.min_seconds, spec.max_seconds)
        text = np.load(clip.files["text"])
        assert text.dtype == np.float32 and text.shape == (max(1, round(seconds * TEXT_RATE)), TEXT_DIM)
        want = make_text(np.random.default_rng([spec.seed, i, 3]), i % 2, seconds, spec, spec.text_signature(i))
        assert np.array_equal(text, want)


def test_text_signature_is_its_class_direction_at_its_own_amplitude():
    from mmfast.data.synth import SynthSpec, make_text, text_directions

    spec = SynthSpec(classes=5, noise=0.0, text_amplitude=0.7)
    directions = text_directions(spec)
    np.testing.assert_allclose(directions @ directions.T, np.eye(5), atol=1e-6)  # orthonormal
    x = make_text(np.random.default_rng(0), 3, 2.0, spec)
    np.testing.assert_allclose(x, np.tile(0.7 * directions[3], (12, 1)), atol=1e-6)
    assert not make_text(np.random.default_rng(0), 3, 2.0, spec, signature=False).any()
    shares = SynthSpec(clips=4000, text_missing=0.25, seed=1)
    assert abs(np.mean([not shares.text_signature(i) for i in range(4000)]) - 0.25) < 0.03
    with pytest.raises(ValueError, match="text_amplitude must be >= 0 and text_missing in"):
        SynthSpec(text_missing=1.0).check()

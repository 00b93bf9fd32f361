"""Data layer: layouts, recipes, the embedded dataset, DALI (CPU) vs the naive loader, bad input."""
import csv
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from mmfast.data import (AudioRecipe, DataConfig, DataError, FrameRecipe, build_loader, crema_d, generate,
                         kinetics_sounds, read_layout, vggsound)
from mmfast.data.audio import cut_window, log_spectrogram
from mmfast.data.synth import FPS, SAMPLE_RATE, SIZE
from mmfast.data.video import segment_indices

pytest.importorskip("nvidia.dali")

FRAMES = FrameRecipe(num_frames=3, size=SIZE)  # native size: evaluation resizing is the identity


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "cremad", clips=24, seed=5, jpeg_frames=True)


def config(root, **kw):
    return DataConfig(root=str(root), frames=kw.pop("frames", FRAMES), batch_size=kw.pop("batch_size", 5),
                      num_workers=kw.pop("num_workers", 0), **kw)


def collect(loader):
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


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


def test_segment_indices(gen):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=gen)))
    assert segment_indices(12, 3, False, rng) == [2, 6, 10]
    assert segment_indices(1, 3, False, rng) == [0, 0, 0]
    for _ in range(20):
        idx = segment_indices(12, 3, True, rng)
        assert [i // 4 for i in idx] == [0, 1, 2]  # one frame from each segment


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


# --- DALI against the naive reference ---------------------------------------------------------------

@pytest.mark.parametrize("visual", ["video", "frames"])
def test_dali_and_naive_agree_on_evaluation_batches(synth, tmp_path, visual):
    root = synth
    if visual == "video":  # hide the frame folders so the layout reads the videos
        root = tmp_path / "videos_only"
        shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    cfg = config(root, num_workers=2)  # the naive loader's worker processes, DALI's threads
    dali, naive = (collect(build_loader(cfg, "train", backend=b, train=False)) for b in ("dali", "naive"))
    assert dali.keys() == naive.keys() == {"audio", "visual", "label", "index"}
    assert torch.equal(dali["label"], naive["label"]) and torch.equal(dali["index"], naive["index"])
    assert dali["audio"].shape == naive["audio"].shape == (len(dali["label"]), 257, 188)
    rel = (dali["audio"] - naive["audio"]).norm() / naive["audio"].norm()
    assert rel < 1e-4
    assert (dali["audio"] - naive["audio"]).abs().max() < 1e-3  # log domain: relative magnitude error
    assert dali["visual"].shape == naive["visual"].shape == (len(dali["label"]), 3, 3, SIZE, SIZE)
    # Pixel units: decoders agree within rounding (JPEG: IDCT rounding of two libjpeg builds).
    std = torch.tensor(FRAMES.std).view(1, 1, 3, 1, 1) * 255
    pixel_diff = (dali["visual"] - naive["visual"]).abs() * std
    assert pixel_diff.max() <= (1.01 if visual == "video" else 4.0)
    assert pixel_diff.mean() < 0.5


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


def test_training_batches_same_structure_and_reshuffled_each_epoch(synth):
    cfg = config(synth, batch_size=4)
    for backend in ("dali", "naive"):
        loader = build_loader(cfg, "train", backend=backend)
        first, second = collect(loader), collect(loader)
        n = len(loader.clips)
        assert sorted(first["index"].tolist()) == sorted(second["index"].tolist()) == list(range(n))
        assert first["index"].tolist() != second["index"].tolist()
        assert first["visual"].shape[1:] == (3, 3, SIZE, SIZE) and first["audio"].shape[1:] == (257, 188)
        assert torch.isfinite(first["audio"]).all() and torch.isfinite(first["visual"]).all()
        labels = {c.clip_id: c.label for c in loader.clips}
        assert [labels[loader.clips[i].clip_id] for i in first["index"]] == first["label"].tolist()


def test_generic_layout_with_three_modalities(synth, tmp_path):
    root = tmp_path / "generic"
    for name, src in (("sound", "AudioWAV"), ("clip", "VideoFlash"), ("rgb", "Image-01-FPS")):
        shutil.copytree(synth / src, root / name)
    index = read_layout(synth, "crema_d")
    with (root / "clips.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip", "label", "split"])
        for split, clips in index.splits.items():
            for c in clips:
                writer.writerow([c.clip_id, index.classes[c.label], split])
    cfg = config(root, layout="generic", modalities={"sound": "audio", "clip": "video", "rgb": "frames"})
    for backend in ("dali", "naive"):
        batch = collect(build_loader(cfg, "test", backend=backend))
        assert set(batch) == {"sound", "clip", "rgb", "label", "index"}
        assert batch["clip"].shape[1:] == batch["rgb"].shape[1:] == (3, 3, SIZE, SIZE)


# --- bad input ---------------------------------------------------------------------------------------

def broken_copy(synth, tmp_path, break_fn):
    root = tmp_path / "broken"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    index = read_layout(root, "crema_d")
    victim = index.splits["train"][0]
    target = break_fn(root, victim)
    return root, target


def _remove_audio(root, clip):
    clip.files["audio"].unlink()
    return clip.files["audio"]


def _garbage_audio(root, clip):
    clip.files["audio"].write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    return clip.files["audio"]


def _short_audio(root, clip):
    sf.write(clip.files["audio"], np.full(SAMPLE_RATE // 10, 0.1, np.float32), SAMPLE_RATE)
    return clip.files["audio"]


def _silent_audio(root, clip):
    sf.write(clip.files["audio"], np.zeros(SAMPLE_RATE * 2, np.float32), SAMPLE_RATE)
    return clip.files["audio"]


def _garbage_video(root, clip):
    clip.files["visual"].write_bytes(b"\x1aE\xdf\xa3" + b"\x00garbage" * 50)
    return clip.files["visual"]


def _truncated_video(root, clip):
    path = clip.files["visual"]
    path.write_bytes(path.read_bytes()[:60])
    return path


@pytest.mark.parametrize("break_fn,reason", [
    (_remove_audio, "missing file"), (_garbage_audio, "corrupt audio"), (_short_audio, "too short"),
    (_silent_audio, "silent audio"), (_garbage_video, "corrupt video"), (_truncated_video, "corrupt video"),
])
@pytest.mark.parametrize("backend", ["dali", "naive"])
def test_bad_clip_raises_naming_the_file_or_is_skipped_and_counted(synth, tmp_path, break_fn, reason, backend):
    root, target = broken_copy(synth, tmp_path, break_fn)
    with pytest.raises(DataError, match=reason) as info:
        build_loader(config(root), "train", backend=backend)
    assert info.value.path.startswith(str(target.with_suffix("")))  # a missing file has no known suffix
    loader = build_loader(config(root, on_error="skip"), "train", backend=backend)
    report = loader.skipped_at_build
    assert report.total == 1 and reason.split(":")[0] in report.summary() and report.names == [victim_id(target)]
    batch = collect(loader)
    assert len(batch["label"]) == len(loader.clips) == len(read_layout(synth, "crema_d").splits["train"]) - 1
    assert loader.last_epoch_skipped.total == 0  # found at build time, not again in every epoch
    # every split reports its own skips: the test split lost nothing
    assert build_loader(config(root, on_error="skip"), "test", backend=backend).skipped_at_build.total == 0


def victim_id(path):
    return path.name.split(".")[0]


def test_label_not_in_class_list_and_empty_split(synth, tmp_path):
    root = tmp_path / "labels"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    first = read_layout(root, "crema_d").splits["train"][0].clip_id
    with (root / "train.csv").open("a") as f:
        f.write(f"{first},XYZ\n")
    with pytest.raises(DataError, match=r"train.csv:\d+: label 'XYZ' of clip .* is not in the class list"):
        read_layout(root, "crema_d")
    index = read_layout(root, "crema_d", on_error="skip")
    assert index.skipped.total == 1
    (root / "test.csv").write_text("")
    with pytest.raises(DataError, match="split 'test' is empty"):
        build_loader(config(root, on_error="skip"), "test", backend="naive")


def _reencode(synth, tmp_path, codec, pix_fmt, container="matroska", suffix=".webm", colour=False):
    """A copy of the embedded dataset with every video re-encoded (`colour`: blended with a colour
    gradient, so chroma varies across the frame as in real footage)."""
    import av

    root, _ = broken_copy(synth, tmp_path, lambda r, c: c.files["visual"])
    index = read_layout(root, "crema_d")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    gradient = np.stack([xx * 255 // SIZE, yy * 255 // SIZE, 255 - (xx + yy) * 127 // SIZE], -1)
    for clip in [c for clips in index.splits.values() for c in clips]:
        src = clip.files["visual"]
        with av.open(str(src)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        src.unlink()
        with av.open(str(src.with_suffix(suffix)), "w", format=container) as out:
            stream = out.add_stream(codec, rate=FPS)
            stream.width = stream.height = SIZE
            stream.pix_fmt = pix_fmt
            for frame in frames:
                frame = ((frame.astype(np.int32) + gradient) // 2).astype(np.uint8) if colour else frame
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return root


@pytest.mark.parametrize("pix_fmt", ["yuvj420p", "yuvj422p"])
def test_mjpeg_frames_agree_within_one_level(synth, tmp_path, pix_fmt):
    """MJPEG is full-range YUV with subsampled chroma; the naive loader converts it the way DALI's
    JPEG decoder does (it used to go through swscale: up to 29 levels apart)."""
    root = _reencode(synth, tmp_path, "mjpeg", pix_fmt, container="avi", suffix=".avi", colour=True)
    cfg = config(root, device="cpu")
    loader = build_loader(cfg, "test", backend="dali")
    assert loader.pyav_modalities == set()  # CPU DALI decodes MJPEG itself
    dali, naive = collect(loader), collect(build_loader(cfg, "test", backend="naive"))
    std = torch.tensor(FRAMES.std).view(1, 1, 3, 1, 1) * 255
    pixel_diff = (dali["visual"] - naive["visual"]).abs() * std
    assert pixel_diff.max() <= 1.01 and pixel_diff.mean() < 0.05


def test_codecs_cpu_dali_cannot_decode_fall_back_to_pyav(synth, tmp_path):
    # Every clip re-encoded with MPEG-4 Part 2, which DALI decodes only on a GPU.
    root = _reencode(synth, tmp_path, "mpeg4", "yuv420p")
    cfg = config(root, device="cpu")
    loader = build_loader(cfg, "test", backend="dali")
    assert loader.pyav_modalities == {"visual"}
    dali, naive = collect(loader), collect(build_loader(cfg, "test", backend="naive"))
    assert torch.equal(dali["index"], naive["index"])
    std = torch.tensor(FRAMES.std).view(1, 1, 3, 1, 1) * 255
    assert ((dali["visual"] - naive["visual"]).abs() * std).max() < 0.01  # the same PyAV frames
    assert (dali["audio"] - naive["audio"]).abs().max() < 1e-3


def test_bad_config_values():
    with pytest.raises(ValueError, match="on_error"):
        build_loader(DataConfig(root=".", on_error="ignore"), "train")
    with pytest.raises(ValueError, match="backend"):
        build_loader(DataConfig(root="."), "train", backend="opencv")
    with pytest.raises(DataError, match="dataset root is not a directory"):
        build_loader(DataConfig(root="/nonexistent/mmfast"), "train", backend="naive")


def _research_tree(synth, root, layout):
    """Rewrites the embedded dataset (frames + wav) in another research-code layout; returns
    {clip id: label name} of the test split."""
    index = read_layout(synth, "crema_d")
    expected = {}
    lists = {}
    for split, clips in index.splits.items():
        for n, c in enumerate(clips):
            label = index.classes[c.label]
            sample = f"yt{n:03d}{split}_{30 + n:06d}" if layout == "vggsound" else c.clip_id
            if layout == "ave":
                shutil.copytree(c.files["visual"], root / "visual" / sample)
                (root / "audio").mkdir(parents=True, exist_ok=True)
                shutil.copy(c.files["audio"], root / "audio" / f"{sample}.wav")
            else:
                shutil.copytree(c.files["visual"], root / split / sample)
                shutil.copy(c.files["audio"], root / split / sample / f"{sample}.wav")
            lists.setdefault(split, []).append((sample, label, n))
            if split == "test":
                expected[sample] = label
    if layout == "kinetics_sounds":
        for split, rows in lists.items():
            (root / f"{split}.csv").write_text("".join(f"{s},{lab}\n" for s, lab, _ in rows))
    elif layout == "vggsound":
        rows = [r for split in ("train", "test") for r in ((s.rsplit("_", 1)[0], 30 + n, lab, split)
                                                             for s, lab, n in lists[split])]
        (root / "vggsound.csv").write_text("".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows))
    else:
        for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
            body = "".join(f"{lab}&{s}&good&0&10\n" for s, lab, _ in lists[split])
            (root / name).write_text("Category&VideoID&Quality&StartTime&EndTime\n" + body)
    shutil.copy(synth / "classes.txt", root / "classes.txt")
    return expected


@pytest.mark.parametrize("layout", ["kinetics_sounds", "vggsound", "ave"])
def test_research_layouts(synth, tmp_path, layout):
    root = tmp_path / layout
    root.mkdir()
    expected = _research_tree(synth, root, layout)
    index = read_layout(root, layout)
    assert index.kinds == {"audio": "audio", "visual": "frames"}
    got = {c.clip_id: index.classes[c.label] for c in index.splits["test"]}
    assert got == expected
    for backend in ("dali", "naive"):
        loader = build_loader(config(root, layout=layout), "test", backend=backend)
        batch = collect(loader)
        assert batch["audio"].shape[1:] == (257, 188) and batch["visual"].shape[1:] == (3, 3, SIZE, SIZE)
        ids = [loader.clips[i].clip_id for i in batch["index"]]
        assert [index.classes[int(lab)] for lab in batch["label"]] == [expected[i] for i in ids]
    (root / ("vggsound.csv" if layout == "vggsound" else "train.csv" if layout == "kinetics_sounds"
             else "trainSet.txt")).unlink()
    with pytest.raises(DataError, match="missing"):
        read_layout(root, layout)


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


# --- clip lists -------------------------------------------------------------------------------------

@pytest.fixture
def lists_copy(synth, tmp_path):
    """A copy of the embedded dataset's lists and audio (layouts are read, nothing decoded)."""
    root = tmp_path / "lists"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS", "*.webm"))
    (root / "VideoFlash").mkdir(exist_ok=True)
    for clip_id, _ in _rows(root / "train.csv") + _rows(root / "test.csv") + _rows(root / "val.csv"):
        (root / "VideoFlash" / f"{clip_id}.webm").write_bytes(b"")
    return root


def _rows(path):
    return [tuple(line.split(",")) for line in path.read_text().splitlines() if line] if path.exists() else []


def _generic_copy(root):
    index = read_layout(root, "crema_d")
    rows = [(c.clip_id, index.classes[c.label], split) for split, clips in index.splits.items() for c in clips]
    for folder in ("AudioWAV", "VideoFlash"):
        (root / folder).rename(root / folder.lower())
    return rows


def _write_generic(root, lines):
    (root / "clips.csv").write_text("\n".join(lines) + "\n")
    return root


GENERIC = {"audiowav": "audio", "videoflash": "video"}


def test_lists_with_a_byte_order_mark_crlf_and_upper_case_extensions_read_as_plain_ones(lists_copy):
    plain = read_layout(lists_copy, "crema_d")
    for name in ("train.csv", "test.csv", "val.csv"):
        path = lists_copy / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    (lists_copy / "classes.txt").write_text("\ufeff" + "\r\n".join(plain.classes) + "\r\n", encoding="utf-8")
    first = plain.splits["train"][0]
    upper = first.files["audio"].with_suffix(".WAV")
    first.files["audio"].rename(upper)
    index = read_layout(lists_copy, "crema_d")
    assert index.classes == plain.classes and index.skipped.total == 0
    for split in plain.splits:
        assert [(c.clip_id, c.label) for c in index.splits[split]] == [(c.clip_id, c.label) for c in plain.splits[split]]
    assert index.splits["train"][0].files["audio"] == upper


@pytest.mark.parametrize("line,reason", [
    ("no_comma_here", "expected '<clip>,<label>"), ("{clip},", "empty label"), (",{label}", "empty clip id"),
    ("{clip},{label}", "duplicate clip"), ("{clip},{other}", "conflicting labels"),
])
@pytest.mark.parametrize("layout", ["crema_d", "generic"])
def test_malformed_list_lines_are_named_or_skipped_per_split(lists_copy, line, reason, layout):
    plain = read_layout(lists_copy, "crema_d")
    victim = plain.splits["train"][3]
    label, other = plain.classes[victim.label], plain.classes[(victim.label + 1) % len(plain.classes)]
    bad = line.format(clip=victim.clip_id, label=label, other=other)
    if layout == "generic":
        rows = _generic_copy(lists_copy)
        _write_generic(lists_copy, ["clip,label,split"] + [",".join(r) for r in rows] + [bad])
        lineno, kw = len(rows) + 2, {"modalities": GENERIC}
        list_file = lists_copy / "clips.csv"
    else:
        list_file = lists_copy / "train.csv"
        lineno, kw = len(_rows(list_file)) + 1, {}
        with list_file.open("a") as f:
            f.write(bad + "\n")
    with pytest.raises(DataError, match=reason) as info:
        read_layout(lists_copy, layout, **kw)
    assert info.value.path == f"{list_file}:{lineno}"
    index = read_layout(lists_copy, layout, on_error="skip", **kw)
    assert "" not in index.classes
    train_ids = [c.clip_id for c in index.splits["train"]]
    expected = len(plain.splits["train"]) - (1 if reason == "conflicting labels" else 0)
    assert len(train_ids) == len(set(train_ids)) == expected
    both = 2 if reason == "conflicting labels" else 1  # both listings of a clip with two labels
    assert index.skipped_in("train").total == both and index.skipped_in("test").total == 0


def test_a_clip_in_two_splits_is_refused_unless_allowed(lists_copy):
    clip_id, label = _rows(lists_copy / "train.csv")[0]
    with (lists_copy / "test.csv").open("a") as f:
        f.write(f"{clip_id},{label}\n")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match="in split 'test' and in split 'train'.*allow_overlap"):
            read_layout(lists_copy, "crema_d", on_error=on_error)
    index = read_layout(lists_copy, "crema_d", allow_overlap=True)
    assert clip_id in [c.clip_id for c in index.splits["test"]]


def test_extra_columns_are_ignored_with_one_warning(lists_copy, caplog):
    path = lists_copy / "train.csv"
    path.write_text("".join(f"{c},{lab},extra,more\n" for c, lab in _rows(path)))
    with caplog.at_level("WARNING", logger="mmfast.data"):
        index = read_layout(lists_copy, "crema_d")
    warnings = [r for r in caplog.records if "columns" in r.getMessage()]
    assert len(warnings) == 1 and "train.csv" in warnings[0].getMessage()
    assert len(index.splits["train"]) == len(_rows(path))


def test_vggsound_malformed_line_is_skipped_under_skip(synth, tmp_path):
    root = tmp_path / "vggsound"
    root.mkdir()
    _research_tree(synth, root, "vggsound")
    with (root / "vggsound.csv").open("a") as f:
        f.write("abc,notanumber,label,test\n")
    with pytest.raises(DataError, match="expected '<youtube id>"):
        read_layout(root, "vggsound")
    index = read_layout(root, "vggsound", on_error="skip")
    assert index.skipped_in("test").total == 1 and index.skipped_in("train").total == 0


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


@pytest.mark.parametrize("visual", ["video", "frames"])
@pytest.mark.parametrize("train", [False, True])
def test_gpu_pipeline_is_well_formed(synth, tmp_path, visual, train):
    """Without a GPU the GPU pipeline cannot run, but defining it checks every GPU-side operator
    and argument (mixed decoders, GPU spectrogram and transforms)."""
    from nvidia.dali.pipeline import Pipeline

    root = synth
    if visual == "video":
        root = tmp_path / "videos_only"
        shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    loader = build_loader(config(root, device="cpu"), "test", backend="dali", train=train)
    assert isinstance(loader._define(gpu=True), Pipeline)


def test_skipped_clip_is_named_in_full_when_its_path_holds_a_colon(synth, tmp_path):
    root = tmp_path / "takes: 2"  # the skip report used to cut paths at the first ": "
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    for workers in (0, 1):
        loader = build_loader(config(root, on_error="skip", num_workers=workers), "train", backend="naive")
        broken = loader.clips[0].files["audio"]
        broken.write_bytes(b"not audio any more")
        collect(loader)
        report = loader.last_epoch_skipped
        assert report.total == 1 and report.examples[0].startswith(f"{broken}: corrupt audio"), report.examples
        assert "corrupt audio" in report.counts
        shutil.copy(synth / broken.relative_to(root), broken)


def _break_audio(clip):
    path = clip.files["audio"]
    path.write_bytes(b"RIFF" + path.read_bytes()[4:40] + b"garbage")  # a header, no samples
    return path


def _break_frames(clip):
    for path in clip.frame_files["visual"]:
        path.write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 13)  # a 17-byte JPEG
    first = segment_indices(len(clip.frame_files["visual"]), FRAMES.num_frames, False, None)[0]
    return clip.frame_files["visual"][first]  # the first one decoded (evaluation: segment centres)


def _cut_video(clip):
    path = clip.files["visual"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # the later frames' packets are gone
    return path


def _remove_audio_file(clip):
    clip.files["audio"].unlink()
    return clip.files["audio"]


@pytest.mark.parametrize("break_fn,reason", [(_break_audio, "too short"), (_break_frames, "corrupt image"),
                                             (_cut_video, "truncated video"), (_remove_audio_file, "missing file")])
@pytest.mark.parametrize("backend,workers", [("dali", 2), ("naive", 0), ("naive", 1)])
def test_clip_that_breaks_during_an_epoch_is_named_or_skipped(synth, tmp_path, break_fn, reason, backend, workers):
    """A clip that probed fine but fails while the epoch runs: on_error="raise" names the clip's
    broken file (also from a worker process, also inside a DALI batch); "skip" leaves out that
    clip alone, counts it in the epoch's report and keeps every other clip of the batch and the
    epoch, bitwise as decoded without the fault."""
    root = tmp_path / "data"
    shutil.copytree(synth, root, ignore=None if break_fn is _break_frames else shutil.ignore_patterns("Image-01-FPS"))
    loaders = {mode: build_loader(config(root, on_error=mode, batch_size=3, num_workers=workers), "val",
                                  backend=backend) for mode in ("raise", "skip")}
    clean = collect(loaders["skip"])
    victim = loaders["skip"].clips[1]  # inside the first batch, not its first clip
    broken = break_fn(victim)
    with pytest.raises(DataError, match=reason) as info:
        collect(loaders["raise"])
    assert info.value.path == str(broken) and info.value.clip == victim.clip_id
    got = collect(loaders["skip"])
    keep = clean["index"] != 1
    assert got.keys() == clean.keys() and all(torch.equal(got[k], clean[k][keep]) for k in got)
    report = loaders["skip"].last_epoch_skipped
    assert report.total == 1 and report.names == [victim.clip_id] and reason in report.summary()
    collect(loaders["skip"])  # the next epoch meets it again and counts it again, alone
    assert loaders["skip"].last_epoch_skipped.total == 1
    del info  # (the raised error and its traceback hold the loader: they leave no cycle behind)
    drop_loaders_and_check_workers_exit(loaders)


@pytest.mark.parametrize("backend", ["dali", "naive"])
def test_an_interrupted_pass_does_not_shorten_the_next_one(synth, backend):
    loader = build_loader(config(synth, batch_size=2, num_workers=1), "val", backend=backend)
    full = collect(loader)
    stale = iter(loader)
    next(stale)  # abandoned after one batch, with more decoded ahead
    again = collect(loader)
    assert all(torch.equal(again[k], full[k]) for k in full)
    assert again["index"].tolist() == list(range(len(loader.clips)))
    with pytest.raises(RuntimeError, match="stale"):
        next(stale)


def drop_loaders_and_check_workers_exit(loaders: dict) -> None:
    """Empties `loaders` with the garbage collector off: each loader must be freed at once (it
    is in no reference cycle) and the naive loaders' persistent workers must have exited
    cleanly (exit code 0). (Freed by the garbage collector, a DataLoader's queues are closed
    before its iterator tells the workers to stop; each worker was then waited on for 5 s and
    killed.)"""
    import gc
    import weakref

    workers = [w for ld in loaders.values() if getattr(getattr(ld, "loader", None), "_iterator", None)
               for w in ld.loader._iterator._workers]
    assert all(w.is_alive() for w in workers)
    refs = {name: weakref.ref(ld) for name, ld in loaders.items()}
    gc.disable()
    try:
        loaders.clear()
        assert [name for name, ref in refs.items() if ref() is not None] == [], "loaders in a reference cycle"
    finally:
        gc.enable()
    assert [w.exitcode for w in workers] == [0] * len(workers)  # stopped, not killed


def test_a_dropped_naive_loader_stops_its_workers_at_once(synth):
    loaders = {"val": build_loader(config(synth, batch_size=2, num_workers=2), "val", backend="naive")}
    collect(loaders["val"])
    assert len(loaders["val"].loader._iterator._workers) == 2
    drop_loaders_and_check_workers_exit(loaders)


@pytest.mark.parametrize("backend", ["dali", "naive"])
def test_a_pass_can_start_at_any_batch_of_the_epoch(synth, backend):
    loader = build_loader(config(synth, batch_size=3), "train", backend=backend)
    loader.epoch = 2  # the epoch picks the order (as a resumed run sets it)
    full = list(loader.batches())
    assert loader.epoch == 3
    loader.epoch = 2
    tail = list(loader.batches(start=3))
    assert loader.position == len(loader) and len(tail) == len(full) - 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full[3:], tail) for k in a)
    with pytest.raises(ValueError, match="start must be a batch number"):
        loader.batches(start=len(loader) + 1)


def test_dali_and_naive_pick_the_same_training_samples(synth):
    """Window starts, frame indices, crop boxes and flips come from one (seed, epoch, clip)
    generator in both loaders: training batches agree up to the resamplers' rounding."""
    cfg = config(synth, frames=FrameRecipe(num_frames=3, size=24), num_workers=1)
    dali, naive = (build_loader(cfg, "train", backend=b) for b in ("dali", "naive"))
    dali.epoch = naive.epoch = 1
    a, b = collect(dali), collect(naive)
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
    assert (a["audio"] - b["audio"]).abs().max() < 1e-3
    std = torch.tensor(cfg.frames.std).view(1, 1, 3, 1, 1) * 255
    pixel_diff = (a["visual"] - b["visual"]).abs() * std
    assert pixel_diff.max() <= 8 and pixel_diff.mean() < 0.5  # crop-and-resize of JPEG frames


def test_frame_folders_are_probed_frame_by_frame(synth, tmp_path):
    root = tmp_path / "frames"
    shutil.copytree(synth, root)
    clip = read_layout(root, "crema_d").splits["test"][0]
    frames = sorted(clip.files["visual"].iterdir())
    frames[-1].write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 13)
    with pytest.raises(DataError, match="corrupt image") as info:
        build_loader(config(root), "test", backend="naive")
    assert info.value.path == str(frames[-1])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(frames[-1], format="JPEG")
    with pytest.raises(DataError, match="differs from the folder's first frame"):
        build_loader(config(root), "test", backend="naive")


def test_synth_modalities_are_complementary():
    from mmfast.data.synth import SynthSpec

    spec = SynthSpec(clips=4000, dominant="visual", dominant_missing=0.3, weak_missing=0.1, seed=3)
    has = np.array([spec.signatures(i) for i in range(spec.clips)])  # columns: audio, visual
    assert has.any(axis=1).all()  # every clip keeps at least one signature
    assert abs((~has[:, 1]).mean() - 0.3) < 0.03 and abs((~has[:, 0]).mean() - 0.1) < 0.03
    with pytest.raises(ValueError, match="sum below 1"):
        SynthSpec(dominant_missing=0.6, weak_missing=0.5).check()

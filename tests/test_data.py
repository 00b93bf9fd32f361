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


def test_codecs_cpu_dali_cannot_decode_fall_back_to_pyav(synth, tmp_path):
    import av

    root, _ = broken_copy(synth, tmp_path, lambda r, c: c.files["visual"])
    # Re-encode every clip with MPEG-4 Part 2, which DALI decodes only on a GPU.
    index = read_layout(root, "crema_d")
    for clip in [c for clips in index.splits.values() for c in clips]:
        src = clip.files["visual"]
        with av.open(str(src)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        with av.open(str(src), "w", format="matroska") as out:
            stream = out.add_stream("mpeg4", rate=FPS)
            stream.width = stream.height = SIZE
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
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


def _remove_audio_file(clip):
    clip.files["audio"].unlink()
    return clip.files["audio"]


@pytest.mark.parametrize("break_fn,reason", [(_break_audio, "too short"), (_break_frames, "corrupt image"),
                                             (_remove_audio_file, "missing file")])
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

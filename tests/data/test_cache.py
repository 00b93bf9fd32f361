"""The decoded-sample cache (mmfast/data/cache.py, dali_cache.py): a cached epoch gives the very
samples an uncached one gives; entries are keyed by their sources and recipe, checked, rebuilt
when damaged, bounded by a budget, safe to build from two processes at once."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from datasupport import FRAMES, collect, config
from mmfast.data import AudioRecipe, DataError, build_loader
from mmfast.data.cache import CacheStore

pytest.importorskip("nvidia.dali")


def videos_only(synth, tmp_path):
    root = tmp_path / "videos_only"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    return root


@pytest.fixture
def video_root(synth, tmp_path):
    return videos_only(synth, tmp_path)


def entries(folder: Path) -> list:
    return sorted(folder.glob("??/*.npy"))


def assert_same_batches(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --- the same samples ----------------------------------------------------------------------------

@pytest.mark.parametrize("visual", ["video", "frames"])
@pytest.mark.parametrize("split,train", [("train", True), ("test", False)])
@pytest.mark.parametrize("ahead", [False, True])
def test_cached_epochs_give_the_uncached_samples_bit_for_bit(synth, tmp_path, visual, split, train, ahead):
    """Training (random frames, crops and flips) and evaluation: every epoch from the cache (the
    first decodes and writes, the next read only) equals the uncached loader's epoch; prepared in
    the source (a CPU device) or ahead in a thread (as on a GPU)."""
    root = videos_only(synth, tmp_path) if visual == "video" else synth
    cfg = config(root, batch_size=4, num_workers=2)
    plain = build_loader(cfg, split, train=train)
    cached = build_loader(replace(cfg, cache=str(tmp_path / "cache")), split, train=train)
    assert cached.cached.prepare_ahead is False  # (the default on a CPU device)
    cached.cached.prepare_ahead = ahead
    n = len(cached.clips)
    for epoch in range(3):
        assert_same_batches(collect(cached), collect(plain))
        if epoch == 0:
            assert cached.cached.decoded == 2 * n and len(entries(tmp_path / "cache")) == 2 * n
    assert cached.cached.decoded == 2 * n  # (later epochs decoded nothing)
    assert cached.cached.store.reads == 2 * 2 * n
    # a new loader (another run) reads the entries, checking each in full once
    again = build_loader(replace(cfg, cache=str(tmp_path / "cache")), split, train=train)
    assert_same_batches(collect(again), collect(build_loader(cfg, split, train=train)))
    assert again.cached.decoded == 0 and again.cached.store.damaged == 0


def test_entries_hold_the_deterministic_decoding_and_the_draws_are_the_uncached_ones(video_root, tmp_path):
    """A training entry holds every frame of the clip, each equal to what the uncached pipeline
    decodes at that index; the source's random parts (window start, frame indices, crop box,
    flip) are the uncached loader's draws for the same (seed, epoch, clip)."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    cfg = config(video_root, batch_size=4, num_workers=1, frames=replace(FRAMES, num_frames=1))
    plain = build_loader(cfg, "train")
    cached = build_loader(replace(cfg, cache=str(tmp_path / "cache")), "train")
    collect(cached)
    clip = cached.clips[2]
    entry = cached.cached.entry(2, "visual", "video", cached.draw(2, 0)["visual"])
    frames = cached.cached.store.read(entry.key)
    assert frames.shape == (clip.num_frames["visual"], *clip.frame_sizes["visual"][::-1], 3)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode_one():
        data = fn.external_source(name="bytes")
        return fn.decoders.video(data, device="cpu", frames=fn.external_source(name="frames"), pad_mode="none")

    pipe = decode_one()
    pipe.build()
    for k in range(clip.num_frames["visual"]):
        pipe.feed_input("bytes", [np.fromfile(clip.files["visual"], np.uint8)])
        pipe.feed_input("frames", [np.array([k], np.int32)])
        (out,) = pipe.run()
        assert np.array_equal(np.asarray(out[0])[0], frames[k]), k
    # the audio entry: the spectrogram of the fixed window (CREMA-D: the whole looped clip)
    audio = cached.cached.store.read(cached.cached.entry(2, "audio", "audio", cached.draw(2, 0)["audio"]).key)
    assert audio.shape == cfg.audio.shape and audio.dtype == np.float32
    for epoch in (0, 1):
        for i in range(len(plain.clips)):
            fields = dict(zip(plain.fields, plain.encode(i, epoch)))
            mine = dict(zip(cached.fields, cached.cached.prepare([i], epoch)[0]))
            for name in ("roi_start", "roi_end", "mirror"):
                assert np.array_equal(fields["visual", name], mine["visual", name]), (epoch, i, name)
            full = cached.cached.store.read(cached.cached.entry(i, "visual", "video", cached.draw(i, epoch)["visual"]).key)
            assert np.array_equal(mine["visual", "frames"], full[fields["visual", "frames"]]), (epoch, i)


def test_a_random_window_caches_the_waveform(synth, tmp_path):
    """VGGSound-like recipe (a 1.5 s window of the clip looped to 3 s, drawn per epoch): entries
    hold the resampled waveform, the window and spectrogram are computed every epoch, and the
    samples equal the uncached ones."""
    root = videos_only(synth, tmp_path)
    cfg = config(root, batch_size=4, num_workers=1, audio=AudioRecipe(sample_rate=16000, loop_to=3.0, duration=1.5))
    plain = build_loader(cfg, "train")
    cached = build_loader(replace(cfg, cache=str(tmp_path / "cache")), "train")
    assert cached.cached.contents["audio"]["what"] == "audio-wave"
    for _ in range(2):
        assert_same_batches(collect(cached), collect(plain))
    wave = cached.cached.store.read(cached.cached.entry(0, "audio", "audio", cached.draw(0, 0)["audio"]).key)
    assert wave.ndim == 1 and abs(len(wave) / 16000 - cached.clips[0].audio_seconds["audio"]) < 0.01


# --- keys ----------------------------------------------------------------------------------------

def test_a_changed_file_or_recipe_is_decoded_again(video_root, tmp_path):
    cfg = replace(config(video_root, batch_size=4), cache=str(tmp_path / "cache"))
    loader = build_loader(cfg, "val")
    collect(loader)
    before = set(entries(tmp_path / "cache"))
    victim = loader.clips[1].files["audio"]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    again = build_loader(cfg, "val")
    collect(again)
    assert again.cached.decoded == 1  # that clip's audio alone
    assert len(set(entries(tmp_path / "cache")) - before) == 1
    # rewritten with the same size and its old modification time put back (as `cp -p`, `rsync -a`
    # leave a copy): the change time still differs
    other = loader.clips[2].files["audio"]
    st = other.stat()
    other.write_bytes(other.read_bytes())
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (other.stat().st_size, other.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    third = build_loader(cfg, "val")
    collect(third)
    assert third.cached.decoded == 1
    # another recipe (hop length): every audio entry is new, the frames' stay
    other = build_loader(replace(cfg, audio=replace(cfg.audio, hop_length=300)), "val")
    collect(other)
    assert other.cached.decoded == len(other.clips)


def test_prune_keeps_only_the_config_s_entries(video_root, tmp_path):
    from mmfast.data.dali_cache import build_cache

    cfg = replace(config(video_root, batch_size=4, num_workers=1), cache=str(tmp_path / "cache"))
    first = build_cache(cfg, progress=False)
    clips = sum(r["clips"] for k, r in first.items() if k != "cache")
    assert first["cache"]["entries"] == 2 * clips and not any(r["failed"] for k, r in first.items() if k != "cache")
    assert build_cache(cfg, progress=False)["train"]["written"] == 0  # (nothing missing)
    stale = build_loader(replace(cfg, audio=replace(cfg.audio, hop_length=300)), "val")
    collect(stale)
    pruned = build_cache(cfg, ["train"], progress=False, prune=True)  # (the other splits' entries stay)
    assert pruned["cache"]["removed"] == len(stale.clips) and pruned["cache"]["entries"] == 2 * clips
    with pytest.raises(ValueError, match="no split"):
        build_cache(cfg, ["nope"], progress=False)


# --- damage, budget, concurrency -------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no end record"])
def test_a_damaged_entry_is_detected_removed_and_decoded_again(video_root, tmp_path, damage):
    cfg = replace(config(video_root, batch_size=4), cache=str(tmp_path / "cache"))
    clean = collect(build_loader(replace(cfg, cache="off"), "val"))
    collect(build_loader(cfg, "val"))
    victim = entries(tmp_path / "cache")[3]
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[:-16]
    victim.write_bytes(bytes(data))
    (victim.parent / f"{victim.name}.tmp-99999").write_bytes(b"half an entry")  # a killed build's
    loader = build_loader(cfg, "val")
    assert_same_batches(collect(loader), clean)
    assert loader.cached.store.damaged == 1 and loader.cached.decoded == 1
    assert loader.cached.store.read(victim.stem) is not None  # rebuilt, whole
    assert len(entries(tmp_path / "cache")) == 2 * len(loader.clips)


def test_store_refuses_unusable_folders_and_budgets(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot use .*file.* as a cache folder"):
        CacheStore(tmp_path / "file", 1.0)
    with pytest.raises(ValueError, match="cache_max_gb must be >= 0"):
        CacheStore(tmp_path / "c", -1.0)
    with pytest.raises(ValueError, match="cache_max_gb must be a finite number"):
        build_loader(replace(config(tmp_path), cache=str(tmp_path / "c"), cache_max_gb=float("nan")), "train")
    with pytest.raises(ValueError, match="decoded-sample cache is read by the DALI backend"):
        build_loader(replace(config(tmp_path), cache=str(tmp_path / "c")), "train", backend="naive")


def test_store_entries_are_standard_npy_files_that_round_trip(tmp_path, gen):
    store = CacheStore(tmp_path / "c", 1.0)
    arrays = {"a" * 40: torch.randn(7, 5, generator=gen).numpy(), "b" * 40: np.arange(24, dtype=np.uint8).reshape(2, 3, 4)}
    assert store.write_many(list(arrays.items())) == [True, True]
    fresh = CacheStore(tmp_path / "c", 1.0)  # (another process: checks each entry in full)
    for key, array in arrays.items():
        assert np.array_equal(np.load(fresh.path(key)), array)  # NumPy reads it as it is
        assert np.array_equal(fresh.read(key), array) and np.array_equal(fresh.read(key, rows=[1, 0]), array[[1, 0]])
    assert fresh.usage()["entries"] == 2 and fresh.damaged == 0


def test_beyond_the_budget_clips_are_decoded_every_epoch(video_root, tmp_path):
    cfg = config(video_root, batch_size=4)
    clean = build_loader(cfg, "train")
    budget = 3 * 210_000 / 1e9  # about three clips' entries (a spectrogram: 193 kB)
    cached = build_loader(replace(cfg, cache=str(tmp_path / "cache"), cache_max_gb=budget), "train")
    first = collect(cached)
    assert_same_batches(first, collect(clean))
    written = len(entries(tmp_path / "cache"))
    assert 0 < written < 2 * len(cached.clips) and cached.cached.store.full
    assert sum(p.stat().st_size for p in entries(tmp_path / "cache")) <= budget * 1e9
    decoded = cached.cached.decoded
    units, decode = [], cached.cached._decode
    cached.cached._decode = lambda m, kind, todo: units.append((m, [len(ix or ()) for _, ix in todo])) or decode(m, kind, todo)
    assert_same_batches(collect(cached), collect(clean))
    assert cached.cached.decoded - decoded == 2 * len(cached.clips) - written  # the rest, decoded again
    # ... as without a cache: the chosen frames (T = 3), not every frame of the clip
    assert {n for m, lengths in units if m == "visual" for n in lengths} == {FRAMES.num_frames}


def test_two_processes_building_one_cache_at_once(video_root, tmp_path):
    """`mmfast data cache` twice at the same time on one folder: both succeed, every entry is
    whole (a third reader finds none damaged) and the samples are the uncached ones."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "mmfast", "data", "cache", "--config", "embedded", "--workers", "1", "--no-progress",
           f"data.root={video_root}", f"data.cache={cache}", "data.size=64", "data.batch_size=4"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    clips = sum(len(build_loader(config(video_root), s, train=False).clips) for s in ("train", "val", "test"))
    assert all(f"{2 * clips} entries" in out for out in outs), outs
    cfg = replace(config(video_root, batch_size=4, frames=replace(FRAMES, num_frames=1, size=64)), cache=str(cache))
    for split in ("train", "test"):
        loader = build_loader(cfg, split)
        assert_same_batches(collect(loader), collect(build_loader(replace(cfg, cache="off"), split)))
        assert loader.cached.decoded == 0 and loader.cached.store.damaged == 0
    assert not list(cache.glob("??/*.tmp-*"))


# --- faults ----------------------------------------------------------------------------------------

def test_a_video_whose_later_frames_are_gone_is_decoded_as_without_a_cache(video_root, tmp_path):
    """Training entries hold every frame; a clip whose later frames cannot be decoded (cut after
    probing) is not cached: the uncached loader's chosen frames are decoded each epoch, and it
    fails exactly when the uncached loader fails (here: named, or skipped and counted)."""
    cfg = config(video_root, batch_size=4, frames=replace(FRAMES, num_frames=1), on_error="skip")
    plain = build_loader(cfg, "train")
    cached = build_loader(replace(cfg, cache=str(tmp_path / "cache")), "train")
    victim = cached.clips[0].files["visual"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 9 // 10])  # (its last frames)
    skipped = []
    for _ in range(3):
        got, want = collect(cached), collect(plain)
        assert_same_batches(got, want)
        assert cached.last_epoch_skipped.names == plain.last_epoch_skipped.names
        skipped.append(cached.last_epoch_skipped.total)
    assert skipped == [0, 0, 1]  # (this seed: its chosen frame is there twice, then gone)
    assert (0, "visual") in cached.cached.uncacheable  # (its chosen frame decoded in some epoch: not cached)
    draw = cached.draw(0, cached.epoch)["visual"]
    assert cached.cached.entry(0, "visual", "video", draw).key is None


def test_a_missing_file_raises_the_uncached_loader_s_error(video_root, tmp_path):
    cfg = replace(config(video_root, batch_size=4), cache=str(tmp_path / "cache"))
    loader = build_loader(cfg, "val")
    collect(loader)  # (its entries exist: a vanished source is still an error, as without a cache)
    loader.clips[2].files["audio"].unlink()
    with pytest.raises(DataError, match="missing file") as info:
        collect(loader)
    assert info.value.path == str(loader.clips[2].files["audio"]) and info.value.clip == loader.clips[2].clip_id


@pytest.mark.parametrize("visual", ["video", "frames"])
@pytest.mark.parametrize("train", [False, True])
def test_cached_gpu_pipelines_are_well_formed(synth, tmp_path, visual, train):
    """Without a GPU the GPU graphs cannot run, but defining them checks their operators and
    arguments: the training pipeline fed decoded clips, and the decoding pipelines (mixed
    decoders, the GPU spectrogram of fixed windows)."""
    from nvidia.dali.pipeline import Pipeline

    root = videos_only(synth, tmp_path) if visual == "video" else synth
    loader = build_loader(replace(config(root), cache=str(tmp_path / "cache")), "test", train=train)
    assert isinstance(loader._define(gpu=True), Pipeline)
    assert isinstance(loader.cached._define("audio", "audio", ["bytes", "start"], gpu=True), Pipeline)
    inputs = ["jpeg"] if visual == "frames" else ["bytes", "frames"]
    assert isinstance(loader.cached._define(visual, "visual", inputs, gpu=True), Pipeline)


def test_auto_falls_back_to_no_cache_where_the_folder_is_unusable(video_root, tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path / "a_file"))
    loader = build_loader(replace(config(video_root), cache="auto"), "val")
    assert loader.cached is None and "decoding every epoch without a cache" in caplog.text
    with pytest.raises(ValueError, match="cannot use"):  # (a folder named by the user is not best effort)
        build_loader(replace(config(video_root), cache=str(tmp_path / "a_file")), "val")
    from mmfast.data.dali_cache import build_cache

    with pytest.raises(ValueError, match="cache folder cannot be used"):
        build_cache(replace(config(video_root), cache="auto"), progress=False)


def test_a_full_disk_while_writing_ends_the_writes_not_the_run(video_root, tmp_path, monkeypatch):
    import errno

    cfg = config(video_root, batch_size=4)
    cached = build_loader(replace(cfg, cache=str(tmp_path / "cache")), "train")

    def full(self, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CacheStore, "_write_usage", full)  # (after the first batch's entries fit)
    assert_same_batches(collect(cached), collect(build_loader(cfg, "train")))
    assert cached.cached.store.full and not list((tmp_path / "cache").glob("??/*.tmp-*"))


def test_an_interrupted_pass_and_a_dropped_loader_stop_the_ahead_thread(video_root, tmp_path):
    import gc
    import threading

    cfg = replace(config(video_root, batch_size=2), cache=str(tmp_path / "cache"))
    loader = build_loader(cfg, "val")
    loader.cached.prepare_ahead = True
    full = collect(loader)
    stale = iter(loader)
    next(stale)  # abandoned after one batch, with more prepared ahead
    assert_same_batches(collect(loader), full)
    next(iter(loader))  # abandoned again; then the loader is dropped mid-pass
    gc.disable()
    try:
        del loader, stale
        alive = [t for t in threading.enumerate() if t.name == "mmfast-cache-ahead"]
    finally:
        gc.enable()
    assert alive == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("visual", ["video", "frames"])
def test_cached_gpu_epochs_give_the_uncached_samples(synth, tmp_path, visual):
    """On a GPU (mixed decoders, the spectrogram and transforms on the device, batches prepared
    ahead by a thread): video frames and audio bit for bit; JPEG frames within the rounding of
    the hardware JPEG decoder, which DALI hands part of each batch to (docs/data.md)."""
    root = videos_only(synth, tmp_path) if visual == "video" else synth
    cfg = config(root, batch_size=4, num_workers=2, device="cuda")
    plain = build_loader(cfg, "train")
    cached = build_loader(replace(cfg, cache=str(tmp_path / "cache")), "train")
    assert cached.cached.prepare_ahead
    for _ in range(2):
        got, want = collect(cached), collect(plain)
        assert got.keys() == want.keys() and got["visual"].is_cuda and got["audio"].is_cuda
        for k in ("audio", "label", "index") + (("visual",) if visual == "video" else ()):
            assert torch.equal(got[k], want[k]), k
        pixel = 1 / (255 * min(FRAMES.std))
        assert (got["visual"] - want["visual"]).abs().max() <= 4 * pixel

"""The loaders (mmfast/data/dali_loader.py, naive.py, base.py): DALI against the naive reference,
training batches and plans, bad clips at probe and during an epoch, interrupted passes, workers, GPU
pipelines well-formed."""
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from mmfast.data import DataConfig, DataError, FrameRecipe, build_loader, read_layout
from mmfast.data.synth import SAMPLE_RATE, SIZE
from mmfast.data.video import segment_indices

from datasupport import FRAMES, broken_copy, collect, config

pytest.importorskip("nvidia.dali")


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


def test_bad_config_values():
    with pytest.raises(ValueError, match="on_error"):
        build_loader(DataConfig(root=".", on_error="ignore"), "train")
    with pytest.raises(ValueError, match="backend"):
        build_loader(DataConfig(root="."), "train", backend="opencv")
    with pytest.raises(DataError, match="dataset root is not a directory"):
        build_loader(DataConfig(root="/nonexistent/mmfast"), "train", backend="naive")


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
@pytest.mark.parametrize("backend,workers", [("dali", 2), ("dali-cached", 2), ("naive", 0), ("naive", 1)])
def test_clip_that_breaks_during_an_epoch_is_named_or_skipped(synth, tmp_path, break_fn, reason, backend, workers):
    """A clip that probed fine but fails while the epoch runs: on_error="raise" names the clip's
    broken file (also from a worker process, also inside a DALI batch); "skip" leaves out that
    clip alone, counts it in the epoch's report and keeps every other clip of the batch and the
    epoch, bitwise as decoded without the fault."""
    root = tmp_path / "data"
    shutil.copytree(synth, root, ignore=None if break_fn is _break_frames else shutil.ignore_patterns("Image-01-FPS"))
    # (dali-cached: the clean pass caches every clip, the broken one's entry then no longer matches)
    cache = {"cache": str(tmp_path / "cache")} if backend == "dali-cached" else {}
    loaders = {mode: build_loader(config(root, on_error=mode, batch_size=3, num_workers=workers, **cache), "val",
                                  backend=backend.split("-")[0]) for mode in ("raise", "skip")}
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

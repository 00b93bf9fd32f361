"""The generic layout's features kind (mmfast/data/features.py, layouts.py, both loaders): what the
layout accepts and each refusal (raise names the file, skip leaves the clip out and counts it),
both loaders' batches against each other and a slow reference of the padding, cutting, window and
mask, the decoded-sample cache leaving features alone, resumed passes and shards, features beside
audio and frames, and GPU pipelines well-formed."""
import csv
import math
import os
import shutil

import numpy as np
import pytest
import torch

from mmfast.data import DataConfig, DataError, FeatureRecipe, build_loader, mask_key, read_layout
from mmfast.data.base import sample_rng

from datasupport import collect

pytest.importorskip("nvidia.dali")

DIMS = {"a": 5, "b": 3}  # two features modalities of different sizes


def make_dataset(root, rng, clips=14, max_steps=13):
    """A generic dataset of features modalities a and b: clip i's sequences of 1 to max_steps
    random steps; 10 training clips, the rest test. Returns {(modality, clip): array}."""
    arrays = {}
    for m in DIMS:
        (root / m).mkdir(parents=True)
    with (root / "clips.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip", "label", "split"])
        for i in range(clips):
            for m, d in DIMS.items():
                arrays[m, f"c{i:02d}"] = x = rng.standard_normal((int(rng.integers(1, max_steps + 1)), d))
                np.save(root / m / f"c{i:02d}.npy", x.astype(np.float64 if m == "b" else np.float32))
            writer.writerow([f"c{i:02d}", "yes" if i % 2 else "no", "train" if i < 10 else "test"])
    return arrays


def cfg_for(root, **kw):
    return DataConfig(root=str(root), layout="generic", modalities={m: "features" for m in DIMS}, device="cpu",
                      batch_size=kw.pop("batch_size", 4), num_workers=kw.pop("num_workers", 0),
                      features=kw.pop("features", FeatureRecipe(length=7)), **kw)


@pytest.fixture
def rng(request):
    """A NumPy generator with a fresh seed every run; the seed is printed when a test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"numpy seed for {request.node.name}: {seed}")
    return np.random.default_rng(seed)


def reference(x, length, u):
    """The sample the slow way: steps start, start + 1, ... of the sequence while it lasts, zeros
    after; the window's start floor(u * (steps - length + 1)) when the sequence is longer."""
    start = math.floor(u * (len(x) - length + 1)) if len(x) > length else 0
    values, mask = np.zeros((length, x.shape[1]), np.float32), np.zeros(length, bool)
    for t in range(length):
        if start + t < len(x):
            values[t], mask[t] = x[start + t], True
    return values, mask


def expected_batch(loader, arrays, got_index, epoch):
    """Every sample of `got_index` from the reference, the window fraction of each modality drawn
    from the clip's generator in modality order (training with random windows)."""
    recipe, out = loader.cfg.features, {}
    random = loader.train and recipe.train_offset == "random"
    for i in got_index.tolist():
        rng = sample_rng(loader.cfg.seed, epoch, i)
        for m in DIMS:
            u = float(rng.random()) if random else 0.0
            values, mask = reference(arrays[m, loader.clips[i].clip_id], recipe.length, u)
            out.setdefault(m, []).append(values)
            out.setdefault(mask_key(m), []).append(mask)
    return {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}


@pytest.mark.parametrize("train,offset", [(False, "random"), (True, "random"), (True, "start")])
def test_both_loaders_give_the_reference_samples_bit_for_bit(tmp_path, rng, train, offset):
    arrays = make_dataset(tmp_path / "d", rng)
    cfg = cfg_for(tmp_path / "d", features=FeatureRecipe(length=int(rng.integers(4, 10)), train_offset=offset),
                  cache=str(tmp_path / "cache"))
    got = {}
    for name, backend, c in (("naive", "naive", cfg_for(tmp_path / "d", features=cfg.features)),
                             ("dali", "dali", cfg_for(tmp_path / "d", features=cfg.features)),
                             ("dali-cached", "dali", cfg)):
        loader = build_loader(c, "train", backend, train=train)
        loader.epoch = 3
        got[name] = batch = collect(loader)
        assert set(batch) == {"a", "a_mask", "b", "b_mask", "label", "index"}
        assert batch["a"].dtype == batch["b"].dtype == torch.float32 and batch["a_mask"].dtype == torch.bool
        want = expected_batch(loader, arrays, batch["index"], 3)
        for k, v in want.items():
            assert torch.equal(batch[k], v), (name, k)
    for k in got["naive"]:
        assert torch.equal(got["naive"][k], got["dali"][k]) and torch.equal(got["naive"][k], got["dali-cached"][k]), k
    lengths = {len(arrays["a", c.clip_id]) for c in loader.clips}
    assert min(lengths) < cfg.features.length < max(lengths) or len(lengths) == 1  # (padded and cut, usually)
    assert not any((tmp_path / "cache").rglob("*.npy"))  # features have no cache entries


def test_a_training_window_is_drawn_per_clip_and_epoch(tmp_path, rng):
    """A sequence much longer than L gives windows that start anywhere, from the clip's generator."""
    root = tmp_path / "d"
    make_dataset(root, rng, max_steps=2)
    long = rng.standard_normal((40, DIMS["a"])).astype(np.float32)
    np.save(root / "a" / "c00.npy", long)
    loader = build_loader(cfg_for(root, batch_size=10, features=FeatureRecipe(length=5)), "train", "naive")
    starts = set()
    for epoch in range(12):
        batch = next(iter(loader.batches()))
        row = batch["a"][batch["index"].tolist().index(0)].numpy()
        matches = [s for s in range(len(long) - 4) if np.array_equal(long[s:s + 5], row)]
        assert len(matches) == 1 and batch["a_mask"][batch["index"].tolist().index(0)].all()
        starts.add(matches[0])
        loader.end_epoch()
    assert len(starts) >= 6  # (12 draws of 36 starts: fewer than 6 distinct ones has odds below 1e-4)


def test_passes_from_any_batch_and_shards_give_the_same_features(tmp_path, rng):
    make_dataset(tmp_path / "d", rng)
    cfg = cfg_for(tmp_path / "d", batch_size=4)
    for backend in ("dali", "naive"):
        loader = build_loader(cfg, "train", backend)
        loader.epoch = 1
        full = list(loader.batches())
        loader.epoch = 1
        tail = list(loader.batches(start=1))
        assert all(torch.equal(a[k], b[k]) for a, b in zip(full[1:], tail) for k in a)
        shards = []
        for rank in (0, 1):
            part = build_loader(cfg, "train", backend)
            part.set_shard(rank, 2)
            part.epoch = 1
            shards.append(list(part.batches()))
        for whole, first, second in zip(full, *shards):
            assert all(torch.equal(whole[k], torch.cat([first[k], second[k]])) for k in whole)


def test_features_beside_audio_and_frames_keep_every_other_draw(tmp_path, rng):
    """Audio, frames and features in one generic layout: the features draw their window from the
    clip's generator between the audio window and the frames' choices, and both loaders still
    pick the same audio windows, frames, crops and flips."""
    import soundfile as sf
    from PIL import Image

    from mmfast.data import FrameRecipe, crema_d

    root = tmp_path / "mixed"
    arrays = {}
    for m in ("sound", "rgb", "text"):
        (root / m).mkdir(parents=True)
    with (root / "clips.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip", "label"])
        for i in range(6):
            clip = f"c{i}"
            sf.write(root / "sound" / f"{clip}.wav", 0.3 * rng.standard_normal(8000).astype(np.float32), 8000)
            (root / "rgb" / clip).mkdir()
            for j in range(3):
                frame = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
                Image.fromarray(frame).save(root / "rgb" / clip / f"{j}.png")
            arrays[clip] = rng.standard_normal((int(rng.integers(2, 12)), 4)).astype(np.float32)
            np.save(root / "text" / f"{clip}.npy", arrays[clip])
            writer.writerow([clip, "ab"[i % 2]])
    modalities = {"sound": "audio", "text": "features", "rgb": "frames"}
    cfg = DataConfig(root=str(root), layout="generic", modalities=modalities,
                     audio=crema_d(sample_rate=8000, duration=0.5, loop_to=1.0, n_fft=128, hop_length=64),
                     frames=FrameRecipe(num_frames=2, size=24), features=FeatureRecipe(length=6), batch_size=4,
                     num_workers=0, device="cpu")
    a, b = (collect(build_loader(cfg, "train", backend)) for backend in ("dali", "naive"))
    assert set(a) == set(b) == {"sound", "rgb", "text", "text_mask", "label", "index"}
    assert torch.equal(a["text"], b["text"]) and torch.equal(a["text_mask"], b["text_mask"])
    loader = build_loader(cfg, "train", "naive")
    for row, i in enumerate(a["index"].tolist()):  # the window after the audio window's draw
        gen = sample_rng(cfg.seed, 0, i)
        gen.random()
        values, mask = reference(arrays[loader.clips[i].clip_id], 6, float(gen.random()))
        assert np.array_equal(a["text"][row].numpy(), values) and np.array_equal(a["text_mask"][row].numpy(), mask)
    assert (a["sound"] - b["sound"]).abs().max() < 1e-3
    std = torch.tensor(cfg.frames.std).view(1, 1, 3, 1, 1) * 255
    pixel_diff = (a["rgb"] - b["rgb"]).abs() * std  # (PNG: both decode the same pixels; resize rounding)
    assert pixel_diff.max() <= 8 and pixel_diff.mean() < 0.5


# --- what the layout accepts and refuses ------------------------------------------------------------

def _not_2d(path, rng):
    np.save(path, rng.standard_normal(6).astype(np.float32))
    return "features not 2-D"


def _three_d(path, rng):
    np.save(path, rng.standard_normal((2, 3, DIMS["a"])).astype(np.float32))
    return "features not 2-D"


def _other_dims(path, rng):
    np.save(path, rng.standard_normal((4, DIMS["a"] + 2)).astype(np.float32))
    return "wrong feature size: 7 values per step, the 'a' modality's other clips have 5"


def _no_steps(path, rng):
    np.save(path, np.zeros((0, DIMS["a"]), np.float32))
    return "empty sequence: 0 steps"


def _no_dims(path, rng):
    np.save(path, np.zeros((3, 0), np.float32))
    return "empty sequence: no values per step"


def _complex(path, rng):
    np.save(path, np.ones((3, DIMS["a"]), np.complex64))
    return "features not real numbers: dtype complex64"


def _pickled(path, rng):
    array = np.empty((2, DIMS["a"]), dtype=object)
    array[:] = {"x": 1}
    np.save(path, array, allow_pickle=True)
    return "features not real numbers: dtype object"  # (refused from the header: never unpickled)


def _garbage(path, rng):
    path.write_bytes(b"\x93NUMPY but not really" + bytes(rng.integers(0, 256, 50, dtype=np.uint8)))
    return "unreadable features"


def _truncated(path, rng):
    np.save(path, rng.standard_normal((9, DIMS["a"])).astype(np.float32))
    path.write_bytes(path.read_bytes()[:-20])
    return "unreadable features"


def _nan(path, rng):
    x = rng.standard_normal((6, DIMS["a"])).astype(np.float32)
    x[4, 2] = np.nan
    np.save(path, x)
    return r"non-finite features: 1 values \(the first at step 4, value 2: nan\)"


def _inf(path, rng):
    x = rng.standard_normal((6, DIMS["a"]))
    x[0, 0] = -np.inf
    np.save(path, x)
    return "non-finite features: 1 values"


def _missing(path, rng):
    path.unlink()
    return "missing file"


AT_LIST = [_not_2d, _three_d, _other_dims, _no_steps, _no_dims, _complex, _pickled, _garbage, _truncated, _missing]


@pytest.mark.parametrize("break_fn", AT_LIST + [_nan, _inf])
def test_each_bad_file_is_named_or_skipped_and_counted(tmp_path, rng, break_fn):
    root = tmp_path / "d"
    make_dataset(root, rng)
    path = root / "a" / "c03.npy"
    reason = break_fn(path, rng)
    cfg = cfg_for(root)
    when = "list" if break_fn in AT_LIST else "probe"  # (the values are read when a loader probes)
    if when == "list":
        with pytest.raises(DataError, match=reason) as info:
            read_layout(root, "generic", modalities=cfg.modalities)
    else:
        read_layout(root, "generic", modalities=cfg.modalities)
        with pytest.raises(DataError, match=reason) as info:
            build_loader(cfg, "train", "naive")
    assert info.value.path.startswith(str(path.with_suffix("")))  # (a missing file: the clip's name)
    for backend in ("dali", "naive"):
        loader = build_loader(cfg_for(root, on_error="skip"), "train", backend)
        report = loader.skipped_at_build
        category = reason.split(":")[0]  # (the summary counts faults by the reason's first part)
        assert report.total == 1 and report.names == ["c03"] and category in report.summary()
        batch = collect(loader)
        assert sorted(loader.clips[i].clip_id for i in batch["index"]) == [f"c{i:02d}" for i in range(10) if i != 3]
    assert build_loader(cfg_for(root, on_error="skip"), "test", "naive").skipped_at_build.total == 0


def test_the_modality_s_size_is_the_one_most_clips_have(tmp_path, rng):
    root = tmp_path / "d"
    make_dataset(root, rng, clips=6)
    for i in (0, 1):  # the first two clips listed differ from the other four
        np.save(root / "a" / f"c{i:02d}.npy", np.ones((3, 9), np.float32))
    index = read_layout(root, "generic", modalities=cfg_for(root).modalities, on_error="skip")
    assert index.feature_dims == DIMS
    assert sorted(index.skipped.names) == ["c00", "c01"] and index.skipped.counts == {"wrong feature size": 2}
    with pytest.raises(DataError, match="c00.npy: wrong feature size: 9 values per step.*have 5 \\(4 of 6"):
        read_layout(root, "generic", modalities=cfg_for(root).modalities)


@pytest.mark.parametrize("backend,workers", [("dali", 1), ("dali-cached", 1), ("naive", 0)])
def test_a_file_that_breaks_during_an_epoch_is_named_or_skipped(tmp_path, rng, backend, workers):
    root = tmp_path / "d"
    make_dataset(root, rng)
    cache = {"cache": str(tmp_path / "cache")} if backend == "dali-cached" else {}
    loaders = {mode: build_loader(cfg_for(root, on_error=mode, num_workers=workers, **cache), "test",
                                  backend.split("-")[0]) for mode in ("raise", "skip")}
    clean = collect(loaders["skip"])
    victim = loaders["skip"].clips[1]
    path = victim.files["b"]
    np.save(path, np.full((4, DIMS["b"]), np.inf))
    with pytest.raises(DataError, match="non-finite features") as info:
        collect(loaders["raise"])
    assert info.value.path == str(path) and info.value.clip == victim.clip_id
    got = collect(loaders["skip"])
    keep = clean["index"] != 1
    assert all(torch.equal(got[k], clean[k][keep]) for k in clean)
    assert loaders["skip"].last_epoch_skipped.names == [victim.clip_id]


def test_layout_refusals_that_are_configuration_errors(tmp_path, rng):
    root = tmp_path / "d"
    make_dataset(root, rng, clips=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        read_layout(root, "generic", modalities={"a": "feature"})
    shutil.copytree(root / "b", root / "a_mask")
    with pytest.raises(ValueError, match=r"\['a_mask'\] clash with the batch's other keys"):
        read_layout(root, "generic", modalities={"a": "features", "a_mask": "features"})
    shutil.copytree(root / "b", root / "label")
    with pytest.raises(ValueError, match=r"\['label'\] clash"):
        read_layout(root, "generic", modalities={"a": "features", "label": "features"})
    with pytest.raises(ValueError, match="length must be an integer >= 1"):
        FeatureRecipe(length=0)
    with pytest.raises(ValueError, match="train_offset must be one of"):
        FeatureRecipe(train_offset="centre")


@pytest.mark.parametrize("train", [False, True])
def test_gpu_pipelines_with_features_are_well_formed(tmp_path, rng, train):
    from nvidia.dali.pipeline import Pipeline

    make_dataset(tmp_path / "d", rng, clips=12)
    for cache in ({}, {"cache": str(tmp_path / "cache")}):
        loader = build_loader(cfg_for(tmp_path / "d", **cache), "test", "dali", train=train)
        assert isinstance(loader._define(gpu=True), Pipeline)

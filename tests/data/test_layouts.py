"""Dataset layouts and clip lists (mmfast/data/layouts.py): the generic and research layouts,
malformed lines, byte-order marks, duplicates, overlaps, per-split skips."""
import csv
import shutil

import pytest

from mmfast.data import DataError, build_loader, read_layout
from mmfast.data.synth import SIZE

from datasupport import config, collect

pytest.importorskip("nvidia.dali")


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

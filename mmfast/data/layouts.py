"""Dataset layouts on disk: which clips exist, their labels and splits, and where each
modality's file lies. Every reader returns a DatasetIndex; loaders never look at the layout.

CREMA-D (as the balanced-multimodal research code stores it)::

    ROOT/AudioWAV/<clip>.wav             audio
    ROOT/VideoFlash/<clip>.<ext>         raw video (any container/codec; .flv in the release)
    ROOT/Image-01-FPS/<clip>/<n>.jpg     or frames extracted at 1 fps (used when present)
    ROOT/train.csv, ROOT/test.csv        "<clip>,<label>" lines, no header; optional val.csv
    ROOT/classes.txt                     optional; default NEU HAP SAD FEA DIS ANG

Kinetics-Sounds and VGGSound (the research code's pre-processed tree: 1-fps frames and the wav
in one folder per sample)::

    ROOT/<split>/<sample>/<n>.jpg, ROOT/<split>/<sample>/<sample>.wav      split: train, val, test
    Kinetics-Sounds: ROOT/<split>.csv  "<sample>,<label>" lines, no header
    VGGSound:        ROOT/vggsound.csv "<youtube id>,<start s>,<label>,<train|test>" (the release's
                     list); sample = "<youtube id>_<start as 6 digits>"
    ROOT/classes.txt optional; default: the sorted labels of the lists

AVE (the release's annotation files; media as the research code extracts them)::

    ROOT/trainSet.txt, valSet.txt, testSet.txt   "Category&VideoID&Quality&StartTime&EndTime"
    ROOT/visual/<VideoID>/<n>.jpg, ROOT/audio/<VideoID>.wav
    (classification by Category; the 1 s segment labels for localisation are not read yet)

Generic (any number of modalities)::

    ROOT/clips.csv                       header "clip,label[,split]"; split defaults to train
    ROOT/<modality>/<clip>.<ext>         a file per clip (audio or video) ...
    ROOT/<modality>/<clip>/              ... or a folder of frames (jpg/png), sorted by name
    ROOT/<modality>/<clip>.npy           ... or a feature sequence [L_i, D] (kind "features":
                                         pre-extracted features; mmfast/data/features.py)
    ROOT/classes.txt                     optional; default: the sorted labels of clips.csv

A features modality's headers are read with the list: a file that is not a readable 2-D .npy
array of real numbers with at least one step, or whose D differs from the modality's (the D most
of its clips, over every split, have; a tie: the first listed clip's), is bad input like a missing
file (a DataError naming it, or left out and counted with on_error="skip").

Every list is read as UTF-8 with or without a byte-order mark, with any line endings; file
extensions match in any case (.wav, .WAV). A malformed line, an empty label, a clip listed twice
in a split or under two labels raise a DataError naming the line (with on_error="skip": left out
and counted; a clip with two labels is left out entirely). A clip listed in two splits (train and
test: how benchmark numbers go wrong) is refused whatever on_error says, unless the caller passes
allow_overlap=True. Columns past the expected ones are ignored, with one warning per file.
"""
from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, SkipReport, check_on_error
from .features import FEATURE_EXTS, mask_key, read_header

CREMA_D_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_EXTS = (".webm", ".mkv", ".mp4", ".avi", ".mov", ".flv")
FRAME_EXTS = (".jpg", ".jpeg", ".png")
KINDS = ("audio", "video", "frames", "features")
RESERVED_KEYS = ("label", "index")  # batch keys beside the modalities (and each features modality's mask)
LAYOUTS = ("crema_d", "kinetics_sounds", "vggsound", "ave", "generic")
log = logging.getLogger("mmfast.data")


@dataclass(frozen=True)
class Clip:
    clip_id: str
    label: int
    files: dict  # modality name -> Path (a file, or a folder of frames)
    where: str = ""  # the list line it came from, "<file>:<line>"


@dataclass
class DatasetIndex:
    name: str
    root: Path
    classes: list
    kinds: dict  # modality name -> "audio" | "video" | "frames" | "features"
    splits: dict = field(default_factory=dict)  # split -> list[Clip]
    feature_dims: dict = field(default_factory=dict)  # features modality -> D, the values per step
    skipped: SkipReport = field(default_factory=SkipReport)  # every split's (on_error="skip")
    skipped_by_split: dict = field(default_factory=dict)  # split -> SkipReport of that split's lines

    def record_skip(self, err: DataError, split: str | None) -> None:
        """Count a skipped list line or clip; `split` None: a line whose split is unknown."""
        self.skipped.add(err)
        if split is not None:
            self.skipped_by_split.setdefault(split, SkipReport()).add(err)

    def skipped_in(self, split: str) -> SkipReport:
        return self.skipped_by_split.get(split, SkipReport()).copy()

    @property
    def modalities(self) -> list:
        return list(self.kinds)

    def split(self, name: str) -> list:
        if name not in self.splits:
            raise DataError(self.root, f"no split named {name!r} (have {sorted(self.splits)})")
        clips = self.splits[name]
        if not clips:
            raise DataError(self.root, f"split {name!r} is empty")
        return clips


def read_layout(root, layout: str = "crema_d", *, modalities=None, on_error: str = "raise",
                allow_overlap: bool = False) -> DatasetIndex:
    """Index the dataset at `root` stored in `layout` (one of LAYOUTS). `modalities`
    (generic layout) maps modality names to kinds, e.g. {"audio": "audio", "rgb": "frames"}.
    allow_overlap: accept a clip listed in more than one split (refused by default)."""
    check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root is not a directory")
    if layout == "crema_d":
        index = _read_crema_d(root, on_error)
    elif layout == "generic":
        index = _read_generic(root, modalities, on_error)
    elif layout in ("kinetics_sounds", "vggsound"):
        index = _read_sample_folders(root, layout, on_error)
    elif layout == "ave":
        index = _read_ave(root, on_error)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_clip_lists(index, on_error, allow_overlap)
    return index


def _check_clip_lists(index: DatasetIndex, on_error: str, allow_overlap: bool) -> None:
    """Within a split: a clip listed twice (the repeats are left out under skip) or under two
    labels (left out entirely under skip). Across splits: a clip in two splits is refused."""
    for split, clips in index.splits.items():
        first, labels = {}, {}
        for clip in clips:
            first.setdefault(clip.clip_id, clip)
            labels.setdefault(clip.clip_id, set()).add(clip.label)
        kept = []
        for clip in clips:
            seen = first[clip.clip_id]
            if len(labels[clip.clip_id]) > 1:
                if seen is clip and on_error == "raise":
                    continue  # raised at the later listing, which names both
                names = sorted(index.classes[k] for k in labels[clip.clip_id])
                err = DataError(clip.where, f"conflicting labels: clip {clip.clip_id!r} is listed with labels {names} "
                                            f"(first at {seen.where})")
            elif seen is not clip:
                err = DataError(clip.where, f"duplicate clip: {clip.clip_id!r} is listed already at {seen.where}")
            else:
                kept.append(clip)
                continue
            if on_error == "raise":
                raise err
            err.clip = clip.clip_id
            index.record_skip(err, split)
        index.splits[split] = kept
    if allow_overlap:
        return
    home = {}
    for split, clips in index.splits.items():
        for clip in clips:
            if clip.clip_id in home and home[clip.clip_id][0] != split:
                other_split, other = home[clip.clip_id]
                raise DataError(clip.where, f"clip {clip.clip_id!r} is in split {split!r} and in split {other_split!r} "
                                            f"({other.where}): a clip in two splits leaks between training and "
                                            f"evaluation; pass allow_overlap=True (data.allow_overlap) if intended")
            home.setdefault(clip.clip_id, (split, clip))


def _read_text_lines(path: Path) -> list:
    """The file's lines: UTF-8 with or without a byte-order mark, any line endings."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text: {exc}") from None


def _read_classes(root: Path, default):
    path = root / "classes.txt"
    if path.exists():
        classes = [line.strip() for line in _read_text_lines(path) if line.strip()]
        if not classes:
            raise DataError(path, "class list is empty")
        if len(set(classes)) != len(classes):
            twice = sorted({c for c in classes if classes.count(c) > 1})
            raise DataError(path, f"class list names {twice} more than once")
        return classes
    return list(default)


def _resolve(clip_dir: Path, clip_id: str, kind: str):
    """The file (or frame folder) of `clip_id` in `clip_dir`, or None."""
    if kind == "frames":
        folder = clip_dir / clip_id
        return folder if folder.is_dir() else None
    exts = {"audio": AUDIO_EXTS, "features": FEATURE_EXTS}.get(kind, VIDEO_EXTS)
    for ext in exts:
        for variant in (ext, ext.upper()):
            path = clip_dir / f"{clip_id}{variant}"
            if path.exists():
                return path
    if clip_dir.is_dir():  # any other spelling of the extension (.Wav)
        for path in clip_dir.glob(f"{clip_id}.*"):
            if path.suffix.lower() in exts and path.stem == clip_id:
                return path
    return None


def _make_clip(index: DatasetIndex, split: str, dirs: dict, clip_id: str, label: str, where: str, on_error: str):
    """A Clip, or None (counted) when on_error="skip". dirs[modality] is the folder holding the
    clip's file, or a function clip_id -> folder."""
    try:
        if not clip_id:
            raise DataError(where, "empty clip id")
        if not label:
            raise DataError(where, f"empty label for clip {clip_id!r}")
        if label not in index.classes:
            raise DataError(where, f"label {label!r} of clip {clip_id!r} is not in the class list {index.classes}")
        files = {}
        for modality, kind in index.kinds.items():
            folder = dirs[modality](clip_id) if callable(dirs[modality]) else dirs[modality]
            path = _resolve(folder, clip_id, kind)
            if path is None:
                raise DataError(folder / clip_id, f"missing file: no {kind} for clip {clip_id!r}")
            files[modality] = path
        return Clip(clip_id, index.classes.index(label), files, where)
    except DataError as err:
        if on_error == "raise":
            raise
        err.clip = clip_id
        index.record_skip(err, split)
        return None


def _read_crema_d(root: Path, on_error: str) -> DatasetIndex:
    frames_dir, video_dir = root / "Image-01-FPS", root / "VideoFlash"
    visual_kind, visual_dir = ("frames", frames_dir) if frames_dir.is_dir() else ("video", video_dir)
    index = DatasetIndex("crema_d", root, _read_classes(root, CREMA_D_CLASSES),
                         {"audio": "audio", "visual": visual_kind})
    dirs = {"audio": root / "AudioWAV", "visual": visual_dir}
    for modality, d in dirs.items():
        if not d.is_dir():
            raise DataError(d, f"missing folder for the {modality} modality")
    _fill_splits(index, lambda split: dirs, _split_lists(root, on_error, index), on_error)
    return index


def _split_lists(root: Path, on_error: str, index: DatasetIndex) -> dict:
    """split -> [(clip id, label, where)] from ROOT/{train,val,test}.csv ("<clip>,<label>" lines,
    no header; val optional). Malformed lines raise or, with on_error="skip", are counted."""
    entries = {}
    for split in ("train", "val", "test"):
        path = root / f"{split}.csv"
        if not path.exists():
            if split == "val":
                continue
            raise DataError(path, "missing split file")
        entries[split] = []
        for lineno, row in _read_rows(path, columns=2):
            if len(row) < 2:
                err = DataError(f"{path}:{lineno}", "expected '<clip>,<label>'")
                if on_error == "raise":
                    raise err
                index.record_skip(err, split)
                continue
            entries[split].append((row[0], row[1], f"{path}:{lineno}"))
    return entries


def _read_generic(root: Path, modalities, on_error: str) -> DatasetIndex:
    if not modalities:
        raise ValueError("the generic layout needs modalities, e.g. {'audio': 'audio', 'visual': 'video'}")
    for name, kind in modalities.items():
        if kind not in KINDS:
            raise ValueError(f"modality {name!r}: kind must be one of {KINDS}, got {kind!r}")
    taken = {*RESERVED_KEYS, *(mask_key(n) for n, k in modalities.items() if k == "features")}
    clash = sorted(set(modalities) & taken)
    if clash:
        raise ValueError(f"modality name(s) {clash} clash with the batch's other keys ('label', 'index' and each "
                         f"features modality's '<name>_mask'): rename the folder(s)")
    path = root / "clips.csv"
    if not path.exists():
        raise DataError(path, "missing clip list")
    index_skips = []  # (split, DataError) of malformed lines, recorded once the index exists
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = [h.strip() for h in (reader.fieldnames or [])]
    if header[:2] != ["clip", "label"]:
        raise DataError(path, f"header must start with 'clip,label' (optionally ',split'), got {header}")
    extra = [h for h in header if h not in ("clip", "label", "split")]
    if extra or any(None in r for r in rows):
        log.warning("%s: columns past clip,label,split are ignored (%s)", path, extra or "unnamed values")
    good = []
    for lineno, row in enumerate(rows, start=2):
        if row.get("label") is None:  # a line without a comma
            err = DataError(f"{path}:{lineno}", "expected '<clip>,<label>[,<split>]'")
            if on_error == "raise":
                raise err
            index_skips.append(((row.get("split") or "train").strip(), err))
            continue
        good.append((lineno, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}))
    labels = sorted({r["label"] for _, r in good if r["label"]})
    index = DatasetIndex("generic", root, _read_classes(root, labels), dict(modalities))
    for split, err in index_skips:
        index.record_skip(err, split)
    dirs = {name: root / name for name in modalities}
    for name, d in dirs.items():
        if not d.is_dir():
            raise DataError(d, f"missing folder for the {name} modality")
    for lineno, row in good:
        split = row.get("split") or "train"
        clip = _make_clip(index, split, dirs, row["clip"], row["label"], f"{path}:{lineno}", on_error)
        index.splits.setdefault(split, [])
        if clip is not None:
            index.splits[split].append(clip)
    for name, kind in modalities.items():
        if kind == "features":
            _check_feature_headers(index, name, on_error)
    return index


def _check_feature_headers(index: DatasetIndex, modality: str, on_error: str) -> None:
    """Reads the header of every clip's file of a features modality (not the values): files that
    are not 2-D .npy arrays of real numbers with a step, and files whose D is not the modality's
    (the most common D over every split; a tie: the first listed clip's), raise or are left out.
    Sets index.feature_dims[modality]."""
    shapes, bad = {}, {}
    for split, clips in index.splits.items():
        for clip in clips:
            try:
                shapes[split, clip.clip_id] = read_header(clip.files[modality])
            except DataError as err:
                if on_error == "raise":
                    raise
                bad[split, clip.clip_id] = err
    counts = Counter(shape[1] for shape in shapes.values())
    dims = counts.most_common(1)[0][0] if counts else None
    example = next((c.files[modality] for s, cs in index.splits.items() for c in cs
                    if (s, c.clip_id) in shapes and shapes[s, c.clip_id][1] == dims), None)
    for split, clips in index.splits.items():
        kept = []
        for clip in clips:
            err = bad.get((split, clip.clip_id))
            if err is None and shapes[split, clip.clip_id][1] != dims:
                size = shapes[split, clip.clip_id][1]
                err = DataError(clip.files[modality], f"wrong feature size: {size} values per step, the {modality!r} "
                                                      f"modality's other clips have {dims} ({counts[dims]} of "
                                                      f"{len(shapes)} readable files, e.g. {example})")
                if on_error == "raise":
                    raise err
            if err is None:
                kept.append(clip)
                continue
            err.clip = clip.clip_id
            index.record_skip(err, split)
        index.splits[split] = kept
    if dims is not None:
        index.feature_dims[modality] = dims


def _read_rows(path: Path, delimiter: str = ",", columns: int | None = None):
    """(line number, fields) of a headerless list file (UTF-8, byte-order mark or not), blank
    lines skipped; lines with more than `columns` fields are warned about once."""
    warned = False
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            for lineno, row in enumerate(csv.reader(f, delimiter=delimiter), start=1):
                if not row or not any(field.strip() for field in row):
                    continue
                if columns is not None and len(row) > columns and not warned:
                    log.warning("%s:%d: %d columns, only the first %d are read (the rest is ignored in this file)",
                                path, lineno, len(row), columns)
                    warned = True
                yield lineno, [field.strip() for field in row]
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text: {exc}") from None


def _fill_splits(index: DatasetIndex, dirs_for_split, entries, on_error: str):
    """entries: split -> list of (clip id, label, where)."""
    for split, rows in entries.items():
        dirs = dirs_for_split(split)
        clips = [_make_clip(index, split, dirs, clip_id, label, where, on_error) for clip_id, label, where in rows]
        index.splits[split] = [c for c in clips if c is not None]


def _read_sample_folders(root: Path, layout: str, on_error: str) -> DatasetIndex:
    entries = {}
    index = DatasetIndex(layout, root, [], {"audio": "audio", "visual": "frames"})
    if layout == "vggsound":
        path = root / "vggsound.csv"
        if not path.exists():
            raise DataError(path, "missing list (the VGGSound release's vggsound.csv)")
        for lineno, row in _read_rows(path, columns=4):
            if len(row) < 4 or not row[1].isdigit():
                err = DataError(f"{path}:{lineno}", "expected '<youtube id>,<start>,<label>,<split>'")
                if on_error == "raise":
                    raise err
                index.record_skip(err, row[3] if len(row) >= 4 else None)
                continue
            entries.setdefault(row[3], []).append((f"{row[0]}_{int(row[1]):06d}", row[2], f"{path}:{lineno}"))
    else:
        entries = _split_lists(root, on_error, index)
    index.classes = _read_classes(root, sorted({label for rows in entries.values() for _, label, _ in rows}))

    def dirs_for_split(split):
        base = root / split
        if not base.is_dir():
            raise DataError(base, f"missing folder of the {split!r} split")
        # The wav lies inside the sample's folder; frames are the folder itself.
        return {"audio": lambda clip_id: base / clip_id, "visual": base}

    _fill_splits(index, dirs_for_split, entries, on_error)
    return index


def _read_ave(root: Path, on_error: str) -> DatasetIndex:
    entries = {}
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        path = root / name
        if not path.exists():
            raise DataError(path, "missing split file")
        entries[split] = []
        for lineno, row in _read_rows(path, delimiter="&", columns=5):
            if len(row) < 2 or row[0] == "Category":  # header line
                continue
            entries[split].append((row[1], row[0], f"{path}:{lineno}"))
    labels = sorted({label for rows in entries.values() for _, label, _ in rows})
    index = DatasetIndex("ave", root, _read_classes(root, labels), {"audio": "audio", "visual": "frames"})
    dirs = {"audio": root / "audio", "visual": root / "visual"}
    for modality, d in dirs.items():
        if not d.is_dir():
            raise DataError(d, f"missing folder for the {modality} modality")
    _fill_splits(index, lambda split: dirs, entries, on_error)
    return index

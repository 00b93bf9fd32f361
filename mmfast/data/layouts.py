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
    ROOT/classes.txt                     optional; default: the sorted labels of clips.csv
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, SkipReport, check_on_error

CREMA_D_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_EXTS = (".webm", ".mkv", ".mp4", ".avi", ".mov", ".flv")
FRAME_EXTS = (".jpg", ".jpeg", ".png")
KINDS = ("audio", "video", "frames")
LAYOUTS = ("crema_d", "kinetics_sounds", "vggsound", "ave", "generic")


@dataclass(frozen=True)
class Clip:
    clip_id: str
    label: int
    files: dict  # modality name -> Path (a file, or a folder of frames)


@dataclass
class DatasetIndex:
    name: str
    root: Path
    classes: list
    kinds: dict  # modality name -> "audio" | "video" | "frames"
    splits: dict = field(default_factory=dict)  # split -> list[Clip]
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


def read_layout(root, layout: str = "crema_d", *, modalities=None, on_error: str = "raise") -> DatasetIndex:
    """Index the dataset at `root` stored in `layout` (one of LAYOUTS). `modalities`
    (generic layout) maps modality names to kinds, e.g. {"audio": "audio", "rgb": "frames"}."""
    check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root is not a directory")
    if layout == "crema_d":
        return _read_crema_d(root, on_error)
    if layout == "generic":
        return _read_generic(root, modalities, on_error)
    if layout in ("kinetics_sounds", "vggsound"):
        return _read_sample_folders(root, layout, on_error)
    if layout == "ave":
        return _read_ave(root, on_error)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _read_classes(root: Path, default):
    path = root / "classes.txt"
    if path.exists():
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not classes:
            raise DataError(path, "class list is empty")
        return classes
    return list(default)


def _resolve(clip_dir: Path, clip_id: str, kind: str):
    """The file (or frame folder) of `clip_id` in `clip_dir`, or None."""
    if kind == "frames":
        folder = clip_dir / clip_id
        return folder if folder.is_dir() else None
    exts = AUDIO_EXTS if kind == "audio" else VIDEO_EXTS
    for ext in exts:
        path = clip_dir / f"{clip_id}{ext}"
        if path.exists():
            return path
    return None


def _make_clip(index: DatasetIndex, split: str, dirs: dict, clip_id: str, label: str, where: str, on_error: str):
    """A Clip, or None (counted) when on_error="skip". dirs[modality] is the folder holding the
    clip's file, or a function clip_id -> folder."""
    try:
        if label not in index.classes:
            raise DataError(where, f"label {label!r} of clip {clip_id!r} is not in the class list {index.classes}")
        files = {}
        for modality, kind in index.kinds.items():
            folder = dirs[modality](clip_id) if callable(dirs[modality]) else dirs[modality]
            path = _resolve(folder, clip_id, kind)
            if path is None:
                raise DataError(folder / clip_id, f"missing file: no {kind} for clip {clip_id!r}")
            files[modality] = path
        return Clip(clip_id, index.classes.index(label), files)
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
        for lineno, row in _read_rows(path):
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
    path = root / "clips.csv"
    if not path.exists():
        raise DataError(path, "missing clip list")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"clip", "label"} <= set(rows[0]):
        raise DataError(path, "header must start with 'clip,label' (optionally ',split')")
    labels = sorted({r["label"].strip() for r in rows})
    index = DatasetIndex("generic", root, _read_classes(root, labels), dict(modalities))
    dirs = {name: root / name for name in modalities}
    for name, d in dirs.items():
        if not d.is_dir():
            raise DataError(d, f"missing folder for the {name} modality")
    for lineno, row in enumerate(rows, start=2):
        split = (row.get("split") or "train").strip()
        clip = _make_clip(index, split, dirs, row["clip"].strip(), row["label"].strip(), f"{path}:{lineno}", on_error)
        index.splits.setdefault(split, [])
        if clip is not None:
            index.splits[split].append(clip)
    return index


def _read_rows(path: Path, delimiter: str = ","):
    """(line number, fields) of a headerless list file, blank lines skipped."""
    with path.open(newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter=delimiter), start=1):
            if row and row[0].strip():
                yield lineno, [field.strip() for field in row]


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
        for lineno, row in _read_rows(path):
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
        for lineno, row in _read_rows(path, delimiter="&"):
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

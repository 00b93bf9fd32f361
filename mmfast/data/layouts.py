"""Dataset layouts on disk: which clips exist, their labels and splits, and where each
modality's file lies. Every reader returns a DatasetIndex; loaders never look at the layout.

CREMA-D (as the balanced-multimodal research code stores it)::

    ROOT/AudioWAV/<clip>.wav             audio
    ROOT/VideoFlash/<clip>.<ext>         raw video (any container/codec; .flv in the release)
    ROOT/Image-01-FPS/<clip>/<n>.jpg     or frames extracted at 1 fps (used when present)
    ROOT/train.csv, ROOT/test.csv        "<clip>,<label>" lines, no header; optional val.csv
    ROOT/classes.txt                     optional; default NEU HAP SAD FEA DIS ANG

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
    skipped: SkipReport = field(default_factory=SkipReport)

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
    """Index the dataset at `root` stored in `layout` ("crema_d" or "generic"). `modalities`
    (generic layout) maps modality names to kinds, e.g. {"audio": "audio", "rgb": "frames"}."""
    check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root is not a directory")
    if layout == "crema_d":
        return _read_crema_d(root, on_error)
    if layout == "generic":
        return _read_generic(root, modalities, on_error)
    raise ValueError(f"layout must be 'crema_d' or 'generic', got {layout!r}")


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


def _make_clip(index: DatasetIndex, dirs: dict, clip_id: str, label: str, where: str, on_error: str):
    try:
        if label not in index.classes:
            raise DataError(where, f"label {label!r} of clip {clip_id!r} is not in the class list {index.classes}")
        files = {}
        for modality, kind in index.kinds.items():
            path = _resolve(dirs[modality], clip_id, kind)
            if path is None:
                raise DataError(dirs[modality] / clip_id, f"missing file: no {kind} for clip {clip_id!r}")
            files[modality] = path
        return Clip(clip_id, index.classes.index(label), files)
    except DataError as err:
        if on_error == "raise":
            raise
        index.skipped.add(err)
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
    for split in ("train", "val", "test"):
        path = root / f"{split}.csv"
        if not path.exists():
            if split == "val":
                continue
            raise DataError(path, "missing split file")
        clips = []
        with path.open(newline="") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or not row[0].strip():
                    continue
                if len(row) < 2:
                    err = DataError(f"{path}:{lineno}", "expected '<clip>,<label>'")
                    if on_error == "raise":
                        raise err
                    index.skipped.add(err)
                    continue
                clip = _make_clip(index, dirs, row[0].strip(), row[1].strip(), f"{path}:{lineno}", on_error)
                if clip is not None:
                    clips.append(clip)
        index.splits[split] = clips
    return index


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
        clip = _make_clip(index, dirs, row["clip"].strip(), row["label"].strip(), f"{path}:{lineno}", on_error)
        index.splits.setdefault(split, [])
        if clip is not None:
            index.splits[split].append(clip)
    return index

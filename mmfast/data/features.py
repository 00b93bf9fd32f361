"""Pre-extracted feature sequences: the generic layout's ``features`` kind (CMU-MOSEI's audio,
visual and text features, or any per-clip sequence computed ahead of training).

One ``.npy`` file per clip and modality holds a real-valued array [L_i, D]: L_i steps (any number
from 1, different per clip), D values per step (the same for every clip of the modality). Both
loaders turn it into a fixed-length sample:

    values  float32 [L, D]   the sequence, cut to L steps or padded with zeros to L
    mask    bool    [L]      True at the steps the sequence fills, False at the padding

L is ``FeatureRecipe.length`` (``data.feature_length``). A sequence longer than L gives a window
of L consecutive steps: in training one starting at floor(u * (L_i - L + 1)), u uniform in [0, 1)
drawn from the clip's per-sample generator (``train_offset="random"``, the default, like the
audio window), or its first L steps (``"start"``); in evaluation always its first L steps. A batch
carries the mask beside the values, under ``mask_key(modality)`` ("<modality>_mask").

Checks, each a DataError naming the file: a file NumPy cannot read as an ``.npy`` array (or one
shorter than its header says), an array that is not 2-D, a type that is not a real number (int or
float), no steps or no values per step, and D different from the modality's other clips (read
from the headers when the layout is read); non-finite values (read whole when a loader probes the
clip, and again whenever a sample is read).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import DataError

FEATURE_EXTS = (".npy",)
TRAIN_OFFSETS = ("random", "start")


def mask_key(modality: str) -> str:
    """The batch key of a features modality's padding mask (bool [B, L], True: a real step); the
    models read it under the same key (mmfast.models.sequence.mask_key: the layers share no code)."""
    return f"{modality}_mask"


@dataclass(frozen=True)
class FeatureRecipe:
    # L: steps of every sample. 50: the word-aligned CMU-MOSEI features as the multimodal
    # Transformer's and MultiBench's public data hold them (50 steps for text, audio and visual).
    length: int = 50
    # Where a training window of a longer sequence starts: "random" (the clip's generator; mmfast's
    # choice, as for the audio window: no paper fixes one) or "start" (the first L steps).
    train_offset: str = "random"

    def __post_init__(self):
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"FeatureRecipe: length must be an integer >= 1, got {self.length!r}")
        if self.train_offset not in TRAIN_OFFSETS:
            raise ValueError(f"FeatureRecipe: train_offset must be one of {TRAIN_OFFSETS}, got {self.train_offset!r}")

    def offset_fraction(self, train: bool, rng: np.random.Generator) -> float:
        """u in [0, 1): where the window of a sequence longer than L starts (drawn whatever the
        clip's length, so the draws of the clip's other modalities do not depend on it)."""
        return float(rng.random()) if train and self.train_offset == "random" else 0.0


def read_header(path) -> tuple:
    """(steps, dims) of a features file from its header (the values are not read). A DataError
    names the file: not a readable .npy array (or shorter than its header says), not 2-D, not
    real numbers, no steps or no dims."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read(f)
            values_at, size = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(path, "missing file") from None
    except Exception as exc:
        raise DataError(path, f"unreadable features: not a NumPy .npy array ({type(exc).__name__}: {exc})") from None
    _check_shape(path, shape, dtype)
    declared = math.prod(shape) * dtype.itemsize
    if size - values_at < declared:
        raise DataError(path, f"unreadable features: truncated, the header declares {declared} bytes of values, the "
                              f"file holds {size - values_at}")
    return shape


def _check_shape(path, shape: tuple, dtype: np.dtype) -> None:
    if len(shape) != 2:
        raise DataError(path, f"features not 2-D: shape {tuple(shape)}, expected [steps, dims]")
    if dtype.kind not in "fiu":
        raise DataError(path, f"features not real numbers: dtype {dtype} (expected int or float)")
    if shape[0] == 0:
        raise DataError(path, f"empty sequence: 0 steps (shape {tuple(shape)})")
    if shape[1] == 0:
        raise DataError(path, f"empty sequence: no values per step (shape {tuple(shape)})")


def load_features(path, dims: int | None = None) -> np.ndarray:
    """The sequence of a features file as float32 [L_i, D], checked: readable, 2-D, real numbers,
    at least one step, `dims` values per step (when given) and finite."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(path, "missing file") from None
    except Exception as exc:
        raise DataError(path, f"unreadable features: not a NumPy .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(array, np.ndarray):  # (an .npz archive under an .npy name)
        raise DataError(path, "unreadable features: not a NumPy .npy array (an .npz archive)")
    _check_shape(path, array.shape, array.dtype)
    if dims is not None and array.shape[1] != dims:
        raise DataError(path, f"wrong feature size: {array.shape[1]} values per step, the modality's other clips "
                              f"have {dims}")
    values = array.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise DataError(path, f"non-finite features: {len(bad)} values (the first at step {bad[0][0]}, "
                              f"value {bad[0][1]}: {values[tuple(bad[0])]})")
    return values


def feature_window(values: np.ndarray, length: int, u: float) -> tuple:
    """(values [length, D] float32, mask [length] bool): the window of `length` steps starting at
    floor(u * (L_i - length + 1)) of a longer sequence, or the sequence followed by zeros."""
    steps, dims = values.shape
    start = int(math.floor(u * (steps - length + 1))) if steps > length else 0
    part = values[start:start + length]
    out = np.zeros((length, dims), dtype=np.float32)
    out[:len(part)] = part
    mask = np.zeros(length, dtype=bool)
    mask[:len(part)] = True
    return out, mask


def feature_sample(path, dims: int, recipe: FeatureRecipe, u: float) -> tuple:
    """(values [L, D] float32, mask [L] bool) of one clip's features file (both loaders)."""
    return feature_window(load_features(path, dims), recipe.length, u)

"""Frame transforms of the naive loader (PIL + NumPy), the same recipe DALI applies: training
RandomResizedCrop (one crop for all frames of a clip) + horizontal flip; evaluation resize;
both normalised and returned channels-first."""
from __future__ import annotations

import math

import numpy as np

from .video import FrameRecipe


def random_resized_crop_box(width: int, height: int, recipe: FrameRecipe, rng: np.random.Generator):
    """(left, top, w, h) as torchvision's RandomResizedCrop chooses it (10 tries, then centre)."""
    area = width * height
    log_ratio = (math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*recipe.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < recipe.crop_ratio[0]:
        w, h = width, int(round(width / recipe.crop_ratio[0]))
    elif in_ratio > recipe.crop_ratio[1]:
        h, w = height, int(round(height * recipe.crop_ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def transform_frames(frames: np.ndarray, recipe: FrameRecipe, train: bool, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 3, size, size], normalised."""
    from PIL import Image

    T, H, W, _ = frames.shape
    size = (recipe.size, recipe.size)
    box = random_resized_crop_box(W, H, recipe, rng) if train else None
    flip = train and recipe.flip and rng.random() < 0.5
    out = np.empty((T, recipe.size, recipe.size, 3), dtype=np.float32)
    for t in range(T):
        img = Image.fromarray(frames[t])
        if box is not None:
            left, top, w, h = box
            img = img.resize(size, Image.BILINEAR, box=(left, top, left + w, top + h))
        elif img.size != size:
            img = img.resize(size, Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)
        out[t] = arr[:, ::-1] if flip else arr
    mean = np.asarray(recipe.mean, dtype=np.float32) * 255
    std = np.asarray(recipe.std, dtype=np.float32) * 255
    return ((out - mean) / std).transpose(0, 3, 1, 2).copy()

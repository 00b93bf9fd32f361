"""Frames: which frames of a clip to use, and the frame recipe.

T frames per clip, one from each of T equal segments of the clip's N frames: a uniformly random
frame of the segment in training, the segment's centre in evaluation. (The research loader
computes a random index but then takes the first file of an unsorted directory listing; here
frame folders are sorted by name and the index is used.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .layouts import FRAME_EXTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FrameRecipe:
    num_frames: int = 1  # T
    size: int = 224  # output frames are size x size
    crop_scale: tuple = (0.08, 1.0)  # training RandomResizedCrop area range
    crop_ratio: tuple = (3 / 4, 4 / 3)  # and aspect-ratio range
    flip: bool = True  # random horizontal flip in training
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        if self.num_frames < 1 or self.size < 1:
            raise ValueError("num_frames and size must be >= 1")


def segment_indices(num_available: int, num_frames: int, train: bool, rng: np.random.Generator) -> list:
    """Indices of the T frames to use out of `num_available`."""
    if num_available < 1:
        raise ValueError("a clip without frames has no frames to sample")
    out = []
    for k in range(num_frames):
        u = float(rng.random()) if train else 0.5
        out.append(min(num_available - 1, int((k + u) * num_available / num_frames)))
    return out


def frame_files(folder: Path) -> list:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in FRAME_EXTS)
    if not files:
        raise DataError(folder, "no frames (jpg/png) in the frame folder")
    return files


def probe_frames(folder: Path) -> tuple:
    """(sorted frame files, (width, height)) of a frame folder. Every frame's header is read (no
    decoding): a file that is not an image, a JPEG cut before its size, or frames of different
    sizes raise a DataError naming the frame."""
    from PIL import Image

    files = frame_files(folder)
    size = None
    for path in files:
        try:
            with Image.open(path) as img:
                this = img.size
                if img.format not in ("JPEG", "PNG") or this[0] < 1 or this[1] < 1:
                    raise DataError(path, f"corrupt image: a {img.format} of size {this}")
        except DataError:
            raise
        except Exception as exc:
            raise DataError(path, f"corrupt image: {type(exc).__name__}: {exc}") from None
        if size is not None and this != size:
            raise DataError(path, f"frame size {this[0]}x{this[1]} differs from the folder's first frame "
                                  f"({size[0]}x{size[1]})")
        size = this
    return files, size


def probe_video(path) -> tuple:
    """(frames, codec name, (width, height)) of the first video stream: frames from the container
    header or by counting packets (no decoding). Raises DataError for missing, unreadable or
    frameless files."""
    import av

    path = Path(path)
    if not path.exists():
        raise DataError(path, "missing file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            size = (stream.codec_context.width, stream.codec_context.height)
            n = stream.frames
            if n <= 0:
                n = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, f"corrupt video: {type(exc).__name__}: {exc}") from None
    if n <= 0:
        raise DataError(path, "corrupt video: no frames")
    if size[0] < 1 or size[1] < 1:
        raise DataError(path, f"corrupt video: frame size {size[0]}x{size[1]}")
    return n, codec, size


def decode_video_frames(path, indices) -> np.ndarray:
    """RGB uint8 frames [len(indices), H, W, 3] at the given indices (PyAV: any codec)."""
    import av

    wanted = sorted(set(indices))
    got = {}
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in got or i not in wanted:
                    if i > wanted[-1]:
                        break
                    continue
                got[i] = frame_to_rgb(frame)
                if len(got) == len(wanted):
                    break
    except Exception as exc:
        raise DataError(path, f"corrupt video: {type(exc).__name__}: {exc}") from None
    missing = [i for i in wanted if i not in got]
    if missing:
        raise DataError(path, f"truncated video: frame {missing[0]} could not be decoded")
    return np.stack([got[i] for i in indices])


def _upsample_2x(plane: np.ndarray, axis: int, length: int) -> np.ndarray:
    """2x centre-aligned linear upsampling along `axis` (weights 3/4 and 1/4, edges clamped:
    libjpeg's "fancy" upsampling), cut to `length`."""
    plane = np.moveaxis(plane.astype(np.float32), axis, 0)
    padded = np.concatenate([plane[:1], plane, plane[-1:]])
    near = np.repeat(plane, 2, axis=0)
    far = np.empty_like(near)
    far[0::2], far[1::2] = padded[:-2], padded[2:]
    return np.moveaxis(0.75 * near + 0.25 * far, 0, axis)[:length] if axis == 0 else \
        np.moveaxis(0.75 * near + 0.25 * far, 0, axis)[:, :length]


def frame_to_rgb(frame) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a decoded PyAV frame. YUV 4:2:0 and 4:2:2 are converted the way
    DALI's decoders do it (centre-aligned linear chroma upsampling, BT.601 coefficients, rounded):
    limited range (most video) as its video decoder, full range (MJPEG's yuvj formats) as its
    JPEG decoder, so both loaders agree within rounding; other formats go through swscale."""
    name = frame.format.name
    full = name.startswith("yuvj") or int(frame.color_range) == 2  # 2: full (JPEG) range
    layout = name.replace("yuvj", "yuv")
    if layout not in ("yuv420p", "yuv422p"):
        return frame.to_ndarray(format="rgb24")
    height, width = frame.height, frame.width
    planes = [np.frombuffer(p, np.uint8).reshape(-1, p.line_size) for p in frame.planes]
    chroma_h = (height + 1) // 2 if layout == "yuv420p" else height
    chroma = []
    for plane in planes[1:3]:
        c = _upsample_2x(plane[:chroma_h, : (width + 1) // 2], 1, width)
        chroma.append((_upsample_2x(c, 0, height) if layout == "yuv420p" else c) - 128)
    u, v = chroma
    y = planes[0][:height, :width].astype(np.float32)
    if full:
        s = 1.0
    else:
        y, s = (y - 16) * (255 / 219), 255 / 224
    rgb = np.stack([y + 1.402 * s * v, y - 0.344136 * s * u - 0.714136 * s * v, y + 1.772 * s * u], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

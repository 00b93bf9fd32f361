"""Frames and video (mmfast/data/video.py): segment indices, MJPEG and codecs CPU DALI cannot decode
(PyAV), frame folders probed frame by frame."""
import shutil

import numpy as np
import pytest
import torch

from mmfast.data import DataError, build_loader, read_layout
from mmfast.data.synth import FPS, SIZE
from mmfast.data.video import segment_indices

from datasupport import FRAMES, broken_copy, collect, config

pytest.importorskip("nvidia.dali")


def test_segment_indices(gen):
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=gen)))
    assert segment_indices(12, 3, False, rng) == [2, 6, 10]
    assert segment_indices(1, 3, False, rng) == [0, 0, 0]
    for _ in range(20):
        idx = segment_indices(12, 3, True, rng)
        assert [i // 4 for i in idx] == [0, 1, 2]  # one frame from each segment


def _reencode(synth, tmp_path, codec, pix_fmt, container="matroska", suffix=".webm", colour=False):
    """A copy of the embedded dataset with every video re-encoded (`colour`: blended with a colour
    gradient, so chroma varies across the frame as in real footage)."""
    import av

    root, _ = broken_copy(synth, tmp_path, lambda r, c: c.files["visual"])
    index = read_layout(root, "crema_d")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    gradient = np.stack([xx * 255 // SIZE, yy * 255 // SIZE, 255 - (xx + yy) * 127 // SIZE], -1)
    for clip in [c for clips in index.splits.values() for c in clips]:
        src = clip.files["visual"]
        with av.open(str(src)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        src.unlink()
        with av.open(str(src.with_suffix(suffix)), "w", format=container) as out:
            stream = out.add_stream(codec, rate=FPS)
            stream.width = stream.height = SIZE
            stream.pix_fmt = pix_fmt
            for frame in frames:
                frame = ((frame.astype(np.int32) + gradient) // 2).astype(np.uint8) if colour else frame
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return root


@pytest.mark.parametrize("pix_fmt", ["yuvj420p", "yuvj422p"])
def test_mjpeg_frames_agree_within_one_level(synth, tmp_path, pix_fmt):
    """MJPEG is full-range YUV with subsampled chroma; the naive loader converts it the way DALI's
    JPEG decoder does (it used to go through swscale: up to 29 levels apart)."""
    root = _reencode(synth, tmp_path, "mjpeg", pix_fmt, container="avi", suffix=".avi", colour=True)
    cfg = config(root, device="cpu")
    loader = build_loader(cfg, "test", backend="dali")
    assert loader.pyav_modalities == set()  # CPU DALI decodes MJPEG itself
    dali, naive = collect(loader), collect(build_loader(cfg, "test", backend="naive"))
    std = torch.tensor(FRAMES.std).view(1, 1, 3, 1, 1) * 255
    pixel_diff = (dali["visual"] - naive["visual"]).abs() * std
    assert pixel_diff.max() <= 1.01 and pixel_diff.mean() < 0.05


def test_codecs_cpu_dali_cannot_decode_fall_back_to_pyav(synth, tmp_path):
    # Every clip re-encoded with MPEG-4 Part 2, which DALI decodes only on a GPU.
    root = _reencode(synth, tmp_path, "mpeg4", "yuv420p")
    cfg = config(root, device="cpu")
    loader = build_loader(cfg, "test", backend="dali")
    assert loader.pyav_modalities == {"visual"}
    dali, naive = collect(loader), collect(build_loader(cfg, "test", backend="naive"))
    assert torch.equal(dali["index"], naive["index"])
    std = torch.tensor(FRAMES.std).view(1, 1, 3, 1, 1) * 255
    assert ((dali["visual"] - naive["visual"]).abs() * std).max() < 0.01  # the same PyAV frames
    assert (dali["audio"] - naive["audio"]).abs().max() < 1e-3


def test_frame_folders_are_probed_frame_by_frame(synth, tmp_path):
    root = tmp_path / "frames"
    shutil.copytree(synth, root)
    clip = read_layout(root, "crema_d").splits["test"][0]
    frames = sorted(clip.files["visual"].iterdir())
    frames[-1].write_bytes(b"\xff\xd8\xff\xe0" + b"0" * 13)
    with pytest.raises(DataError, match="corrupt image") as info:
        build_loader(config(root), "test", backend="naive")
    assert info.value.path == str(frames[-1])
    from PIL import Image

    Image.new("RGB", (8, 8)).save(frames[-1], format="JPEG")
    with pytest.raises(DataError, match="differs from the folder's first frame"):
        build_loader(config(root), "test", backend="naive")

"""What the data tests share: the frame recipe, a DataConfig for a root, every batch of a loader, a copy of
the dataset with one clip broken."""
import shutil

import torch

from mmfast.data import DataConfig, FrameRecipe, read_layout
from mmfast.data.synth import SIZE

FRAMES = FrameRecipe(num_frames=3, size=SIZE)  # native size: evaluation resizing is the identity


def config(root, **kw):
    return DataConfig(root=str(root), frames=kw.pop("frames", FRAMES), batch_size=kw.pop("batch_size", 5),
                      num_workers=kw.pop("num_workers", 0), **kw)


def collect(loader):
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def broken_copy(synth, tmp_path, break_fn):
    root = tmp_path / "broken"
    shutil.copytree(synth, root, ignore=shutil.ignore_patterns("Image-01-FPS"))
    index = read_layout(root, "crema_d")
    victim = index.splits["train"][0]
    target = break_fn(root, victim)
    return root, target

"""One entry point for both data backends: ``build_loader(cfg, split, backend="dali"|"naive")``.

Both yield the same batches, dicts of tensors:
    <audio modality>  float32 [B, n_fft // 2 + 1, frames]   log-magnitude spectrogram
    <video/frames>    float32 [B, T, 3, size, size]         normalised frames
    <features>        float32 [B, L, D]                     sequences cut or zero-padded to L steps
    "<features>_mask" bool    [B, L]                        True at the steps a sequence fills
    "label"           int64   [B]
    "index"           int64   [B]   position of the clip in the split (after skips)
An epoch is one ``for batch in loader`` pass (or ``loader.batches(start=k)``, from batch k of the
epoch's plan); training splits are reshuffled every epoch from (seed, epoch). Every clip is probed
once when the loader is built (files exist and decode, audio is long enough and not silent,
videos have frames, every frame of a frame folder has a readable header): bad clips raise a
DataError naming the file, or with on_error="skip" are left out and counted in
``loader.skipped_at_build`` (this split's only). A clip that fails to decode during a pass raises
a DataError naming it and its file, or is left out alone and counted in ``loader.skipped``
(``loader.last_epoch_skipped`` after the pass). Evaluation splits never drop a readable sample.
"""
from __future__ import annotations

from .base import ClipLoader, DataConfig  # noqa: F401  (re-exported: the loaders' shared base)
from .layouts import read_layout

BACKENDS = ("dali", "naive")


def build_loader(cfg: DataConfig, split: str, backend: str = "dali", *, train: bool | None = None) -> ClipLoader:
    """A loader over `split` of the dataset `cfg` describes. `train` (default: split == "train")
    selects random windows/frames/crops and per-epoch shuffling."""
    cfg.check()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "naive" and cfg.cache not in ("off", "auto"):
        raise ValueError(f"data.cache={cfg.cache!r}: the decoded-sample cache is read by the DALI backend; the "
                         f"naive loader (the research code's way) decodes every epoch (use data.cache=off)")
    index = read_layout(cfg.root, cfg.layout, modalities=cfg.modalities, on_error=cfg.on_error,
                        allow_overlap=cfg.allow_overlap)
    train = (split == "train") if train is None else train
    if backend == "naive":
        from .naive import NaiveLoader

        return NaiveLoader(cfg, index, split, train)
    from .dali_loader import DaliLoader

    return DaliLoader(cfg, index, split, train)

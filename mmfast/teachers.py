"""Uni-modal teachers: for each modality a model of its own (the run's kind of encoder and a
linear classifier) trained alone with cross-entropy before the run's first step, for a method
that distils from them (UMT). A method asks for them (``Method.teacher_runs``); the trainer
builds each here and hands it over (``Balancer.observe_teacher``), frozen and in eval mode.

A teacher is kept in the run folder (``teachers/<modality>.pt``: its weights and what it was
trained on), so a resumed run, or another run pointed at the folder (the method's `teachers`
hyper-parameter), loads it instead of training it again; a teacher trained on another dataset,
encoder or budget is refused by name. Training one leaves the run untouched: its random state
and data order carry on as if no teacher had been trained.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .methods.base import TeacherRun
from .models.multimodal import make_encoder, run_encoder
from .models.sequence import mask_key
from .run_dir import atomic_save
from .scratch import train_epoch

TEACHER_VERSION = 1


class Teacher(nn.Module):
    """A uni-modal model of `modality`: encoder -> pooled features -> linear classifier. It reads
    its modality (and a features modality's padding mask) from a batch's inputs."""

    def __init__(self, modality: str, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.modality = modality
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.out_dim, num_classes)

    def features(self, inputs) -> torch.Tensor:
        """Pooled features [B, d] of the modality in `inputs` (modality name -> tensor)."""
        return run_encoder(self.encoder, inputs[self.modality], inputs.get(mask_key(self.modality)))

    def forward(self, inputs) -> torch.Tensor:
        return self.classifier(self.features(inputs))


def teacher_file(folder: str | Path, modality: str) -> Path:
    """Where a run folder keeps the teacher of `modality`."""
    return Path(folder) / "teachers" / f"{modality}.pt"


# The data settings a teacher's samples depend on (the layout and root are in the dataset's
# fingerprint; loading settings such as the backend or the threads change no sample).
SAMPLE_KEYS = ("audio", "num_frames", "size", "feature_length", "feature_train_offset", "batch_size")


def identity(trainer, run: TeacherRun) -> dict:
    """What a kept teacher must match to be reused: the dataset, the modality's kind, its samples'
    settings, the encoder, the training budget and the optimizer settings."""
    cfg = trainer.cfg
    return {"version": TEACHER_VERSION, "modality": run.modality, "kind": trainer.modalities[run.modality],
            "dataset": trainer.dataset, **{f"data.{k}": getattr(cfg.data, k) for k in SAMPLE_KEYS},
            "encoder": cfg.model.encoder, "width": cfg.model.width,
            "weights": (cfg.model.weights or {}).get(run.modality), "epochs": run.epochs, "optim": dict(vars(cfg.optim)),
            "seed": cfg.seed}


def teacher_for(trainer, run: TeacherRun, source: str | Path | None = None) -> Teacher:
    """The teacher `run` names: loaded from `source` (a run folder holding teachers/) or from this
    run's folder when kept there, else trained and kept in this run's folder."""
    want = identity(trainer, run)
    path = teacher_file(source if source is not None else trainer.out, run.modality)
    exists = trainer.dist.broadcast_object(path.is_file())  # (rank 0's view of the folder on every rank)
    if not exists and source is not None:
        raise FileNotFoundError(f"teachers folder {str(source)!r} holds no teacher for {run.modality!r} ({path})")
    if exists:
        kept = torch.load(path, map_location=trainer.device, weights_only=True)
        differ = [k for k in want if k not in ("seed",) and kept.get("identity", {}).get(k) != want[k]]
        if differ:
            raise ValueError(f"the teacher in {path} was trained on other settings ({', '.join(differ)}: "
                             f"{[kept.get('identity', {}).get(k) for k in differ]} vs this run's "
                             f"{[want[k] for k in differ]}); remove it to train a new one")
        teacher = _build(trainer, run)
        teacher.load_state_dict(kept["model"])
    else:
        teacher = train_teacher(trainer, run)
        if trainer.dist.enabled:  # (batch norm's statistics are each rank's own: rank 0's teacher for all)
            state = trainer.dist.broadcast_object({k: v.cpu() for k, v in teacher.state_dict().items()})
            teacher.load_state_dict(state)
        if trainer.dist.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"identity": want, "model": teacher.state_dict()}, path)
    teacher.eval().requires_grad_(False)
    return teacher


def _build(trainer, run: TeacherRun) -> Teacher:
    cfg = trainer.cfg
    encoder = make_encoder(run.modality, trainer.modalities[run.modality], cfg.model.encoder, cfg.model.width,
                           (cfg.model.weights or {}).get(run.modality), trainer.feature_dims.get(run.modality))
    return Teacher(run.modality, encoder, len(trainer.classes)).to(trainer.device)


def train_teacher(trainer, run: TeacherRun) -> Teacher:
    """A teacher trained alone for run.epochs epochs on the run's training split, with a fresh
    optimizer and schedule of the run's settings; its initial weights are drawn from a generator
    seeded by the run's seed and the modality's position (the same teacher however the run
    started)."""
    position = list(trainer.modalities).index(run.modality)
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    loader = trainer.loaders["train"]
    epoch_before = loader.epoch
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(trainer.cfg.seed * 1009 + position + 1)
        teacher = _build(trainer, run)
        optimizer = trainer.make_optimizer(teacher.parameters())
        scheduler = trainer.make_scheduler(optimizer, run.epochs)

        def loss(inputs, labels):  # per-sample CE of the teacher's prediction [B]
            with trainer.steps.autocast():
                logits = teacher(inputs)
            return F.cross_entropy(logits.float(), labels, reduction="none")

        for epoch in range(run.epochs):
            teacher.train()
            loader.epoch = epoch
            loss_sum, samples, _ = train_epoch(trainer, teacher, optimizer, loss)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(loss_sum / max(samples, 1.0))
            elif scheduler is not None:
                scheduler.step()
    loader.epoch = epoch_before
    return teacher

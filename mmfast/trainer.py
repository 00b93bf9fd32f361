"""The one training loop of mmfast. Methods are not subclasses of it: they are small objects
reacting to the step's named events (mmfast/methods), driven through ``mmfast.methods.Balancer``,
the object users with their own loop call too. Per step:

    features = model.encode(batch)                 # [B, d_m] per modality (unused ones: zeros)
    features = balancer.drop(features)             # before_fusion (a method may drop or zero features)
    fused, unimodal, *extra = model.head(features)
    balancer.after_forward(unimodal, labels, ...)  # measure once, update device state, loss terms
    loss = weighted CE over the kept samples (+ method loss terms), or the method's task loss
    loss.backward(); balancer.after_backward()     # modulate unscaled gradients
    optimizer.step(); balancer.after_step()

(A method that updates the modalities in turn makes one such sub-step per modality:
``balancer.update_parts()``.) Heads with a classifier per modality train those too: the task
loss is the sum of every head's cross-entropy (mmfast/models/registry.py), unless a method
computes its own. What a method needs from this loop it declares (mmfast/methods/base.py:
evaluations, scratch runs, sub-steps, extra forwards); nothing here knows a method by name.

Nothing in a step reads a tensor on the host: losses, accuracies, ratios and coefficients are
summed on the device and read once per logging interval (the progress bar) and at epoch ends.
The run directory (``cfg.out``) holds config.yaml, metrics.jsonl (one flat JSON object per
epoch), summary.json, checkpoints/{last,previous,best}.pt and plots; mmfast/run_dir.py keeps
them true to the training (one writer, atomic writes, last.pt as the epoch end's commit point,
repair on resume).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import config as config_mod
from .methods import Balancer
from .methods.registry import check_modalities
from .evaluation import Evaluator, NonFiniteError
from .cpu_memory import retain_freed_memory
from .distributed import init_from_env, sync_batch_norm
from .models import build_model
from .steps import StepRunner
from .checkpoints import CHECKPOINT_VERSION, RunDirectory
from .run_dir import RunDirError, fault_point



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device' is 'cuda' but no CUDA GPU is available")
    return torch.device(name)


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively, so that bf16 autocast speeds a step up: CUDA
    GPUs of compute capability 8.0 or later, CPUs with AVX512-BF16 or AMX. Elsewhere oneDNN
    emulates bf16 (a step on a 2-core AVX2 CPU took 7x longer than in fp32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # (torch.cpu's own probes)
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(name: str, device: torch.device) -> str:
    """config key 'precision', with "auto" resolved to bf16 where the device has bf16 units, else fp32."""
    if name == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    return name


def data_config(cfg: config_mod.Config, device: torch.device):
    from .data import DataConfig, FeatureRecipe, FrameRecipe
    from .data import audio as audio_recipes

    d = cfg.data
    return DataConfig(root=d.root, layout=d.layout, modalities=d.modalities, audio=getattr(audio_recipes, d.audio)(),
                      frames=FrameRecipe(num_frames=d.num_frames, size=d.size),
                      features=FeatureRecipe(length=d.feature_length, train_offset=d.feature_train_offset),
                      batch_size=d.batch_size,
                      num_workers=d.num_workers, seed=cfg.seed, on_error=d.on_error, allow_overlap=d.allow_overlap,
                      device=device.type, cache=d.cache if d.backend == "dali" else "off",
                      cache_max_gb=d.cache_max_gb)


def ensure_dataset(cfg: config_mod.Config) -> None:
    """Generates the embedded dataset at data.root when the config asks for it (data.synth) and
    the folder is absent or empty; then data.root must be a folder."""
    from .data import generate

    root = Path(cfg.data.root)
    if cfg.data.synth is not None and not (root.exists() and any(root.iterdir()) if root.is_dir() else root.exists()):
        generate(root, **cfg.data.synth)
    if not root.is_dir():
        raise ValueError(f"config key 'data.root' must be a dataset folder: {root} "
                         f"{'is a file' if root.exists() else 'does not exist'}")


def dataset_identity(index) -> dict:
    """What a checkpoint records of the dataset it trained on: clips per split and a hash of the
    classes, the modalities and every split's (clip, label) list, in order."""
    h = hashlib.sha256(json.dumps([index.classes, index.kinds]).encode())
    for split in sorted(index.splits):
        h.update(json.dumps([split, [(c.clip_id, c.label) for c in index.splits[split]]]).encode())
    return {"fingerprint": h.hexdigest(), "clips": {k: len(v) for k, v in sorted(index.splits.items())}}


class Trainer:
    """The one training loop. `mode`: "fresh" starts a run in cfg.out (refused where a run is
    already), "resume" continues the run in cfg.out from its checkpoint (use ``resume(DIR)``,
    which reads DIR's config), "read" loads a run's checkpoint without writing (``resume(DIR,
    read_only=True)``: evaluation). A training holds the run directory's lock from here to the
    end of fit() (``close()`` or the process's end release it otherwise)."""

    def __init__(self, cfg: config_mod.Config, *, resume: bool = False, mode: str | None = None):
        mode = mode or ("resume" if resume else "fresh")
        if mode not in ("fresh", "resume", "read"):
            raise ValueError(f"Trainer mode must be fresh, resume or read, got {mode!r}")
        config_mod.check_config(cfg)
        self.cfg, self.mode = cfg, mode
        # Under torchrun (WORLD_SIZE > 1): join the process group; each rank trains on its shard
        # of every global batch (data.batch_size) and only rank 0 writes (mmfast/distributed.py).
        self.dist = init_from_env(cfg.device, timeout_s=cfg.dist_timeout_s)
        self.out = Path(cfg.out)
        self.run = RunDirectory(self.out, mode, self.dist, resolve_device(cfg.device))
        try:
            state = self.run.open(cfg)
            self._build(cfg)
            if mode == "fresh":  # (only once the run could be built: a failed start leaves no run state)
                self.run.write_config(cfg)
            if state is not None:
                self.run.check_dataset(state, self.dataset, cfg)
                self._load_state(state)
            self._wall_time_before = state.get("wall_time_s", 0.0) if state is not None else 0.0
            if mode == "resume":
                adopted = self.run.repair(state, cfg)
                if adopted is not None:
                    self.best = adopted
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (fit() does at its end)."""
        self.run.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _build(self, cfg) -> None:
        from .data import build_loader, read_layout

        self.device = resolve_device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.retain_freed_memory and self.device.type == "cpu":  # (no page faults on each step's buffers)
            retain_freed_memory()
        self._seed_everything(cfg.seed)
        ensure_dataset(cfg)
        dcfg = data_config(cfg, self.device)
        index = read_layout(dcfg.root, dcfg.layout, modalities=dcfg.modalities, on_error=dcfg.on_error,
                            allow_overlap=dcfg.allow_overlap)
        self.dataset = dataset_identity(index)
        self.modalities = dict(index.kinds)
        check_modalities(cfg.method, list(self.modalities))
        self.feature_dims = dict(index.feature_dims)  # features modalities: values per step
        self.classes = list(index.classes)
        self.loaders = {"train": build_loader(dcfg, "train", cfg.data.backend)}
        if self.dist.enabled:
            self.loaders["train"].set_shard(self.dist.rank, self.dist.world_size)
        self.fusion = config_mod.resolved_fusion(cfg)
        self.model = build_model(self.modalities, len(self.classes), encoder=cfg.model.encoder, fusion=self.fusion,
                                 width=cfg.model.width, weights=cfg.model.weights, in_dims=self._sequence_dims(dcfg),
                                 irfb=cfg.model.irfb, mmtm=config_mod.resolved_mmtm(cfg))
        self.model.to(self.device)
        if self.dist.enabled and cfg.sync_bn:
            self.model = sync_batch_norm(self.model, self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.compile:  # (in place: parameters, state-dict keys and the methods' encoder map stay)
            for encoder in self.model.encoders.values():
                encoder.compile(dynamic=False)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        # (rank 0's choice on every rank: replicas of a mixed cluster compute alike; summary.json records it)
        self.precision = self.dist.broadcast_object(resolve_precision(cfg.precision, self.device))
        self.steps = StepRunner(self.model, self.optimizer, cfg=cfg, fusion=self.fusion, modalities=self.modalities,
                                device=self.device, dist=self.dist, precision=self.precision)
        self.autocast_dtype, self.scaler = self.steps.autocast_dtype, self.steps.scaler
        self.evaluator = Evaluator(self.model, self.steps, self.loaders, classes=self.classes, dist=self.dist,
                                   seed=cfg.seed, context=self._context,
                                   make_loader=lambda split: build_loader(data_config(cfg, self.device), split,
                                                                          cfg.data.backend, train=False))
        for split in ("val", "test"):
            if split in index.splits:  # (a split file that lists no clip is refused by the loader)
                self.evaluator.add_loader(split, self.evaluator.make_loader(split))
        try:
            self.balancer = Balancer(cfg.method, dict(self.model.encoders.items()), seed=cfg.seed, device=self.device,
                                     measure=True, head=self.model.fusion, optimizer=self.optimizer,
                                     scheduler=self.scheduler, dist=self.dist, estimate=self.steps.estimate,
                                     mmtm=getattr(self.model, "mmtm", None), epochs=cfg.epochs, **cfg.hparams)
        except ValueError as err:
            raise ValueError(f"config key 'hparams' (method {cfg.method!r}): {err}") from None
        wanted = {s for epoch in (None, *range(cfg.epochs)) for s in self.balancer.evaluations(epoch)}
        if any(self.balancer.scratch_runs(epoch) for epoch in range(cfg.epochs)):
            wanted.add("val")  # (a scratch run reports its validation loss)
        if "val" in wanted and "val" not in self.loaders:
            raise ValueError(f"method {cfg.method!r} (hparams {cfg.hparams}) evaluates the validation split during "
                             f"training: the dataset has no val split")
        if self.balancer.single_micro_batch and cfg.grad_accum > 1:
            raise ValueError(f"config key 'grad_accum': method {cfg.method!r} (hparams {cfg.hparams}) takes one batch "
                             f"per step (an update in turns per modality, or gradients per loss); set grad_accum=1")
        self._hold_out(cfg)
        self.steps.balancer = self.evaluator.balancer = self.balancer
        self.balancer.state.autocast = self.steps.autocast  # (models a method runs in the step: its precision)
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.best = {"epoch": None, "val/acc": -math.inf}
        self.history: list[dict] = []  # the epochs' metrics lines (checkpoints carry them: repair)
        self._segment_start = time.perf_counter()  # (fit() restarts it; wall time counts fit's segments)
        self._prepared = False

    # ---- construction ------------------------------------------------------------------------

    def _hold_out(self, cfg) -> None:
        """The training clips a method holds out (Method.held_out) leave the training plan for
        the whole run (a function of the seed: a resumed run holds out the same ones)."""
        from .data.base import held_out_positions

        self._held_out, self._held_out_batch = self.balancer.held_out(), None
        if self._held_out is None:
            return
        spec, loader = self._held_out, self.loaders["train"]
        where = f"method {cfg.method!r} (hparams {cfg.hparams})"
        if not 1 <= spec.batch <= spec.clips < len(loader.base_clips):
            raise ValueError(f"{where} holds out {spec.clips} training clips and uses {spec.batch} of them: the "
                             f"training split has {len(loader.base_clips)} usable clips (hold out fewer)")
        if cfg.compile:
            raise ValueError(f"{where} differentiates the model twice on its held-out batch, which compiled "
                             f"encoders cannot (torch.compile has no double backward): set compile=false")
        self._held_out_clips = held_out_positions(cfg.seed, len(loader.base_clips), spec.clips)
        loader.set_held_out(self._held_out_clips)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _sequence_dims(self, dcfg) -> dict[str, int]:
        """Input sizes the encoders of sequences need: frequency bins of spectrograms (or the mel
        bins of [T, mel] filter banks, whose IRFB stem reads them as feature sequences), and the
        values per step of features modalities."""
        recipe = dcfg.audio
        return {**{name: recipe.shape[1] if recipe.features == "fbank" else recipe.shape[0]
                   for name, kind in self.modalities.items() if kind == "audio"}, **self.feature_dims}

    def _make_optimizer(self):
        return self.make_optimizer(self.model.parameters())

    def make_optimizer(self, params):
        """An optimizer of the run's settings (optim.*) over `params`, in its initial state."""
        o = self.cfg.optim
        params = list(params)
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)

    def _make_scheduler(self):
        return self.make_scheduler(self.optimizer, self.cfg.epochs)

    def make_scheduler(self, optimizer, epochs: int):
        """A schedule of the run's settings (optim.scheduler) for `optimizer` over `epochs` epochs
        (stepped once an epoch; plateau: with the epoch's training loss), or None."""
        o = self.cfg.optim
        if o.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma)
        if o.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        if o.scheduler == "plateau":  # (x gamma when the training loss stops falling)
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=o.gamma, patience=o.patience)
        return None

    # ---- the step ----------------------------------------------------------------------------

    def _inputs(self, batch):
        return self.steps.inputs(batch)

    def _forward(self, inputs, skip=(), drop=None, measure_dropped=False):
        return self.steps.forward(inputs, skip=skip, drop=drop, measure_dropped=measure_dropped)

    def train_step(self, batch, *, last_micro_batch: bool = True, shard: tuple[int, int] | None = None) -> None:
        """One training step on `batch`; shard: (start, total) of these samples in the global
        batch (distributed runs; the loader's batch_shard)."""
        inputs, labels = self._inputs(batch)
        if self.dist.enabled and shard is None:
            raise ValueError("Trainer.train_step: a distributed run needs shard=(start, total) of the batch")
        keep = batch["keep"].to(self.device, non_blocking=True) if "keep" in batch else None  # (re-sampled copies)
        self.steps.step(inputs, labels, last_micro_batch=last_micro_batch, shard=shard, keep=keep)
        if last_micro_batch:
            self.global_step += 1  # training steps (one optimizer step per part)

    def _context(self) -> str:
        """Where the run stands, for error messages: epoch, steps, the checkpoint kept."""
        return f"epoch {self.epoch}, {self.global_step} steps trained; {self.run.kept_checkpoint()}"

    def _check_finite(self) -> None:
        """A checkpoint or an epoch end: read the device flags once. A non-finite loss or gradient
        (flagged at its step) or a non-finite parameter or buffer (an update that overflowed
        from finite gradients) stops the run before anything is saved or validated."""
        bad = int(self.steps.bad_step)
        if bad >= 0:
            raise NonFiniteError(f"non-finite loss or gradient at training step {bad} (epoch {self.epoch}); the run "
                                 f"stops here and writes no checkpoint: {self.run.kept_checkpoint()}")
        if not self.steps.state_finite():
            raise NonFiniteError(f"the model's parameters are non-finite after training step {self.global_step - 1} "
                                 f"(epoch {self.epoch}; the losses and gradients before it were finite: an update "
                                 f"overflowed, optim.lr={self.cfg.optim.lr:g}); the run stops here and writes no "
                                 f"checkpoint: {self.run.kept_checkpoint()}")

    # ---- epochs ------------------------------------------------------------------------------

    def train_epoch(self, max_steps: int | None = None) -> dict[str, float] | None:
        """One epoch (from batch self.batch_in_epoch on, after a resume). Returns the epoch's
        train metrics, or None when the run reached max_steps optimizer steps in all (as if
        killed there: for tests of resuming)."""
        from tqdm import tqdm

        loader = self.loaders["train"]
        if self.batch_in_epoch == 0:  # (a resumed epoch's methods kept what these gave them)
            self._scratch_for_methods(self.epoch)
            self._held_out_for_methods(self.epoch)
        loader.epoch = self.epoch
        copies = self.balancer.sample_copies(self.epoch)  # (re-sampling methods; a resumed epoch too)
        loader.set_copies(None if copies is None else copies[1], index=None if copies is None else copies[0])
        self.model.train()
        self.balancer.start_epoch(self.epoch, batches=len(loader))
        start = time.perf_counter()
        accum = self.cfg.grad_accum
        bar = tqdm(total=len(loader), initial=self.batch_in_epoch, desc=f"epoch {self.epoch}", leave=False,
                   disable=not self._live_bar())
        # Resumed mid-epoch: the pass starts at the next batch of the same plan (a function of
        # seed and epoch); loader.position counts plan batches, also one whose clips all failed.
        for batch in loader.batches(start=self.batch_in_epoch):
            position = loader.position
            last = position % accum == 0 or position == len(loader)
            shard = loader.batch_shard(position - 1) if self.dist.enabled else None
            self.train_step(batch, last_micro_batch=last, shard=shard)
            bar.update(position - self.batch_in_epoch)
            self.batch_in_epoch = position
            if last:
                if self._live_bar() and self.global_step % 10 == 0:
                    bar.set_postfix(self.steps.live_postfix())
                fault_point("train_step")
                if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint("last.pt")
                if max_steps is not None and self.global_step >= max_steps:
                    bar.close()
                    self.save_checkpoint("last.pt")
                    return None
        bar.close()
        self._check_finite()
        metrics = self.steps.epoch_metrics(time.perf_counter() - start)
        metrics["train/skipped"] = loader.last_epoch_skipped.total  # clips that failed to decode this epoch
        if self.scaler is not None:
            metrics["train/skipped_steps"] = skipped = int(self.steps.skipped_steps)  # the epoch's one read
            self.steps.skipped_steps.zero_()
            if skipped and skipped >= math.ceil(len(loader) / accum):
                raise NonFiniteError(f"every optimizer step of epoch {self.epoch} was skipped by the GradScaler "
                                     f"(non-finite gradients at every loss scale); {self.run.kept_checkpoint()}")
        self.balancer.end_epoch()
        self.steps.parameters_changed()  # (a method that added parameters: DDP is rebuilt)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metrics["train/loss"])
        elif self.scheduler is not None:
            self.scheduler.step()
        return metrics

    def _live_bar(self) -> bool:
        """A live progress bar: on a terminal only (a log file gets one line per epoch instead)."""
        return self.cfg.progress and self.dist.is_main and sys.stderr.isatty()

    def _epoch_line(self, metrics: dict) -> None:
        """progress without a terminal: one line per epoch on stderr."""
        if not (self.cfg.progress and self.dist.is_main) or sys.stderr.isatty():
            return
        val = f", val acc {metrics['val/acc']:.3f}" if "val/acc" in metrics else ""
        best = " (best)" if self.best["epoch"] == metrics["epoch"] else ""
        print(f"{self.out.name} epoch {metrics['epoch'] + 1}/{self.cfg.epochs}: train loss {metrics['train/loss']:.3f}, "
              f"acc {metrics['train/acc']:.3f}{val}{best}, {metrics['time/epoch_s']:.1f} s", file=sys.stderr, flush=True)

    # ---- evaluation (mmfast/evaluation.py Evaluator) --------------------------------------------

    def evaluate(self, split: str, *, missing: dict[str, float] | None = None, seed: int = 0) -> dict[str, float]:
        """Fused and per-modality metrics on `split` (Evaluator.evaluate)."""
        return self.evaluator.evaluate(split, missing=missing, seed=seed)

    def outputs(self, split: str, *, missing: dict[str, float] | None = None, seed: int = 0, features: bool = False):
        """The model's fused and uni-modal logits and the labels on `split` (Evaluator.outputs)."""
        return self.evaluator.outputs(split, missing=missing, seed=seed, features=features)

    def encoder_features(self, split: str):
        """Frozen features of every encoder on `split`, and the labels (Evaluator.encoder_features)."""
        return self.evaluator.encoder_features(split)

    def linear_probe(self, train_split: str = "train", test_split: str = "test") -> dict[str, float]:
        """The papers' linear probe of each encoder (Evaluator.linear_probe)."""
        return self.evaluator.linear_probe(train_split, test_split)

    def shapley(self, split: str, zeroing: str = "features") -> dict:
        """Each modality's Shapley value of the fused accuracy on `split`: overall, per class, per
        sample (Evaluator.shapley; the formulas: mmfast/valuation.py)."""
        return self.evaluator.shapley(split, zeroing)

    # ---- the run -----------------------------------------------------------------------------

    def fit(self, *, max_steps: int | None = None) -> dict | None:
        """Train for cfg.epochs (continuing a resumed run), select on val, test once at the end.
        max_steps stops early (as if killed) once the run has made that many optimizer steps in
        all: for resume tests. The run directory's lock is released when fit returns or raises."""
        if self.mode == "read":
            raise RuntimeError("this Trainer reads a run (resume(..., read_only=True)); it cannot train")
        self._segment_start = time.perf_counter()
        try:
            self.run.acquire()  # (held since construction unless a fit before released it)
            if self.epoch < self.cfg.epochs:
                self.run.set_stale_summary_aside()
            return self._fit(max_steps)
        finally:
            self.close()

    def _fit(self, max_steps):
        self.prepare()
        while self.epoch < self.cfg.epochs:
            metrics = self.train_epoch(max_steps=max_steps)
            if metrics is None:
                return None
            self._evaluate_for_methods(self.epoch)  # (before the metrics: a method may set its inference here)
            if "val" in self.loaders:
                metrics.update(self.evaluate("val"))
            metrics = {"epoch": self.epoch, **metrics}
            improved = "val" not in self.loaders or metrics["val/acc"] > self.best["val/acc"]
            if improved:
                self.best = {"epoch": self.epoch, "val/acc": metrics.get("val/acc", math.nan)}
            self.history.append(metrics)
            self.epoch += 1
            self.batch_in_epoch = 0
            self.run.commit_epoch(lambda: self.save_checkpoint("last.pt"), lambda: self.save_checkpoint("best.pt"),
                                  metrics, improved)
            self._epoch_line(metrics)
        summary = {"best_epoch": self.best["epoch"], "epochs": self.epoch, "global_step": self.global_step,
                   "wall_time_s": self._wall_time(), "precision": self.precision, "methods": self.balancer.summary()}
        if "test" in self.loaders:
            self.load_best()
            summary.update(self.evaluate("test"))
        self.run.write_summary(summary)
        return summary

    def _wall_time(self) -> float:
        """Seconds of fit() over every segment of the run: the resumed checkpoint's count plus this
        segment's (time a crash threw away after the last checkpoint is not counted)."""
        return self._wall_time_before + time.perf_counter() - self._segment_start

    def prepare(self) -> None:
        """What training needs before its first step: the evaluations the methods ask for before
        training (e.g. initial per-head losses), once. fit() calls it; call it before driving
        train_step yourself."""
        if not self._prepared:
            self._teachers_for_methods()
        if self.global_step == 0 and not self._prepared:
            self._evaluate_for_methods(None)
        self._prepared = True

    def _teachers_for_methods(self) -> None:
        """The uni-modal teachers the methods ask for (mmfast/teachers.py): loaded where kept,
        else trained and kept in the run folder; handed over before the first step (and again
        to a resumed run, whose checkpoint does not hold them)."""
        from .teachers import teacher_for

        for run in self.balancer.teacher_runs():
            self.balancer.observe_teacher(run, teacher_for(self, run, run.source))

    def _evaluate_for_methods(self, epoch: int | None) -> None:
        """The splits the methods ask for before training (epoch None) or after `epoch`,
        evaluated and handed over (Balancer.observe_evaluation)."""
        for split in self.balancer.evaluations(epoch):
            fused, unimodal, labels, *features, index = self.evaluator.outputs(
                self.evaluator.evaluation_split(split), features=self.balancer.evaluation_features, index=True)
            self.balancer.observe_evaluation(split, fused, unimodal, labels, epoch=epoch,
                                             features=features[0] if features else None, index=index)

    def _scratch_for_methods(self, epoch: int) -> None:
        """The scratch runs the methods ask for before `epoch` (mmfast/scratch.py), handed over."""
        from .scratch import run_scratch

        for run in self.balancer.scratch_runs(epoch):
            self.balancer.observe_scratch(run, run_scratch(self, run), epoch=epoch)

    def _held_out_for_methods(self, epoch: int) -> None:
        """The held-out training batch a method asks for (HeldOut: its first `batch` clips,
        decoded once with epoch 0's draws), handed over before epoch `epoch` trains."""
        if self._held_out is None:
            return
        if self._held_out_batch is None:
            self._held_out_batch = self._inputs(self.loaders["train"].decode(
                self._held_out_clips[:self._held_out.batch], epoch=0))
        inputs, labels = self._held_out_batch
        # (a forward with the batch's statistics moves batch norm's running ones: every buffer is
        # put back once the event is over; not sooner, the backward passes read them)
        buffers = list(self.model.buffers())
        saved = [b.clone() for b in buffers]
        try:
            self.balancer.observe_held_out(inputs, labels, forward=self._held_out_forward, epoch=epoch,
                                           parameters=[p for p in self.model.parameters() if p.requires_grad])
        finally:
            if buffers:  # (a model without buffers: the foreach op refuses empty lists)
                with torch.no_grad():
                    torch._foreach_copy_(buffers, saved)

    def _held_out_forward(self, inputs, train: bool):
        """(fused, uni-modal) logits of the model (not its distributed wrapper) on `inputs`, in
        float32 with autograd to second order (the uni-modal ones a method trains:
        StepState.trainable_unimodal); train: batch norm with this batch's statistics (each rank
        holds the whole batch: no sync), which moves the running ones (_held_out_for_methods puts
        every buffer back when the event is over)."""
        from .distributed import local_batch_norm
        from .methods.base import trainable_unimodal

        was_training = self.model.training
        self.model.train(train)
        try:
            with torch.autocast(self.device.type, enabled=False), local_batch_norm(self.model):
                encoded = self.model.encode(inputs)
                fused, unimodal, *_ = self.model.head(encoded)
                unimodal = trainable_unimodal(self.model.fusion, unimodal, encoded[:len(self.modalities)])
        finally:
            self.model.train(was_training)
        return fused.float(), unimodal.float()

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"version": CHECKPOINT_VERSION, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "balancer": self.balancer.state_dict(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step, "best": self.best, "rng": rng,
                "epoch_sums": self.steps.sums, "epoch_counts": self.steps.counts,
                "skipped_steps": self.steps.skipped_steps, "history": self.history, "dataset": self.dataset,
                "wall_time_s": self._wall_time(), "precision": self.precision}

    def save_checkpoint(self, name: str) -> None:
        """Rank 0 writes (every rank holds the same state); the others wait for the file. Only
        finite state is written: a non-finite loss, gradient, parameter or buffer stops the run
        (NonFiniteError) and the checkpoint on disk stays the last good one."""
        self._check_finite()
        self.run.save(name, self.state_dict, epoch=self.epoch, step=self.global_step)

    def load_best(self) -> None:
        """The model weights of the best epoch (selected on the validation split). best.pt must
        hold the run's best epoch; where an epoch end was cut short between last.pt and best.pt,
        the checkpoint read at start-up holds that epoch's end and its weights are used."""
        self.model.load_state_dict(self.run.best_weights(self.best["epoch"], self.device))

    def _load_state(self, state: dict) -> None:
        trained_in = state.get("precision")
        if self.mode == "resume" and trained_in is not None and trained_in != self.precision:
            raise RunDirError(f"the checkpoint {self.run.resumed_from} trained in {trained_in}, and precision="
                              f"{self.cfg.precision} resolves to {self.precision} here (another device): resume with "
                              f"precision={trained_in}")
        self.model.load_state_dict(state["model"])  # (a head whose classifier count changed resizes first)
        self.balancer.load_state_dict(state["balancer"])  # (methods rejoin what they added to the optimizer)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best"]
        self.history = list(state.get("history") or [])
        self.steps.sums, self.steps.counts = state["epoch_sums"], state["epoch_counts"]
        self.steps.skipped_steps.copy_(state["skipped_steps"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def resume(out: str | Path, overrides: list[str] | tuple = (), *, read_only: bool = False) -> Trainer:
    """A Trainer continuing the run in directory `out` from its last checkpoint (previous.pt when
    last.pt cannot be read), with the config saved there: everything is read from and written to
    `out`, whatever path the config names. `overrides`: dotted key=value changes a resume may
    carry (mmfast.run_dir.RESUMABLE: more epochs, progress, ...); other changes, here or edited
    into config.yaml, are refused naming the key. read_only: for evaluation (no lock, no
    repair, no writes)."""
    out = Path(out)
    path = out / "config.yaml"
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a run directory")
    if not path.exists():
        raise FileNotFoundError(f"{out} holds no run (no config.yaml)")
    if any(item.split("=", 1)[0].strip() == "out" for item in overrides):
        raise ValueError(f"a resumed run reads and writes the directory given ({out}); out= cannot change it (copy "
                         f"the directory to continue elsewhere)")
    cfg = config_mod.load_config(path, overrides, apply_recipe=False)
    cfg.out = str(out)
    return Trainer(cfg, mode="read" if read_only else "resume")

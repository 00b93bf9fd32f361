"""``Balancer``: drives the balancing methods through a training step. mmfast's trainer runs
its steps through it, and users who keep their own training loop call the same object from
four places in their step::

    bal = mmfast.Balancer("ogm_ge", encoders={"audio": net.audio, "visual": net.visual}, alpha=0.8)
    for epoch in range(epochs):
        bal.start_epoch(epoch)
        for batch in loader:
            features = [net.audio(batch["audio"]), net.visual(batch["visual"])]
            dropped = bal.drop(features)                   # OPM, ModDrop (else: features unchanged)
            fused, unimodal = net.head(dropped, measure=features)  # unimodal: [M, B, C] estimates
            loss = bal.loss(F.cross_entropy(fused, y, reduction="none"))
            opt.zero_grad(); loss.backward()
            bal.after_backward(unimodal, y)                # measures once, modulates the gradients
            opt.step()
            bal.after_step()
        bal.end_epoch()

The uni-modal estimates measure the imbalance on the features *before* the drop (every sample,
undropped: TPAMI 2024 Alg. 1, eq. 7); what trains sees what the drop left (the fused logits, and
late heads' own classifiers). mmfast's
heads take both (``measure=``); with a head of your own, compute the estimates from the features
you passed to ``drop``. OPM with ``timing="current"`` (the public code's: this batch's
probabilities drop this batch) measures inside ``drop``: give the Balancer ``estimate=`` (features
-> uni-modal logits [M, B, C]) and ``drop(features, labels=y)``.

A method that adds terms to the loss (``Method.adds_loss_terms``) needs the step's uni-modal
logits before the loss: call ``bal.after_forward(unimodal, y)`` before ``bal.loss(...)`` (the
trainer always does), then ``bal.after_backward()`` without arguments.

Methods that train classifiers of their own (olm, boost: ``bal.computes_task_loss``) compute the
task loss from the head's trainable logits: pass them with ``after_forward(unimodal, y,
fused=fused, extras=extra)`` and call ``bal.loss()`` without a per-sample loss. Give the
Balancer the head (``head=``), and the optimizer and scheduler when a method adds parameters
during training (boost's classifiers join the optimizer). Some methods need whole splits
evaluated (OLM's per-head losses on val and train, boost's late-fusion weights fitted on val):
before training and after each epoch, evaluate the splits ``bal.evaluations(epoch)`` names
(``epoch=None`` before training) and hand each over with ``bal.observe_evaluation(split, fused,
unimodal, labels, epoch=epoch)`` (with ``features=`` when ``bal.evaluation_features``: PMR's
prototypes). A method that trains one modality per sub-step (MLA, boost's alternating update):
run a step for every part of ``bal.update_parts()``, passing it to ``bal.drop(features,
part=part)``, and give ``start_epoch`` the epoch's batch count. AGM runs the model again with
modalities zeroed: pass ``rerun=`` to ``after_forward``. G-Blending weighs its heads from copies of
the model trained apart: before each epoch, train the runs ``bal.scratch_runs(epoch)`` names and
hand their curves over with ``bal.observe_scratch``.

Nothing here reads a tensor on the host: the step counter, drop probabilities and coefficients
stay on the device (``bal.metrics`` holds the last step's, for logging when you choose).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..distributed import Distributed
from ..ops import BalanceStats
from .base import StepState, merge_balance_params
from .registry import create


class Balancer:
    def __init__(self, method: str, encoders: Mapping[str, nn.Module], *, seed: int = 0,
                 device: torch.device | str | None = None, measure: bool = False, head: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler=None, dist: Distributed | None = None,
                 estimate=None, mmtm: nn.Module | None = None, epochs: int | None = None, **hparams):
        """method: a name of mmfast.methods.NAMES; encoders: modality name -> encoder module, in
        the order of the features and uni-modal logits you pass; seed: the noise key and drop
        generator seed; measure: compute the balance statistics every step even when no method
        needs them (to monitor plain joint training); hparams: the method's hyper-parameters
        (mmfast.methods.hyper_parameters); head: the model's head module (the methods that train
        classifiers of their own need it); optimizer, scheduler: the loop's (see the module doc);
        dist: the process group of a distributed run (None: the initialised default group, if
        any: mmfast.distributed.Distributed.current()); estimate: features -> uni-modal logits
        [M, B, C], for a method that measures before the fusion (opm timing="current"); mmtm: the
        model's MMTM blocks between the encoders (mmfast.models.MMTMExchange; greedy sets their
        curation flags); epochs: the run's length (UMT trains its teachers as long by default)."""
        if not isinstance(encoders, Mapping) or len(encoders) < 2:
            raise ValueError("Balancer: encoders must map at least two modality names to their encoder modules")
        for name, module in encoders.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"Balancer: encoders[{name!r}] must be an nn.Module, got {type(module).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Balancer: seed must be an int, got {seed!r}")
        if device is None:
            first = next((p for m in encoders.values() for p in m.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.methods = create(method, **hparams)
        self.state = StepState(list(encoders), seed=seed, device=torch.device(device), encoders=encoders,
                               balance_params=merge_balance_params(self.methods), head=head,
                               dist=dist if dist is not None else Distributed.current())
        self.state.optimizer, self.state.scheduler = optimizer, scheduler
        self.state.estimate = estimate
        self.state.mmtm = mmtm
        self.state.run_epochs = epochs
        self.computes_task_loss = any(m.computes_task_loss for m in self.methods)
        self.needs_inputs = any(m.needs_inputs for m in self.methods)
        self.metrics: dict[str, torch.Tensor] = {}
        self.measure = bool(measure)
        self._measures = self.measure or any(m.measures_balance for m in self.methods)
        self._emit("fit_start")
        # Features the methods replace by zeros in every step: no need to encode them.
        self.unused_modalities = frozenset().union(*(m.unused_modalities(self.state) for m in self.methods))

    def _emit(self, event: str) -> None:
        for method in self.methods:
            getattr(method, event)(self.state)

    def start_epoch(self, epoch: int, batches: int | None = None) -> None:
        """`batches`: the epoch's number of batches (steps), for a method whose schedule runs
        within an epoch (MLA's projection strength)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Balancer.start_epoch: epoch must be an int >= 0, got {epoch!r}")
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
            raise ValueError(f"Balancer.start_epoch: batches must be an int >= 1, got {batches!r}")
        self.state.epoch = epoch
        self.state.batches_per_epoch = batches
        self._emit("epoch_start")

    def end_epoch(self) -> None:
        self._emit("epoch_end")

    def update_parts(self) -> list[tuple[str, ...] | None]:
        """The sub-steps of a training step: [None] (one step, every modality) unless a method
        updates modalities in turn (boost's alternating update: one part per modality)."""
        parts = [p for m in self.methods if (p := m.update_parts(self.state)) != [None]]
        return parts[0] if parts else [None]

    def evaluations(self, epoch: int | None) -> tuple[str, ...]:
        """The splits the methods need evaluated before training (epoch None) or after epoch
        `epoch` ("val", "train": the training split through evaluation transforms), in order;
        hand each over with observe_evaluation."""
        return tuple(dict.fromkeys(split for m in self.methods for split in m.evaluations(epoch)))

    @property
    def evaluation_features(self) -> bool:
        """Whether observe_evaluation needs the encoders' features (a method declares it: PMR)."""
        return any(m.evaluation_features for m in self.methods)

    @property
    def skips_parameters(self) -> bool:
        """Whether some steps leave model parameters without a gradient: a modality left out
        (unused_modalities), modalities updated in turn, or a method that declares it (ReconBoost's
        phases). A DistributedDataParallel wrapper must then look for unused parameters."""
        return bool(self.unused_modalities) or len(self.update_parts()) > 1 or any(
            m.skips_parameters for m in self.methods)

    @property
    def single_micro_batch(self) -> bool:
        """Whether a training step must be one batch (no gradient accumulation): a method that
        updates modalities in turn, or one that declares it (MMPareto's per-loss gradients)."""
        return len(self.update_parts()) > 1 or any(m.single_micro_batch for m in self.methods)

    def observe_evaluation(self, split: str, fused: torch.Tensor, unimodal: torch.Tensor, labels: torch.Tensor, *,
                           epoch: int | None, features: Sequence[torch.Tensor] | None = None,
                           index: torch.Tensor | None = None) -> None:
        """The model's fused logits [N, C], uni-modal logits [M, N, C] and the labels [N] on every
        sample of `split`, evaluated before training (epoch None) or after epoch `epoch` (the
        evaluation_end event; call it for each split evaluations(epoch) names, in its order);
        `features`: the M encoders' features [N, d_m] (needed when evaluation_features); `index`:
        each row's clip position in the split (None: 0..N-1, every clip in order)."""
        M = len(self.state.modalities)
        if self.evaluation_features:
            wanted = [m.name for m in self.methods if m.evaluation_features]
            if features is None or len(features) != M or any(
                    not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != labels.shape[0] for f in features):
                raise ValueError(f"Balancer.observe_evaluation: method(s) {wanted} need the {M} encoders' features "
                                 f"[N={labels.shape[0]}, d_m] of the split (features=)")
        if not isinstance(unimodal, torch.Tensor) or unimodal.dim() != 3 or unimodal.shape[0] != M:
            raise ValueError(f"Balancer.observe_evaluation: unimodal must be [M={M}, N, C], got "
                             f"{tuple(getattr(unimodal, 'shape', ())) or unimodal!r}")
        N, C = unimodal.shape[1:]
        if not isinstance(fused, torch.Tensor) or fused.shape != (N, C):
            raise ValueError(f"Balancer.observe_evaluation: fused must be [N={N}, C={C}], got "
                             f"{tuple(getattr(fused, 'shape', ())) or fused!r}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (N,):
            raise ValueError(f"Balancer.observe_evaluation: labels must be [N={N}], got "
                             f"{tuple(getattr(labels, 'shape', ())) or labels!r}")
        device = self.state.device
        # half-precision outputs are widened; float64 ones stay (OLM's eq. 8 divides by a difference
        # of loss gaps, so a caller may want the extra digits)
        dtype = torch.promote_types(fused.dtype, torch.float32)
        self.state.evaluation = {"split": split, "epoch": epoch, "fused": fused.detach().to(device, dtype),
                                 "unimodal": unimodal.detach().to(device, dtype), "labels": labels.to(device),
                                 "features": None if features is None else [f.detach().to(device) for f in features],
                                 "index": torch.arange(N) if index is None else torch.as_tensor(index).cpu()}
        if self.state.evaluation["index"].shape != (N,):
            raise ValueError(f"Balancer.observe_evaluation: index must be [N={N}], got {tuple(index.shape)}")
        self._emit("evaluation_end")

    def scratch_runs(self, epoch: int) -> tuple:
        """The scratch runs (mmfast.methods.ScratchRun) the methods need before epoch `epoch`
        trains, in order; hand each one's curves over with observe_scratch."""
        return tuple(dict.fromkeys(run for m in self.methods for run in m.scratch_runs(epoch)))

    def observe_scratch(self, run, curves: Mapping[str, Sequence[float]], *, epoch: int) -> None:
        """The curves of a scratch run (ScratchRun's "train", "val", "train_batch_sum",
        "val_batch_sum": one value per epoch of the run), before epoch `epoch` (scratch_end)."""
        for key in ("train", "val"):
            values = curves.get(key) if isinstance(curves, Mapping) else None
            if values is None or len(values) != run.epochs:
                raise ValueError(f"Balancer.observe_scratch: curves[{key!r}] must hold {run.epochs} values (one per "
                                 f"epoch of {run}), got {values!r}")
        self.state.scratch = {"run": run, "epoch": epoch, "curves": {k: list(v) for k, v in curves.items()}}
        self._emit("scratch_end")

    def sample_copies(self, epoch: int):
        """(clip positions [K], counts [K, M]): extra copies of training clips for epoch `epoch`,
        each keeping one modality (Method.sample_copies), or None. Give them to your training
        loader (mmfast's: ``loader.set_copies(counts, index)``) and zero, for each sample, the
        features of the modalities it does not keep (a batch's ``keep``) before the fusion."""
        given = [(m.name, c) for m in self.methods if (c := m.sample_copies(epoch)) is not None]
        if len(given) > 1:
            raise ValueError(f"methods {[n for n, _ in given]} both re-sample the training set")
        return given[0][1] if given else None

    def teacher_runs(self) -> tuple:
        """The uni-modal teachers (mmfast.methods.TeacherRun) the methods need before the first
        step; hand each one over with observe_teacher."""
        return tuple(dict.fromkeys(run for m in self.methods for run in m.teacher_runs(self.state)))

    def observe_teacher(self, run, teacher: nn.Module) -> None:
        """The trained uni-modal teacher of `run` (a module whose ``features(inputs)`` maps a batch's
        inputs, modality name -> tensor, to that modality's pooled features [B, d]; frozen, in eval
        mode), before the first step (teacher_end)."""
        if not callable(getattr(teacher, "features", None)):
            raise TypeError(f"Balancer.observe_teacher: the teacher of {run.modality!r} needs a features(inputs) "
                            f"method")
        self.state.teachers[run.modality] = teacher
        self._emit("teacher_end")

    def held_out(self):
        """The training clips a method holds out (mmfast.methods.HeldOut), or None: leave them out of
        your training loader (mmfast's: ``loader.set_held_out``) and, before each epoch that starts
        fresh, hand the batch over with observe_held_out."""
        given = [(m.name, h) for m in self.methods if (h := m.held_out(self.state)) is not None]
        if len(given) > 1:
            raise ValueError(f"methods {[n for n, _ in given]} both hold training clips out")
        return given[0][1] if given else None

    def observe_held_out(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, *, forward,
                         parameters: Sequence[torch.Tensor], epoch: int) -> None:
        """Before epoch `epoch` trains (a fresh epoch, not a resumed one; held_out_batch): the
        held-out batch's inputs (modality name -> tensor) and labels [N], the model's trainable
        `parameters` in its order, and `forward(inputs, train)` -> (fused [N, C], uni-modal
        [M, N, C]) logits with autograd to second order (float32; train: batch norm with the
        batch's statistics). Put the model's buffers back after this call: a forward with the
        batch's statistics moves the running ones."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] == 0:
            raise ValueError(f"Balancer.observe_held_out: labels must be [N >= 1], got "
                             f"{tuple(getattr(labels, 'shape', ())) or labels!r}")
        missing = [m for m in self.state.modalities if m not in inputs]
        if missing:
            raise ValueError(f"Balancer.observe_held_out: inputs lack the modalities {missing}")
        if not callable(forward):
            raise TypeError("Balancer.observe_held_out: forward must be callable (inputs, train) -> (fused, unimodal)")
        self.state.epoch = epoch
        self.state.held_out = {"epoch": epoch, "inputs": inputs, "labels": labels.to(self.state.device),
                               "parameters": list(parameters), "forward": forward}
        try:
            self._emit("held_out_batch")
        finally:
            self.state.held_out = {}  # (the inputs and the forward's graph are not kept)

    def observe_head_losses(self, val: torch.Tensor, train: torch.Tensor, *, epoch: int | None) -> None:
        """Per-head mean cross-entropies [M + 1] (the modalities' classifiers, then the fused one)
        on the validation and training splits, measured before training (epoch None) or after
        epoch `epoch`: for a loop that measures them itself, instead of handing over the
        evaluations OLM asks for (observe_evaluation)."""
        M = len(self.state.modalities)
        for name, t in (("val", val), ("train", train)):
            if not isinstance(t, torch.Tensor) or t.shape != (M + 1,):
                raise ValueError(f"Balancer.observe_head_losses: {name} must be a tensor [{M + 1}] (one loss per "
                                 f"modality, then the fused head), got {tuple(getattr(t, 'shape', ())) or t!r}")
        device = self.state.device
        self.state.head_losses = {"val": val.float().to(device), "train": train.float().to(device),
                                  "initial": epoch is None, "epoch": epoch}
        self._emit("head_losses")


    def drop(self, features: Sequence[torch.Tensor], *, part: Sequence[str] | None = None,
             shard: tuple[int, int] | None = None, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The features to fuse: dropped and rescaled by OPM/ModDrop, unchanged otherwise (measure
        the uni-modal logits on `features`, not on these). Starts a new (micro-)batch: the
        previous one's masks and logits are forgotten. `part`: the modalities this sub-step
        trains (an item of update_parts()); `shard`: in a distributed run, (start, total): these
        samples' first row in the global batch and its size (mmfast.distributed.shard_bounds;
        required there); labels [B]: for a method that measures here (opm timing="current")."""
        features = list(features)
        if len(features) != len(self.state.modalities):
            raise ValueError(f"Balancer.drop: {len(features)} feature tensors for modalities {self.state.modalities}")
        if part is not None and not set(part) <= set(self.state.modalities):
            raise ValueError(f"Balancer.drop: part {part!r} names no modalities of {self.state.modalities}")
        if shard is None and self.state.dist.enabled:
            raise ValueError("Balancer.drop: in a distributed run pass shard=(start, total), this rank's first "
                             "sample in the global batch and the global batch size")
        self.state.begin_batch()
        self.state.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        self.state.part = None if part is None else tuple(part)
        self.state.features = features
        self.state.undropped = list(features)
        self.state.labels = labels
        self._emit("before_fusion")
        return self.state.features

    @property
    def sample_weight(self) -> torch.Tensor | None:
        """[B]: 0 for samples whose every modality was dropped this step (None: all count)."""
        return self.state.sample_weight

    def loss(self, per_sample_loss: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the per-sample task loss over the samples that stay in the loss, plus any loss
        term a method added (in after_forward, which must then come first). With a method that
        computes the task loss itself (computes_task_loss), pass nothing. In a distributed run
        the result is this rank's share of the global batch's loss times the world size: what
        to call backward() on under DistributedDataParallel, which averages the gradients."""
        adders = [m.name for m in self.methods if m.adds_loss_terms or m.computes_task_loss]
        if adders and self.state.labels is None:
            raise ValueError(f"Balancer.loss: method(s) {adders} compute loss terms from the step's logits: call "
                             f"after_forward(unimodal_logits, labels, ...) before loss()")
        if self.computes_task_loss:
            if per_sample_loss is not None:
                raise ValueError(f"Balancer.loss: method(s) {adders} compute the task loss from the heads' logits; "
                                 f"call loss() without a per-sample loss")
            total = self.state.task_loss
        elif per_sample_loss is None:
            raise ValueError("Balancer.loss: pass the per-sample task loss [B]")
        else:
            total = self.state.batch_mean(per_sample_loss)
        for term in self.state.extra_losses.values():  # (batch means too: state.batch_mean)
            total = total + term
        return total * self.state.dist.world_size if self.state.dist.enabled else total

    def after_forward(self, unimodal_logits: torch.Tensor, labels: torch.Tensor, *, fused: torch.Tensor | None = None,
                      extras: Mapping | None = None, rerun=None, trainable: torch.Tensor | None = None,
                      inputs: Mapping[str, torch.Tensor] | None = None) -> None:
        """Hand over this (micro-)batch's uni-modal logits [M, B, C] and labels: the methods measure
        (balance statistics, once) and update their device state (OPM's next probabilities).
        Optional: after_backward does it when given the logits. With gradient accumulation, call
        it for every micro-batch and after_backward() once, before the optimizer step. Methods
        that compute the task loss need the head's trainable logits: the uni-modal ones (not
        detached), `fused` and the head's `extras`. `rerun`: for a method with extra forwards
        (AGM): subsets of modality names -> the model's fused logits [K, B, C] on this batch with
        the other modalities' inputs zeroed, in eval mode, with autograd (StepState.rerun).
        `trainable`: the head's trainable uni-modal logits [M, B, C] where they differ from the
        measured ones passed first (features a method changed before the fusion). `inputs`: the
        batch's inputs (modality name -> tensor), for a method that runs models of its own on them
        (UMT's teachers: Balancer.needs_inputs)."""
        if not isinstance(unimodal_logits, torch.Tensor) or unimodal_logits.dim() != 3 \
                or unimodal_logits.shape[0] != len(self.state.modalities):
            raise ValueError(f"Balancer: unimodal_logits must be [M={len(self.state.modalities)}, B, C], got "
                             f"{tuple(getattr(unimodal_logits, 'shape', ()))}")
        computers = [m.name for m in self.methods if m.computes_task_loss]
        if computers and fused is None:
            raise ValueError(f"Balancer.after_forward: method(s) {computers} compute the task loss from the head's "
                             f"logits: pass fused= (and extras= when the head returns them)")
        rerunners = [m.name for m in self.methods if m.extra_forwards]
        if rerunners and rerun is None:
            raise ValueError(f"Balancer.after_forward: method(s) {rerunners} run the model with modalities zeroed: "
                             f"pass rerun= (subsets of modality names -> fused logits [K, B, C], eval mode, "
                             f"with autograd)")
        readers = [m.name for m in self.methods if m.needs_inputs]
        if readers and inputs is None:
            raise ValueError(f"Balancer.after_forward: method(s) {readers} read the batch's inputs: pass inputs= "
                             f"(modality name -> tensor)")
        self.state.rerun = rerun
        self.state.inputs = inputs
        self.state.head_logits = {"fused": fused, "unimodal": unimodal_logits if trainable is None else trainable,
                                  **dict(extras or {})}
        self.state.unimodal_logits = unimodal_logits.detach()
        self.state.labels = labels
        if self._measures and self.state.part is None:  # (a sub-step's other rows come from zeroed features)
            # Every (micro-)batch is measured once, here: the step's statistics sum them.
            self.state.measure_batch()
        self._emit("after_forward")

    def after_backward(self, unimodal_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                       scaler: "torch.amp.GradScaler | None" = None,
                       optimizer: torch.optim.Optimizer | None = None) -> BalanceStats | None:
        """After loss.backward(), before optimizer.step(): measures this step (once; skipped when
        after_forward already did), then modulates the encoder gradients and advances the step
        counter. With a GradScaler, pass it and the optimizer: the gradients are unscaled first
        (modulation needs true gradients; the scaler's step then does not unscale them again).
        Returns the step's statistics, if any method measured them."""
        state = self.state
        if unimodal_logits is not None:
            self.after_forward(unimodal_logits, labels)
        elif state.unimodal_logits is None:
            raise ValueError("Balancer.after_backward: pass the step's unimodal_logits and labels "
                             "(or hand them to after_forward first)")
        if scaler is not None:
            if optimizer is None:
                raise ValueError("Balancer.after_backward: with a scaler, pass the optimizer too (to unscale it)")
            scaler.unscale_(optimizer)
        if self.measure and state._step_scores is not None:
            state.stats()  # (the step's statistics for monitoring, when no method asked)
        self._emit("after_backward")
        stats = state._stats
        self.metrics = state.metrics
        state.step.add_(1)
        state.begin_step()
        return stats

    def after_step(self) -> None:
        """After optimizer.step() (the step counter has moved on already)."""
        self._emit("after_step")

    def summary(self) -> dict:
        """Each method's record for the run's summary (method name -> its summary()), where any."""
        return {m.name: info for m in self.methods if (info := m.summary())}

    def state_dict(self) -> dict:
        return {"step": self.state.step.clone(), "epoch": self.state.epoch,
                "generator": self.state.generator.get_state(),
                "methods": [m.state_dict() for m in self.methods]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the methods' state. Call it after the model's weights and before the
        optimizer's: methods that added parameters during training rejoin the optimizer here
        (the state_loaded event), so that its saved state finds every group."""
        self.state.step.copy_(state["step"])
        self.state.epoch = int(state["epoch"])
        self.state.generator.set_state(state["generator"])
        for method, s in zip(self.methods, state["methods"]):
            method.load_state_dict(s)
        self._emit("state_loaded")

    @property
    def parameter_version(self) -> int:
        """Changes whenever a method adds parameters (a wrapper such as DDP must be rebuilt)."""
        return self.state.parameter_version

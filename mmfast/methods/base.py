"""Methods as small objects reacting to named events of a training step.

A training loop (mmfast's trainer, or a user's own loop through ``mmfast.Balancer``) runs, per
step:

    fit_start      once, before the first step: a method may allocate device state
    epoch_start    at the start of each epoch
    before_fusion  features of every modality are in ``state.features``: a method may drop them
    after_forward  fused and uni-modal logits are known: a method may measure, add loss terms or
                   compute the task loss itself
    after_backward gradients are in ``.grad`` (unscaled): a method may modulate them
    after_step     after the optimizer step
    epoch_end      at the end of each epoch
    evaluation_end a split a method asked for (``Method.evaluations``) was evaluated
                   (``state.evaluation``: split, epoch, fused, unimodal, labels, and the encoders'
                   features for a method that declares ``evaluation_features``): before training
                   and after the epochs it names (OLM's per-head losses, boost's late-fusion
                   weights, PMR's prototypes)
    scratch_end    a scratch run a method asked for (``Method.scratch_runs``) finished before an
                   epoch (``state.scratch``: run, epoch, curves): a copy of the model trained
                   apart with one head's loss (G-Blending's generalisation and overfitting)
    head_losses    per-head validation and training losses (``state.head_losses``), handed over by a
                   loop that measured them itself (``Balancer.observe_head_losses``)
    teacher_end    a uni-modal teacher a method asked for (``Method.teacher_runs``) was trained or
                   loaded before the first step (``state.teachers``: modality -> the frozen model,
                   in eval mode; UMT distils from them)
    held_out_batch before a fresh epoch trains (not a resumed one): the training clips a method
                   holds out (``Method.held_out``), with a forward of the model on them
                   (``state.held_out``: LFM's hyper-gradient of its loss weights)
    state_loaded   the loop restored a checkpoint (the model's weights first, then the methods'
                   state, then the optimizer's): a method re-creates what it added during
                   training (boost's classifiers rejoin the optimizer, in the order they joined it)

What a method needs from the loop it declares on its class, in one place (``Method``'s class
attributes and the few methods beside them): the model fusions it works with, how it changes the
loss (terms added, or the task loss computed itself), whether it reads the balance statistics,
extra forwards of the model with modalities zeroed (``StepState.rerun``), the encoders' features
in its evaluations, a step of one micro-batch, the evaluations it asks for, the sub-steps of a
step, the modalities it leaves out and the balance-statistics parameters it relies on. A loop
(the trainer, or ``Balancer`` in a user's loop) reads these declarations; no loop knows a
method by name.

Everything a method reads or writes during a step lives on the device: hooks must not read
tensors on the host (no ``.item()``, no Python branching on tensor values). Epoch numbers are
host integers, so epoch windows are ordinary Python conditions.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..distributed import Distributed
from ..models.registry import fusions_where
from ..ops import BalanceStats, balance_coefficients, modality_scores
from ..ops.balance import ALPHA_DEFAULTS

EVENTS = ("fit_start", "epoch_start", "before_fusion", "after_forward", "after_backward", "after_step", "epoch_end",
          "state_loaded", "evaluation_end", "scratch_end", "head_losses", "teacher_end", "held_out_batch")
# Model fusions (mmfast/models/registry.py) a method accepts unless it says otherwise: not the
# method-specific ones ("boost", whose classifiers only the boost method trains).
GENERIC_FUSIONS = fusions_where(method_specific=False)
POOLED_FUSIONS = fusions_where(pooled=True, method_specific=False)  # fusion after the encoders' pooled features

# The balance_stats parameters a method may ask for, with their defaults (mmfast.ops.balance).
# (Used when no method of the run sets them: then only rho and the monitoring metrics are read.)
BALANCE_DEFAULTS = {"kind": "ratio", "alpha": ALPHA_DEFAULTS["paper"], "form": "paper", "z": "tanh", "q_base": 0.5,
                    "lam": 0.5}


@dataclasses.dataclass(frozen=True)
class ScratchRun:
    """A scratch run a method asks for (``Method.scratch_runs``): the loop trains a copy of the
    model from the run's current weights for `epochs` epochs with one head's cross-entropy
    alone and a fresh optimizer of the run's settings, apart from the run. `head`: a modality
    name (its own classifier on its encoder; the other encoders are not run: a uni-modal
    model) or None (the fused classifier: the multimodal model). The loop reports per epoch
    (``Balancer.observe_scratch``): "train", the mean training loss over the epoch's batches;
    "val", the validation loss after it (means over samples); "train_batch_sum" and
    "val_batch_sum", the sums of the batches' mean losses (the toolkit's bookkeeping)."""

    head: str | None
    epochs: int


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Training clips a method holds out (``Method.held_out``): the loop leaves `clips` clips of
    the training split, drawn from the run's seed, out of training for the whole run, and
    decodes the first `batch` of them once through the training transforms (the draws of epoch
    0). Before every fresh epoch it hands them over with a forward of the model on them (the
    held_out_batch event, ``state.held_out``)."""

    clips: int
    batch: int


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """A uni-modal teacher a method asks for (``Method.teacher_runs``): a model of `modality` alone
    (the run's kind of encoder and a linear classifier) trained with cross-entropy for `epochs`
    epochs before the run's first step, with a fresh optimizer and schedule of the run's
    settings (mmfast/teachers.py). `source`: a run folder whose kept teachers to load (None: this
    run's folder, training the teacher when it holds none)."""

    modality: str
    epochs: int
    source: str | None = None


def trainable_unimodal(head: torch.nn.Module, unimodal: torch.Tensor | None, features) -> torch.Tensor:
    """[M, B, C] uni-modal logits with autograd: the head's own (`unimodal`, when they carry a
    graph: heads with a classifier per modality), or its weight split of `features`."""
    if unimodal is not None and unimodal.requires_grad:
        return unimodal
    split = getattr(head, "split_logits", None)
    if split is None:
        raise ValueError(f"this method trains uni-modal logits: the head ({type(head).__name__}) has "
                         f"neither classifiers per modality nor a weight split (split_logits)")
    return split(features)


class StepState:
    """What the loop knows about the current step, shared by every method.

    modalities: names, in the order of features and of the uni-modal logits' first axis;
    encoders: name -> encoder module (what gradient modulation selects its weights from);
    epoch: host int; step: 0-dim int64 device tensor (the noise counter of grad modulation);
    seed: the run's seed (noise key); generator: device generator for drop masks;
    features: M tensors [B, d_m] (before_fusion may replace them);
    labels [B]; unimodal_logits [M, B, C] (detached measurements, from the features *before* any
        drop: the imbalance is measured on every sample's undropped features, TPAMI 2024 Alg. 1 and
        eq. 7; a drop changes only what the fusion sees);
    undropped: the M features as the loop handed them to ``Balancer.drop`` (before_fusion);
    keep: [M, B] mask of kept features (set by a dropping method; it does not mask the scores);
    sample_weight: [B] or None, 1 for samples that stay in the loss;
    estimate: None, or the loop's function features -> uni-modal logits [M, B, C] (detached), for
        a method that measures before the fusion (OPM with timing="current");
    head_logits: the head's outputs with autograd: "fused" [B, C], "unimodal" [M, B, C] and any
        further item the head returned (boost: "classifiers");
    inputs: the batch's inputs (modality name -> device tensor), for a method that runs models of
        its own on them (UMT's teachers; ``Method.needs_inputs``), else None;
    teachers: modality -> the frozen uni-modal teacher a method asked for (teacher_end);
    held_out: the held_out_batch event's "epoch", "inputs" (modality name -> device tensor),
        "labels" [N], "parameters" (the model's trainable parameters, in the model's order) and
        "forward" (inputs, train: bool -> the head's fused [N, C] and uni-modal [M, N, C] logits,
        with autograd to second order, in float32; `train`: batch norm with the batch's
        statistics, which moves the running ones: the loop puts them back when the event is over,
        so an eval-mode forward after a train=True one in the same event reads moved ones);
    autocast: a context-manager factory for the loop's mixed precision (the step's autocast), for a
        method that runs models of its own in the step (UMT's teachers); nullcontext by default;
    rerun: for a method that declares ``extra_forwards``: subsets (tuples of modality names) ->
        the fused logits [K, B, C] of the model on this batch with every modality outside each
        subset zeroed at its input, in eval mode, with autograd (AGM's coalitions);
    task_loss: scalar set by a method that computes the task loss itself (``computes_task_loss``);
    extra_losses: name -> scalar tensor added to the task loss;
    part: None, or the modalities this (sub-)step trains when a method updates them in turn;
    metrics: name -> device tensor, read by the loop only at logging points;
    head: the model's head module; mmtm: the model's MMTM blocks between the encoders, or None
        (mmfast.models.MMTMExchange: Greedy writes its curation flags); optimizer, scheduler: the loop's (a method that adds
        parameters during training, such as boost's classifiers, joins them to it);
    evaluation: the evaluation_end event's "split", "epoch", "fused" [N, C], "unimodal" [M, N, C],
        "labels" [N] and "index" [N] (each row's clip position in the split) (a whole split,
        evaluated for the methods that ask: Method.evaluations);
    head_losses: "val" and "train" [M + 1] per-head losses (modalities, then fused), "initial";
    batches_per_epoch: the epoch's batch count when the loop gives it (start_epoch), else None;
    run_epochs: the run's epoch count when the loop gives it (Balancer's epochs=), else None;
    dist: the process group (mmfast.distributed.Distributed; one process: every sum is the
        identity); shard: (start, total) of this (micro-)batch, the rank's first sample in the
        global batch and the global batch size ((0, B) in one process).

    Means over the batch go through ``batch_mean`` and sums a method needs from every rank
    through ``dist.all_reduce_sum``, so that a distributed run computes what one process would
    on the global batch (mmfast/distributed.py).

    Balance statistics of a step (``stats()``) come from the batch scores S summed over every
    micro-batch of the step (``measure_batch`` adds each one once): with gradient accumulation
    the ratio is that of the whole mini-batch, as the papers measure it.
    """

    def __init__(self, modalities: Sequence[str], *, seed: int, device: torch.device,
                 encoders: Mapping[str, torch.nn.Module] | None = None,
                 balance_params: dict[str, Any] | None = None, head: torch.nn.Module | None = None,
                 dist: Distributed | None = None):
        self.dist = dist if dist is not None else Distributed()
        self.shard: tuple[int, int] | None = None
        self.modalities = list(modalities)
        self.encoders = dict(encoders or {})  # modality name -> encoder module, in modality order
        self.head = head
        self.mmtm: torch.nn.Module | None = None
        self.teachers: dict[str, torch.nn.Module] = {}
        self.held_out: dict[str, Any] = {}
        self.autocast = contextlib.nullcontext
        self.optimizer: torch.optim.Optimizer | None = None
        # Bumped whenever a method adds parameters (join_optimizer): a loop that wraps the model
        # (DistributedDataParallel) rebuilds the wrapper when it changes.
        self.parameter_version = 0
        self.scheduler = None
        self.head_losses: dict[str, Any] = {}
        self.evaluation: dict[str, Any] = {}  # the evaluation_end event's split, epoch, fused, unimodal, labels
        self.scratch: dict[str, Any] = {}  # the scratch_end event's run, epoch, curves
        self.part: tuple[str, ...] | None = None
        self.seed = int(seed)
        self.device = torch.device(device)
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.balance_params = dict(BALANCE_DEFAULTS, **(balance_params or {}))
        self.estimate = None
        self.epoch = 0
        self.batches_per_epoch: int | None = None  # (Balancer.start_epoch's batches)
        self.run_epochs: int | None = None  # (Balancer's epochs)
        self.begin_step()

    def begin_batch(self) -> None:
        """Forget the previous (micro-)batch's tensors."""
        self.features: list[torch.Tensor] = []
        self.undropped: list[torch.Tensor] = []
        self.labels: torch.Tensor | None = None
        self.unimodal_logits: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.sample_weight: torch.Tensor | None = None
        self.head_logits: dict[str, Any] = {}
        self.rerun = None
        self.inputs: Mapping[str, torch.Tensor] | None = None
        self.task_loss: torch.Tensor | None = None
        self.extra_losses: dict[str, torch.Tensor] = {}
        self._batch_scores: tuple[torch.Tensor, torch.Tensor] | None = None  # (S [M] global, s [M, B])
        self._global_weight: torch.Tensor | None = None

    def begin_step(self) -> None:
        """Forget the previous step (the step counter and generator carry on)."""
        self.begin_batch()
        self.metrics: dict[str, torch.Tensor] = {}
        self._step_scores: torch.Tensor | None = None  # S summed over the step's micro-batches
        self._stats: BalanceStats | None = None

    def measure_batch(self) -> torch.Tensor:
        """S [M] of this (micro-)batch's uni-modal logits over every sample (summed over the
        ranks), added once to the step's sum; computed once however many methods ask."""
        if self._batch_scores is None:
            if self.unimodal_logits is None or self.labels is None:
                raise RuntimeError("balance statistics need the uni-modal logits and labels of the step "
                                   "(after_forward or later)")
            S, s = modality_scores(self.unimodal_logits.detach(), self.labels)
            if self.dist.enabled:
                S = self._reduce_scores(S)
            self._batch_scores = (S, s)
            self._step_scores = S if self._step_scores is None else self._step_scores + S
            self._stats = None  # (a later micro-batch: the step's statistics change)
        return self._batch_scores[0]

    def stats(self) -> BalanceStats:
        """The step's balance statistics (rho, OGM k, OPM q) from S summed over the micro-batches
        measured so far (after the last one: the whole mini-batch); sample_scores are this
        micro-batch's. Computed once per change however many methods ask."""
        self.measure_batch()
        if self._stats is None:
            c = balance_coefficients(self._step_scores, **self.balance_params)
            self._stats = BalanceStats(c.scores, self._batch_scores[1], c.ratio, c.coeffs, c.drop_probs)
            for m, name in enumerate(self.modalities):
                self.metrics[f"score/{name}"] = c.scores[m]
                self.metrics[f"ratio/{name}"] = c.ratio[m]
        return self._stats

    def trainable_unimodal(self) -> torch.Tensor:
        """[M, B, C] uni-modal logits with autograd, for a method that trains them: the head's own
        classifiers' (late, irfb, boost heads), or its weight split (concat, sum, cosine heads:
        ``head.split_logits`` of this batch's features, which add up to the fused logits)."""
        return trainable_unimodal(self.head, self.head_logits.get("unimodal"), self.features[:len(self.modalities)])

    @property
    def global_batch(self) -> int:
        """The number of samples in this (micro-)batch over every rank."""
        return self.shard[1] if self.shard is not None else self.labels.shape[0]

    def batch_mean(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Mean over the last axis (samples) of the samples that stay in the loss
        (``sample_weight``; 0 when none is left, without a host check). In a distributed run:
        this rank's share of the global batch's mean (its sum over the global count), so that
        the shares of all ranks add up to the one-process mean."""
        w = self.sample_weight
        if not self.dist.enabled:
            if w is None:
                return per_sample.mean(dim=-1)
            return (per_sample * w).sum(dim=-1) / w.sum().clamp_min(1.0)
        if w is None:
            return per_sample.sum(dim=-1) / self.global_batch
        if self._global_weight is None:
            self._global_weight = self.dist.all_reduce_sum(w.sum())
        return (per_sample * w).sum(dim=-1) / self._global_weight.clamp_min(1.0)

    def _reduce_scores(self, S: torch.Tensor) -> torch.Tensor:
        """The batch scores summed over the ranks; the kept-sample count rides along in the same
        all-reduce (batch_mean needs it next): one collective per step."""
        M = S.shape[0]
        w = self.sample_weight
        parts = [S] if w is None else [S, w.sum().view(1).to(S.dtype)]
        total = self.dist.all_reduce_sum(torch.cat(parts))
        if w is not None:
            self._global_weight = total[M]
        return total[:M]


class Method:
    """Base class: every hook does nothing. Subclasses set ``name`` and ``Params`` (a dataclass
    of their typed hyper-parameters) and override the hooks they need."""

    # ---- what the method needs from the loop (read by the trainer and Balancer) ----
    name: ClassVar[str] = ""
    fusions: ClassVar[tuple[str, ...]] = GENERIC_FUSIONS  # model fusions it works with; the first is its default
    adds_loss_terms: ClassVar[bool] = False  # puts terms into state.extra_losses in after_forward
    computes_task_loss: ClassVar[bool] = False  # sets state.task_loss in after_forward
    measures_balance: ClassVar[bool] = False  # reads state.stats(): every (micro-)batch must be measured
    extra_forwards: ClassVar[bool] = False  # calls state.rerun (forwards with modalities zeroed) in after_forward
    evaluation_features: ClassVar[bool] = False  # its evaluations carry the encoders' features
    single_micro_batch: ClassVar[bool] = False  # a step is one batch (no gradient accumulation)
    skips_parameters: ClassVar[bool] = False  # some steps leave parameters without a gradient (DDP looks for them)
    max_modalities: ClassVar[int | None] = None  # the most modalities it is defined for (None: any)
    needs_inputs: ClassVar[bool] = False  # reads the batch's inputs (state.inputs) in after_forward
    mmtm_stages: ClassVar[tuple[int, ...]] = ()  # encoder stages followed by MMTM blocks it needs (model.mmtm's default)
    # ... and, below: balance_params, unused_modalities, update_parts, evaluations, scratch_runs,
    # sample_copies, teacher_runs, held_out.

    @dataclasses.dataclass
    class Params:
        pass

    def __init__(self, **hparams):
        self.params = make_params(type(self), hparams)

    def balance_params(self) -> dict[str, Any]:
        """The balance_stats parameters this method relies on (merged across methods)."""
        return {}

    def unused_modalities(self, state: "StepState") -> set[str]:
        """Modalities whose features this method replaces by zeros in every step, in training and
        evaluation alike (the loop need not run their encoders). Asked after fit_start."""
        return set()

    def update_parts(self, state: "StepState") -> list[tuple[str, ...] | None]:
        """The (sub-)steps of one training step, each training the named modalities (None: all,
        one step). A method that updates modalities in turn returns one part per modality."""
        return [None]

    def evaluations(self, epoch: int | None) -> tuple[str, ...]:
        """The splits this method needs evaluated before training (epoch None) or after epoch
        `epoch`: "val", or "train" (the training split through evaluation transforms). The loop
        runs the model on every sample of each and hands over the fused and uni-modal logits
        and the labels in the evaluation_end event (``state.evaluation``), before it measures
        the epoch's validation metrics."""
        return ()

    def scratch_runs(self, epoch: int) -> tuple[ScratchRun, ...]:
        """The scratch runs this method needs before epoch `epoch` trains (ScratchRun); the
        loop hands each one's curves over in the scratch_end event (``state.scratch``)."""
        return ()

    def sample_copies(self, epoch: int):
        """Extra copies of training clips for epoch `epoch`, each keeping one modality (a method
        that re-samples the training set), as (clip positions [K], counts [K, M]) in the split's
        clip order (``state.evaluation["index"]`` gives the positions of an evaluated split's
        rows); None: the clips alone. The loop asks when each epoch starts (a resumed one too)
        and hands it to the training loader (``ClipLoader.set_copies``)."""
        return None

    def teacher_runs(self, state: "StepState") -> tuple[TeacherRun, ...]:
        """The uni-modal teachers this method needs before the first step (TeacherRun); the loop
        hands each one over in the teacher_end event (``state.teachers``). Asked after fit_start."""
        return ()

    def held_out(self, state: "StepState") -> HeldOut | None:
        """The training clips this method holds out of training (HeldOut), or None. Asked after
        fit_start."""
        return None

    def fit_start(self, state: StepState) -> None: ...
    def epoch_start(self, state: StepState) -> None: ...
    def before_fusion(self, state: StepState) -> None: ...
    def after_forward(self, state: StepState) -> None: ...
    def after_backward(self, state: StepState) -> None: ...
    def after_step(self, state: StepState) -> None: ...
    def epoch_end(self, state: StepState) -> None: ...
    def state_loaded(self, state: StepState) -> None: ...
    def evaluation_end(self, state: StepState) -> None: ...
    def scratch_end(self, state: StepState) -> None: ...
    def head_losses(self, state: StepState) -> None: ...
    def teacher_end(self, state: StepState) -> None: ...
    def held_out_batch(self, state: StepState) -> None: ...

    def summary(self) -> dict[str, Any]:
        """What the run's summary.json records of this method (after fit_start): JSON values."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def make_params(cls: type[Method], hparams: dict[str, Any]) -> Any:
    """cls.Params from keyword hyper-parameters, with errors that name the key."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(hparams) - set(fields))
    if unknown:
        raise ValueError(f"method {cls.name!r}: unknown hyper-parameter(s) {unknown}; known: {sorted(fields)}")
    params = cls.Params(**hparams)
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def check_number(method: str, name: str, value, *, low=None, high=None, integer=False) -> None:
    """A finite number (an int when `integer`) in [low, high]; ValueError naming method.name."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value != value or value in (float("inf"), float("-inf")):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{method}.{name} must be {kind}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{method}.{name} must be {bounds}, got {value!r}")


def check_choice(method: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{method}.{name} must be one of {tuple(choices)}, got {value!r}")


@dataclasses.dataclass
class WindowParams:
    """When a method acts: inside the inclusive epoch window [start_epoch, end_epoch] (end None:
    to the end of training) and from epoch warmup_epochs on."""

    start_epoch: int = 0
    end_epoch: int | None = None
    warmup_epochs: int = 0

    def check_window(self, method: str) -> None:
        check_number(method, "start_epoch", self.start_epoch, low=0, integer=True)
        if self.end_epoch is not None:
            check_number(method, "end_epoch", self.end_epoch, low=self.start_epoch, integer=True)
        check_number(method, "warmup_epochs", self.warmup_epochs, low=0, integer=True)

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs and epoch >= self.start_epoch and (
            self.end_epoch is None or epoch <= self.end_epoch)


def merge_balance_params(methods: Sequence[Method]) -> dict[str, Any]:
    """One set of balance_stats parameters for all methods of a run; two methods that need
    different values of one parameter are a configuration error naming it."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for method in methods:
        for key, value in method.balance_params().items():
            if key in merged and merged[key] != value:
                raise ValueError(f"methods {owner[key]!r} and {method.name!r} need different {key} "
                                 f"({merged[key]!r} vs {value!r}) for the shared balance statistics")
            merged[key], owner[key] = value, method.name
    return merged


PER_GROUP_SCHEDULERS = (torch.optim.lr_scheduler.LambdaLR, torch.optim.lr_scheduler.MultiplicativeLR,
                        torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def _loop_optimizer(state: StepState, what: str):
    """The loop's optimizer and scheduler, for a method that adds parameter groups."""
    optimizer, scheduler = state.optimizer, state.scheduler
    if optimizer is None:
        raise RuntimeError(f"a method {what} but the loop gave no optimizer: pass optimizer= (and scheduler=) to "
                           f"Balancer")
    if isinstance(scheduler, PER_GROUP_SCHEDULERS):
        raise ValueError(f"a method {what}, and {type(scheduler).__name__} keeps one schedule per group that cannot "
                         f"be extended: use StepLR, CosineAnnealingLR, ReduceLROnPlateau or another scheduler of "
                         f"base rates")
    return optimizer, scheduler


def _add_group(optimizer, scheduler, params, scale: float = 1.0) -> None:
    """A parameter group with group 0's settings and scale times its learning rates (the current
    and the scheduler's initial one), which the scheduler then drives like the rest (a
    ReduceLROnPlateau lowers every group's rate alike)."""
    reference = optimizer.param_groups[0]
    group = {k: v for k, v in reference.items() if k != "params"}
    group["lr"] = reference["lr"] * scale
    if "initial_lr" in reference:
        group["initial_lr"] = reference["initial_lr"] * scale
    optimizer.add_param_group({**group, "params": list(params)})
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.min_lrs.append(scheduler.min_lrs[0] * scale)
    elif scheduler is not None:
        scheduler.base_lrs.append(reference.get("initial_lr", reference["lr"]) * scale)
    if scheduler is not None and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr.append(group["lr"])


def join_optimizer(state: StepState, params: Sequence[torch.nn.Parameter]) -> None:
    """Parameters created during training join the loop's optimizer as a new parameter group
    with the learning rate the scheduler has reached (group 0's) and its initial rate, so that
    the scheduler drives them like the rest; their momentum/Adam state starts at zero, as for
    any fresh parameter."""
    optimizer, scheduler = _loop_optimizer(state, "adds parameters during training")
    _add_group(optimizer, scheduler, params)
    state.parameter_version += 1


def split_optimizer(state: StepState, groups: Sequence[tuple[Sequence[torch.nn.Parameter], float]]) -> None:
    """Before the first step: move each (parameters, lr_scale) out of the loop's optimizer's
    groups into a group of its own with lr_scale times group 0's learning rates (the current and
    the scheduler's initial one), so that the scheduler drives it like the rest. A method calls
    it at fit_start; a resumed run rebuilds the same groups before the optimizer's state loads."""
    optimizer, scheduler = _loop_optimizer(state, "sets learning rates per parameter group")
    if any(optimizer.state.values()):
        raise RuntimeError("split_optimizer: the optimizer has stepped already; regroup before the first step")
    moving = {id(p) for params, _ in groups for p in params}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not moving <= held:
        raise ValueError("split_optimizer: some parameters to regroup are not in the optimizer")
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in moving]
    for params, scale in groups:
        _add_group(optimizer, scheduler, params, scale)

"""A training step's execution, apart from the loop around it: inputs onto the device, the
forward under autocast (and through DistributedDataParallel in a distributed run), the loss the
head and the methods compose, backward with the GradScaler, the methods' modulation, the
optimizer step, and the device-side sums and flags the loop reads at epoch ends. Nothing here
reads a tensor on the host. The trainer (mmfast/trainer.py) drives it; evaluation passes use its
inputs, autocast and forward too."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .data.features import mask_key
from .models import fusion_kind, task_loss_per_sample
from .models.estimators import zero_out_logits

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def all_finite(tensors: list) -> torch.Tensor:
    """Whether every element of `tensors` is finite, as a device bool: one foreach max-norm (a
    NaN or Inf anywhere makes it non-finite; unlike the 2-norm, huge finite values do not)."""
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"), foreach=True))


def step_forward(model, unimodal_estimate, inputs, skip=(), drop=None, measure_dropped=False, keep=None):
    """A training step's forward: encode, drop features (`drop`: features -> features), fuse.
    Returns (fused, unimodal, the head's extras, measured): unimodal are the head's uni-modal
    logits (trainable for heads with classifiers of their own), measured the uni-modal logits the
    balance statistics read, picked by unimodal_estimate(features, head's estimate). Everything
    that trains sees the dropped features; `measured` comes from the features before the drop
    (OPM measures the imbalance there: TPAMI 2024 Alg. 1, eq. 7), unless `measure_dropped`
    (missing-modality evaluation: every output sees the drop). `keep` [B, M] bool: the
    modalities each sample has (a copy of a re-sampled training set keeps one: ClipLoader.set_copies);
    the others' features are zeros from the start, for everything after the encoders."""
    M = len(model.modalities)
    encoded = model.encode(inputs, skip=skip)
    features, fused_repr = encoded[:M], encoded[M:]  # (IRFB: the fused representation follows)
    if keep is not None:
        features = [f * keep[:, m, None].to(f.dtype) for m, f in enumerate(features)]
    dropped = features if drop is None else list(drop(features))
    source = dropped if measure_dropped else features
    unchanged = all(a is b for a, b in zip(source, dropped))  # (no drop: the head measures what it fuses)
    fused, unimodal, *extra = model.head(dropped + fused_repr, measure=None if unchanged else source)
    extra = dict(extra[0]) if extra else {}
    estimate = extra.pop("measured", unimodal)  # (heads with classifiers of their own measure apart)
    return fused, unimodal, extra, unimodal_estimate(source, estimate)


class _StepModule(torch.nn.Module):
    """step_forward as a module's forward, for DistributedDataParallel (which syncs gradients of
    what runs inside its forward); holds the model, adds no parameters."""

    def __init__(self, model, unimodal_estimate):
        super().__init__()
        self.model = model
        self.unimodal_estimate = unimodal_estimate

    def forward(self, inputs, skip=(), drop=None, measure_dropped=False, keep=None):
        return step_forward(self.model, self.unimodal_estimate, inputs, skip=skip, drop=drop,
                            measure_dropped=measure_dropped, keep=keep)


class StepRunner:
    """Runs training steps for one model and optimizer. `balancer` is set once the trainer has
    built it (the Balancer takes this runner's `estimate`)."""

    def __init__(self, model, optimizer, *, cfg, fusion: str, modalities, device, dist, precision: str):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.fusion, self.modalities, self.device, self.dist = fusion, list(modalities), device, dist
        self.precision = precision
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.balancer = None
        self.sums: dict[str, torch.Tensor] = {}  # the epoch's device sums, read at its end
        self.counts: dict[str, int] = {}
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)  # GradScaler skips, this epoch
        self._ddp = None  # DistributedDataParallel around the step's forward; built on first use
        self._ddp_version = None

    # ---- the forward -------------------------------------------------------------------------

    def inputs(self, batch):
        """The modalities' tensors (and the padding masks of features modalities, under their
        batch keys) on the device, and the labels."""
        out = {}
        for name in self.modalities:
            x = batch[name].to(self.device, non_blocking=True)
            if self.cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out[name] = x
            if mask_key(name) in batch:
                out[mask_key(name)] = batch[mask_key(name)].to(self.device, non_blocking=True)
        return out, batch["label"].to(self.device, non_blocking=True)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _zero_out_estimate(self) -> bool:
        return self.cfg.model.estimator == "zero_out" and fusion_kind(self.fusion).splittable

    def unimodal(self, features, fused_unimodal):
        if self._zero_out_estimate():
            return zero_out_logits(lambda fs: self.model.head(fs)[0], features)
        return fused_unimodal

    def estimate(self, features):
        """The uni-modal logits of M pooled features (a method that measures before the fusion);
        the head runs once, for the estimate it gives or for the zero-out passes."""
        return self.unimodal(features, None if self._zero_out_estimate() else self.model.head(features)[1])

    def forward(self, inputs, skip=(), drop=None, measure_dropped=False, keep=None):
        """Encode, drop the modalities' features (`drop`: features -> features), fuse (step_forward).
        Returns (fused, unimodal, the head's extras, measured). Training steps of a distributed
        run go through DistributedDataParallel (gradients all-reduced during backward)."""
        if self.dist.enabled and self.model.training:
            return self._distributed_model()(inputs, skip=skip, drop=drop, measure_dropped=measure_dropped, keep=keep)
        return step_forward(self.model, self.unimodal, inputs, skip=skip, drop=drop, measure_dropped=measure_dropped,
                            keep=keep)

    def rerun(self, inputs, subsets) -> torch.Tensor:
        """The fused logits [K, B, C] of the model on `inputs` with, for each of the K subsets
        (tuples of modality names), every other modality's input zeroed (a features modality's
        values; its padding mask stays); in eval mode (batch norm's running statistics) with
        autograd, the K variants as one batch (StepState.rerun)."""
        K = len(subsets)
        batched = {}
        for name in self.modalities:
            x = inputs[name]
            keep = torch.tensor([name in s for s in subsets], dtype=x.dtype, device=x.device)
            batched[name] = (x.unsqueeze(0) * keep.view(K, *(1,) * x.dim())).reshape(K * x.shape[0], *x.shape[1:])
            if mask_key(name) in inputs:
                mask = inputs[mask_key(name)]
                batched[mask_key(name)] = mask.unsqueeze(0).expand(K, *mask.shape).reshape(K * mask.shape[0], -1)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                fused = self.model.head(self.model.encode(batched))[0]
        finally:
            self.model.train(was_training)
        return fused.view(K, -1, fused.shape[-1])

    def _distributed_model(self):
        """DDP around the model's step (built on first use, rebuilt when a method added
        parameters: parameters_changed)."""
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            # Parameters that get no gradient in some steps (Balancer.skips_parameters). With batch
            # norm over the global batch the buffers agree on every rank: no broadcast per forward.
            unused = self.balancer.skips_parameters
            self._ddp = DistributedDataParallel(_StepModule(self.model, self.unimodal),
                                                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                                find_unused_parameters=unused, broadcast_buffers=not self.cfg.sync_bn)
            self._ddp_version = self.balancer.parameter_version
        return self._ddp

    def parameters_changed(self) -> None:
        """An epoch end: a method that added parameters (on every rank) needs DDP's buckets rebuilt."""
        if self._ddp is not None and self.balancer.parameter_version != self._ddp_version:
            self._ddp = None

    # ---- the step ----------------------------------------------------------------------------

    def step(self, inputs, labels, *, last_micro_batch: bool = True, shard=None, keep=None) -> None:
        """One training step on device inputs: a sub-step per part the methods name (every
        modality, or one at a time), the optimizer stepping after the last micro-batch. `keep`:
        the batch's [B, M] modalities per sample (re-sampled copies; None: every one)."""
        for part in self.balancer.update_parts():
            skip = set(self.balancer.unused_modalities) | ({m for m in self.modalities if m not in part}
                                                           if part else set())
            with contextlib.ExitStack() as stack:
                if self.dist.enabled and not last_micro_batch:  # (no gradient all-reduce before the last)
                    stack.enter_context(self._distributed_model().no_sync())
                self._forward_backward(inputs, labels, part, shard, skip, keep)
            if last_micro_batch:
                self._optimizer_step()

    def _forward_backward(self, inputs, labels, part, shard, skip, keep=None) -> None:
        """Forward, the loss, backward (gradients accumulate), the epoch sums."""
        bal = self.balancer
        with self.autocast():
            fused, unimodal, extra, measured = self.forward(
                inputs, skip=skip, drop=lambda f: bal.drop(f, part=part, shard=shard, labels=labels), keep=keep)
        # (before the loss: methods may add loss terms or compute the task loss from the head's
        # trainable logits; the balance statistics read `measured`)
        bal.after_forward(measured.float(), labels, fused=fused, extras=extra, trainable=unimodal.float(),
                          rerun=lambda subsets: self.rerun(inputs, subsets), inputs=inputs if bal.needs_inputs else None)
        per_sample = F.cross_entropy(fused.float(), labels, reduction="none")  # (logged: the fused head's)
        # The head's task loss (mmfast/models/registry.py), or the method's where it computes it.
        loss = bal.loss() if bal.computes_task_loss else bal.loss(task_loss_per_sample(self.fusion, fused, unimodal,
                                                                                      labels))
        weight = bal.sample_weight
        scale = self.scaler.scale if self.scaler is not None else (lambda t: t)
        scale(loss / self.cfg.grad_accum).backward()
        # Device-side bookkeeping: no host read. (Under a GradScaler a non-finite loss gives
        # non-finite gradients, and the scaler skips the step: see below.)
        if self.scaler is None:
            self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), bal.state.step, self.bad_step)
        correct = (fused.argmax(dim=1) == labels).float()
        kept = weight if weight is not None else torch.ones_like(correct)
        self.accumulate("loss", per_sample.detach() @ kept)  # the fused head's cross-entropy, for every method
        self.accumulate("correct", correct @ kept)
        self.accumulate("samples", kept.sum())

    def _optimizer_step(self) -> None:
        """Gradient checks, the methods' modulation (after_backward), the optimizer step."""
        bal = self.balancer
        # A non-finite gradient stops the run (checked before modulation, on the gradients backward
        # made); under a GradScaler the scaler skips the step instead (it finds the same non-finite
        # gradients once unscaled, which after_backward does first), and the skips are counted.
        # One foreach reduction over all gradients: a NaN or Inf anywhere makes the norm non-finite.
        if self.scaler is None:
            finite = self.grads_finite()
            if finite is not None:
                self.bad_step = torch.where((self.bad_step < 0) & ~finite, bal.state.step, self.bad_step)
        bal.after_backward(scaler=self.scaler, optimizer=self.optimizer)
        for name, value in bal.metrics.items():
            self.accumulate(name, value)
        if self.scaler is not None:
            finite = self.grads_finite()
            if finite is not None:
                self.skipped_steps += ~finite
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        bal.after_step()
        self.optimizer.zero_grad(set_to_none=True)

    def grads_finite(self) -> torch.Tensor | None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return all_finite(grads) if grads else None

    def state_finite(self) -> bool:
        """Whether every parameter and buffer is finite (a host read: checkpoints, epoch ends)."""
        state = [t for t in self.model.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return not state or bool(all_finite(state))

    # ---- the epoch's sums --------------------------------------------------------------------

    def accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def live_postfix(self) -> dict:
        sums, n = self.sums, max(float(self.sums["samples"]), 1.0)
        out = {"loss": f"{float(sums['loss']) / n:.3f}", "acc": f"{float(sums['correct']) / n:.3f}"}
        for name in self.modalities:
            if f"ratio/{name}" in sums:
                out[f"rho_{name}"] = f"{float(sums[f'ratio/{name}']) / self.counts[f'ratio/{name}']:.2f}"
        return out

    def epoch_metrics(self, seconds: float) -> dict[str, float]:
        """The epoch's train metrics from its sums (the epoch's one read), which start over."""
        if self.dist.enabled:  # the ranks' shares of the loss and accuracy sums (the rest agree already)
            keys = [k for k in ("loss", "correct", "samples") if k in self.sums]
            total = self.dist.all_reduce_sum(torch.stack([self.sums[k] for k in keys]))
            self.sums.update(zip(keys, total.unbind()))
        sums = {k: float(v) for k, v in self.sums.items()}
        samples = max(sums.pop("samples", 0.0), 1.0)
        metrics = {"train/loss": sums.pop("loss", 0.0) / samples, "train/acc": sums.pop("correct", 0.0) / samples}
        for key, value in sums.items():
            metrics[f"train/{key}"] = value / self.counts[key]
        metrics["time/epoch_s"] = seconds
        metrics["throughput/samples_per_s"] = samples / max(seconds, 1e-9)
        self.sums, self.counts = {}, {}
        return metrics

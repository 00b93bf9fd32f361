"""Scratch runs: a copy of the model, trained apart from the run for a few epochs, whose loss
curves a method uses to set its own weights (G-Blending measures how each head generalises
and overfits). A method asks for them (``Method.scratch_runs(epoch)``, declared like its
evaluations); the trainer runs each here before the epoch starts and hands the curves over
(``Balancer.observe_scratch``). The run itself is untouched: its model, optimizer, random
state and data order carry on as if no scratch run had happened.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .methods.base import ScratchRun


def run_scratch(trainer, run: ScratchRun) -> dict[str, list[float]]:
    """{"train", "val", "train_batch_sum", "val_batch_sum"}: one value per epoch of `run`, on the
    global batch in a distributed run (each rank trains the copy on its shard; the gradients
    are all-reduced)."""
    modalities = list(trainer.modalities)
    if run.head is not None and run.head not in modalities:
        raise ValueError(f"scratch run: head {run.head!r} is not a modality of {modalities}")
    model = copy.deepcopy(trainer.model)
    optimizer = trainer.make_optimizer(model.parameters())
    m = None if run.head is None else modalities.index(run.head)
    skip = set() if m is None else {name for name in modalities if name != run.head}
    loader = trainer.loaders["train"]
    curves = {"train": [], "val": [], "train_batch_sum": [], "val_batch_sum": []}

    def head_loss(inputs, labels):  # per-sample CE of the run's head [B]
        with trainer.steps.autocast():
            fused, unimodal, *_ = model.head(model.encode(inputs, skip=skip))
        return F.cross_entropy((fused if m is None else unimodal[m]).float(), labels, reduction="none")

    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        for t in range(run.epochs):
            model.train()
            loader.epoch = trainer.epoch + t  # (the data order the run's next epochs see)
            loss_sum, samples, batch_means = train_epoch(trainer, model, optimizer, head_loss)
            curves["train"].append(loss_sum / max(samples, 1.0))
            curves["train_batch_sum"].append(batch_means)
            val, val_batch_sum = _validation_loss(trainer, model, head_loss)
            curves["val"].append(val)
            curves["val_batch_sum"].append(val_batch_sum)
    return curves


def train_epoch(trainer, model, optimizer, per_sample_loss) -> tuple[float, float, float]:
    """One epoch of a model trained apart from the run (a scratch run, a teacher) on the run's
    training loader at its current epoch: per_sample_loss(inputs, labels) -> [B], its batch mean
    minimised by `optimizer`; in a distributed run each rank trains on its shard and the
    gradients are all-reduced. Returns (loss sum, samples, sum of the batch means) over the
    global batches, read once at the end of the epoch."""
    dist = trainer.dist
    total = torch.zeros(3, device=trainer.device)  # loss sum, samples, sum of batch means
    for batch in trainer.loaders["train"].batches():
        inputs, labels = trainer.steps.inputs(batch)
        per_sample = per_sample_loss(inputs, labels)
        count = torch.tensor(float(len(labels)), device=trainer.device)
        if dist.enabled:  # (this rank's share of the global batch's mean)
            global_count = dist.all_reduce_sum(count)
            loss = per_sample.sum() / global_count
        else:
            global_count, loss = count, per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.enabled:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
            parts = torch.split(flat, [g.numel() for g in grads])
            torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads)])
            grads = None
        optimizer.step()
        batch_sum = per_sample.detach().sum()
        share = torch.stack([batch_sum, count, batch_sum / global_count])
        total += dist.all_reduce_sum(share) if dist.enabled else share
    loss_sum, samples, batch_means = total.tolist()  # (apart from the run's steps: once an epoch)
    return loss_sum, samples, batch_means


@torch.no_grad()
def _validation_loss(trainer, model, head_loss) -> tuple[float, float]:
    """(mean over the validation samples, sum over its batches of the batch means) of the head's CE."""
    model.eval()
    loader = trainer.loaders["val"]
    rows, index = [], []
    for batch in loader:
        inputs, labels = trainer.steps.inputs(batch)
        rows.append(head_loss(inputs, labels))
        index.append(batch["index"])
    (losses,) = trainer.evaluator.gather_rows("val", index, rows)
    batch_sizes = trainer.cfg.data.batch_size
    # (the sum of batch means over the global batches: the validation split in batches of batch_size)
    batch_sum = float(sum(chunk.mean() for chunk in losses.split(batch_sizes)))
    return float(losses.mean()), batch_sum

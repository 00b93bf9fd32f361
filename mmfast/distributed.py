"""Multi-process training (DDP under torchrun): the process group, batch shards, the collectives
the methods need, and batch norm synchronised across processes.

mmfast's distributed run is defined as the one-process run on the same *global* batch:

- ``data.batch_size`` is the global batch; the loaders' plan (mmfast.data.base.ClipLoader.plan)
  is the same on every rank, and rank r decodes the r-th contiguous shard of each batch
  (``shard_bounds``). Resuming with another world size continues the same plan.
- Losses are means over the global batch: each rank's loss is its samples' share of that mean
  times the world size, because DistributedDataParallel averages gradients over the ranks.
- What the methods measure is summed over the ranks before it is used (one small all-reduce
  per step, on the device, no host read): per-modality scores (OGM, OPM), OLM's logit norms,
  boost's score sums at each assignment. Random draws that shape a step (OPM's drop masks) are
  drawn for the global batch from the same generator on every rank, and each rank takes its
  shard; GE noise uses the same Philox key and step on every rank and is added after DDP's
  gradient all-reduce. So every rank computes the same coefficients and keeps the same weights.
- Batch norm statistics are the global batch's (``sync_batch_norm``): torch's SyncBatchNorm on
  GPUs, ``CpuSyncBatchNorm`` (sum and sum of squares through a differentiable all-reduce) on CPU
  processes (gloo), where torch's refuses to run.

``Distributed`` is the single-process no-op when no process group is initialised.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os

import torch
import torch.distributed as dist
from torch import nn


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous shard of `total` items (the first `total % world_size`
    ranks get one more, as numpy.array_split)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Distributed:
    """The process group a run trains in: rank, world size, and the sums the methods need.
    With world_size 1 every operation is the identity, and nothing talks to torch.distributed."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)

    @classmethod
    def current(cls) -> "Distributed":
        """The initialised default process group, or a single process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints and plots."""
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks (a new tensor; `t` itself is left alone)."""
        if not self.enabled:
            return t
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def gather_rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Every rank's `t` concatenated along dim 0 in rank order. The ranks' row counts may
        differ, and a rank with no rows passes None (an evaluation's shards: a split smaller
        than the world); None only if every rank does. For evaluation, not the training step:
        it exchanges the shapes on the host."""
        if not self.enabled:
            return t
        meta = self.gather_objects(None if t is None else (t.shape[0], tuple(t.shape[1:]), t.dtype))
        known = [m for m in meta if m is not None]
        if not known:
            return None
        _, trailing, dtype = known[0]
        counts = [0 if m is None else m[0] for m in meta]
        padded = torch.zeros((max(counts), *trailing), dtype=dtype, device=self._device(t))
        if t is not None:
            padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def _device(self, t: torch.Tensor | None) -> torch.device:
        if t is not None:
            return t.device
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def gather_objects(self, obj) -> list:
        """[every rank's `obj`] in rank order (host values: an evaluation's skipped clips)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn):
        """fn() on rank 0, its result on every rank. An error rank 0 meets is raised on every
        rank (rank 0's own exception there; elsewhere the same type with rank 0's message), so
        that no rank waits at the next collective for a rank that has stopped."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # (told to every rank before it is raised)
                error = err
        result, message = self.broadcast_object((result, None if error is None else (type(error), str(error))))
        if error is not None:
            raise error
        if message is not None:
            kind, text = message
            try:
                raised = kind(f"(rank 0) {text}")
            except Exception:  # (a type that takes other arguments)
                raised = RuntimeError(f"(rank 0) {kind.__name__}: {text}")
            raise raised
        return result

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a host value: for start-up and epoch-end decisions)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> Distributed:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL when
    the run trains on CUDA, gloo on CPU. Without WORLD_SIZE > 1: a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Distributed()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set: launch with torchrun "
                                   f"(torchrun --nproc_per_node N -m mmfast train ...)")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed.current()


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of a CPU process group (gloo): the per-channel sum and
    sum of squares are all-reduced with autograd (torch.distributed.nn), so the gradients are
    those of one process normalising the whole batch. Outside a process group, or in eval mode,
    it is plain batch norm. Accepts [N, C, ...] inputs (1-D, 2-D and 3-D batch norm)."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"CpuSyncBatchNorm expects [N, C, ...] input, got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        C = x.shape[1]
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0.0)  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


@contextlib.contextmanager
def local_batch_norm(module: nn.Module):
    """Inside: every batch norm layer of `module` over the global batch (torch's SyncBatchNorm,
    CpuSyncBatchNorm) normalises with this process's batch alone, as plain batch norm does: for
    a batch every rank holds whole (LFM's held-out batch), where syncing adds nothing and
    torch's SyncBatchNorm cannot be differentiated twice."""
    synced = [m for m in module.modules() if isinstance(m, (nn.SyncBatchNorm, CpuSyncBatchNorm))]
    for m in synced:
        m.forward = functools.partial(nn.modules.batchnorm._BatchNorm.forward, m)
    try:
        yield
    finally:
        for m in synced:
            del m.forward


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every batch norm layer replaced by one over the global batch: torch's
    SyncBatchNorm on GPUs, CpuSyncBatchNorm on the CPU (weights and running statistics kept)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
        return out.to(module.running_mean.device if module.running_mean is not None else "cpu")
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module

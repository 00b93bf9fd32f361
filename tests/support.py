"""What several test files share (tests/ is on the import path: pyproject's pytest pythonpath):
where the Triton kernels are tested, the CUDA skip mark, the host-synchronisation guard, the
host-read count of a trainer's steps."""
import contextlib

import pytest
import torch

# Where the Triton kernels are tested: CUDA when present, else the CPU (interpreted; conftest.py
# sets TRITON_INTERPRET before any kernel is defined).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def no_device_sync(device):
    """On a CUDA device: any host synchronisation inside raises (torch's sync debug mode);
    elsewhere nothing (the host-read counter is the CPU's check)."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def small_run_config(dataset, out, *overrides):
    """A run of the embedded config on a small generated dataset: 2 epochs of batches of 8 at
    32 px, one decoding thread, fp32, no progress bar; `overrides` as on the command line."""
    from mmfast.config import load_config

    return load_config("embedded", [f"data.root={dataset}", f"out={out}", "epochs=2", "data.batch_size=8",
                                    "data.size=32", "data.num_workers=1", "progress=false", "precision=fp32", *overrides])


def count_step_reads(trainer) -> list:
    """Wraps trainer.train_step: the returned list gets, per training step, the host reads it made
    ({} when none: mmfast.diagnostics.count_host_reads)."""
    from mmfast.diagnostics import count_host_reads

    original, reads = trainer.train_step, []

    def counted_step(batch, **kw):
        with count_host_reads() as counts:
            original(batch, **kw)
        reads.append(dict(counts))

    trainer.train_step = counted_step
    return reads

"""What several test files share (tests/ is on the import path: pyproject's pytest pythonpath):
where the Triton kernels are tested, the CUDA skip mark, the host-synchronisation guard."""
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

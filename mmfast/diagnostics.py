"""Checks of the hot-path rules, for tests, benchmarks and users' own loops.

``count_host_reads()`` counts the Tensor calls that read a value on the host (``item``,
``tolist``, ``__bool__`` as in ``if t:``, ``__float__``, ``__int__``, ``numpy``): on a GPU each is
a synchronisation that stalls the step. A training step of mmfast's makes none::

    with count_host_reads() as reads:
        trainer.train_step(batch)
    assert not reads, reads       # {"item": 3, ...} names what read and how often
"""
from __future__ import annotations

import contextlib

import torch

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Yields a dict {method name: calls} of host reads made inside the block (names that were
    not called are absent; ``sum(reads.values())`` is the total). The Tensor methods are patched
    for the block's duration and restored on exit, also when it raises. Not thread-safe: it
    patches torch.Tensor for the whole process."""
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name, original):
        def method(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(self, *args, **kwargs)
        method.__name__ = name
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

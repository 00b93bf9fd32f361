"""mmfast.cpu_memory.retain_freed_memory: a loop that allocates, touches and frees a large
buffer stops page-faulting on it (each fault: a fresh zero-filled page from the kernel)."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from mmfast.cpu_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() and retain_freed_memory()  # (idempotent)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 40 * 2**20 // 4  # 40 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
for _ in range(5):  # the first rounds fault either way (glibc settles where the block lives)
    x = torch.ones(n); del x
before = faults()
for _ in range(5):
    x = torch.ones(n); del x
print(faults() - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_retained_memory_is_reused_without_page_faults():
    pages = 5 * 40 * 2**20 // 4096  # five fresh 40 MiB buffers
    assert page_faults("default") > 0.9 * pages  # glibc maps and unmaps each one
    assert page_faults("retain") < 0.02 * pages  # the heap keeps it: the same pages again

"""Fixtures for every test: a fresh random generator with its seed printed on failure, the
native CPU kernels' instruction-set switch. Without a GPU, Triton kernels run in the interpreter."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU under the interpreter, which must be chosen before
# any kernel is defined (that is, before mmfast.kernels.* is imported). With a GPU they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The embedded config caches decoded clips (data.cache: auto): the suite's go to a folder of its
# own (shared by its processes: distributed ranks build one cache together), never the user's.
_CACHE = tempfile.mkdtemp(prefix="mmfast-test-cache-")
os.environ["MMFAST_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)


@pytest.fixture
def gen(request):
    """A torch.Generator with a fresh seed every run; the seed is printed when a test fails
    (MMFAST_TEST_SEED=<seed> replays it)."""
    seed = int(os.environ.get("MMFAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    g = torch.Generator().manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    print(f"torch seed for {request.node.name}: {seed}")
    return g


@pytest.fixture
def float64():
    """Modules and tensors made in the test default to float64 (restored afterwards)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def use_cpu_isa():
    """Call with an ISA name to run the native CPU kernels on that variant; restored afterwards."""
    import mmfast

    before = mmfast.build_info()["cpu_isa"]
    yield mmfast._C.set_cpu_isa
    mmfast._C.set_cpu_isa(before)

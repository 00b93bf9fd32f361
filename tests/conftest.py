"""Fixtures for every test: a fresh random generator with its seed printed on failure, float64
defaults, the native CPU kernels' instruction-set switch, the audio-dominant diagnosis that the
diagnose and behaviour tests share; how xdist workers get the files. Without a GPU, Triton
kernels run in the interpreter."""
import atexit
import fcntl
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

# Under pytest-xdist (`make test` runs 2 workers on a 2-core machine) each worker, and each process
# its tests start, computes in one thread: the workers fill the cores, and the small models'
# operations gain nothing from a second thread (the spinning threads of two pools would fight).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def audio_dominant_diagnosis(tmp_path_factory):
    """`mmfast diagnose` on the demo's dataset (audio dominant, 480 clips, seed 0) in fp32: its
    joint run is also the baseline of the peers' behaviour tests (the demo's schedule and seed,
    the precision every CPU trains in). {"root": dataset, "out": diagnosis folder, "overrides",
    "report"}."""
    from mmfast.data import generate
    from mmfast.diagnose import diagnose

    # (once per test session: with xdist workers, the first to need it trains, under a lock in
    # the folder the workers share; the others read its finished runs, which diagnose reuses)
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    base = shared / "audio_dominant"
    base.mkdir(exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root = base / "embedded_audio"
        if not (base / "generated").exists():
            shutil.rmtree(root, ignore_errors=True)
            generate(root, clips=480, dominant="audio", imbalance=2.5, seed=0)
            (base / "generated").touch()
        overrides = [f"data.root={root}", "precision=fp32", "data.num_workers=1"]
        report = diagnose("embedded", overrides, out=base / "diag", echo=lambda line: None)
    return {"root": root, "out": base / "diag", "overrides": overrides, "report": report}


# Files whose tests share a session fixture that trains go to one xdist worker together (so that
# it trains the fixture while the other runs other files, never waiting on its lock); every other
# file goes whole to one worker (its module fixtures built once). `make test` runs xdist.
SHARED_TRAINING = {"audio_dominant_diagnosis": ("tests/test_diagnose.py", "tests/methods/test_peer_behaviour.py")}
# The longest of those units start first, so that no worker is left with one of them at the end.
LONGEST_FIRST = ("audio_dominant_diagnosis", "tests/test_run_dir.py", "tests/test_distributed.py")
_UNIT_OF_FILE = {path: unit for unit, paths in SHARED_TRAINING.items() for path in paths}


def _unit(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return _UNIT_OF_FILE.get(path, path)


def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # (stable: files keep their order)


@pytest.hookimpl(optionalhook=True)  # (a hook of pytest-xdist: plain pytest runs without it)
def pytest_xdist_make_scheduler(config, log):
    """xdist's file scheduling with the units above (a file, or files sharing a fixture)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return _unit(nodeid)

    return FileUnits(config, log)

"""Multi-process training: 2 processes on the gloo backend (CPU), started as torchrun starts them,
against one process on the same global batch. Every rank computes the same coefficients, drop
probabilities, logit coefficients and classifier assignments as the one process, and the
parameters after k steps are the same (up to float rounding: the all-reduce sums in another
order); a run stopped under 2 processes resumes in 1. The collectives' helpers and the CPU
batch norm over the global batch are tested here too."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmfast.data import generate
from mmfast.distributed import CpuSyncBatchNorm, Distributed, shard_bounds, sync_batch_norm

pytest.importorskip("nvidia.dali")
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS_PER_EPOCH = 3  # 21 training clips, global batch 8: shards 4/4, 4/4 and 3/2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("dist") / "cremad", clips=30, seed=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, world_size, overrides=(), *, max_steps, resume_out=None, evaluate=False):
    """Run the worker on one run in `world_size` processes; returns (records per rank, state
    dicts per rank, out)."""
    spec = run_spec(tmp_path / name, overrides, max_steps=max_steps, resume_out=resume_out, evaluate=evaluate)
    return finish(start_runs(tmp_path / name, world_size, [spec]))


def run_spec(folder, overrides=(), *, max_steps, resume_out=None, evaluate=False) -> dict:
    """One run of a launch: its overrides, steps, and where it writes (out, records)."""
    out = resume_out or folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    return {"overrides": [f"out={out}", *overrides], "max_steps": max_steps, "records": str(folder / "r"),
            "out": str(out), "resume": resume_out is not None, "evaluate": evaluate}


def start_runs(folder, world_size, specs):
    """Start `world_size` worker processes that train the runs of `specs` one after the other
    (wait / finish / Launch wait for them): launches started together share the cores (their
    processes wait on each other's collectives part of the time)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / f"spec{world_size}.json"
    spec_file.write_text(json.dumps({"runs": specs}))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("WORLD_SIZE", None)
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs, specs, world_size


def wait(started, timeout=600) -> list:
    """Each process's log once all have ended (killed after `timeout` seconds)."""
    procs = started[0]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    return logs


def records_of(spec, world_size):
    """(records per rank, state dicts per rank, out) of a finished run."""
    records = [json.loads(Path(f"{spec['records']}.{r}.json").read_text()) for r in range(world_size)]
    states = [torch.load(f"{spec['records']}.{r}.pt") for r in range(world_size)]
    return records, states, Path(spec["out"])


def finish(started):
    """Wait for a launch of one run; returns (records per rank, state dicts per rank, out)."""
    procs, specs, world_size = started
    logs = wait(started)
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {world_size} failed:\n{log[-4000:]}"
    return records_of(specs[0], world_size)


class Launch:
    """A finished launch of several runs: `result(name)` is a run's (records per rank, state
    dicts per rank, out), or the test fails with the launch's log when that run did not finish
    (a run that fails ends its launch: the runs after it fail the same way)."""

    def __init__(self, started, names):
        self.procs, self.specs, self.world_size = started
        self.names = names
        self.logs = wait(started, timeout=900)

    def result(self, name):
        spec = self.specs[self.names.index(name)]
        if not all(Path(f"{spec['records']}.{r}.pt").exists() for r in range(self.world_size)):
            codes = [p.returncode for p in self.procs]
            pytest.fail(f"run {name!r} of the {self.world_size}-process launch did not finish (exit codes {codes}):\n"
                        + "\n".join(log[-4000:] for log in self.logs))
        return records_of(spec, self.world_size)


def base_overrides(dataset, method, *extra):
    # (default layout and fp32: channels_last kernels differ by batch size, and bf16 rounds, so
    # shards of 4 would round otherwise than batches of 8 and the comparison would measure the
    # layout or the precision, not the method)
    return [f"data.root={dataset}", "epochs=2", "data.batch_size=8", "data.size=32", "data.num_workers=1",
            "progress=false", "seed=3", f"method={method}", "optim.lr=0.05", "channels_last=false", "precision=fp32",
            *extra]


def assert_same_state(a, b, rtol=2e-4, atol=1e-4):
    """Equal state dicts; the default tolerance covers the rounding of a few steps (a batch of 4
    runs other convolution kernels than one of 8 in channels_last); a wrong loss scale or a
    missed all-reduce moves parameters by a whole update."""
    assert a.keys() == b.keys()
    for name in a:
        if not isinstance(a[name], torch.Tensor):  # (extra state: boost's classifier counts)
            assert a[name] == b[name], name
        elif a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(a[name], b[name]), name


def assert_same_steps(steps_a, steps_b, rtol=1e-4, atol=1e-5):
    assert len(steps_a) == len(steps_b)
    for t, (a, b) in enumerate(zip(steps_a, steps_b)):
        assert a.keys() == b.keys(), t
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=rtol, abs=atol), f"step {t}, {key}"


OPM = ["hparams.p_exe=1.0", "hparams.q_base=0.6"]  # (drops from the first step)
# method, its overrides, steps, a metric it logs every step
METHOD_CASES = [
    ("ogm_ge", ["hparams.alpha=1.5"], STEPS_PER_EPOCH + 1, "coeff/"),
    ("opm", OPM, STEPS_PER_EPOCH + 1, "drop_prob/"),
    ("olm", [], STEPS_PER_EPOCH + 1, "olm/w/"),
    ("boost", ["hparams.interval=1", "hparams.tau=0.0"], 2 * STEPS_PER_EPOCH, "boost/omega/"),
    ("agm", ["hparams.alpha=2.0"], STEPS_PER_EPOCH + 1, "agm/kappa/"),
    ("pmr", [], STEPS_PER_EPOCH + 1, "pmr/rho/"),
    ("mmpareto", [], STEPS_PER_EPOCH + 1, "mmpareto/cos/"),
    ("cml", ["hparams.variant=toolkit", "hparams.lam=1.0"], STEPS_PER_EPOCH + 1, "ratio/"),  # (its batch-sum hinge)
    ("mla", [], STEPS_PER_EPOCH + 1, "mla/projection_trace"),
    ("reconboost", ["hparams.phase1_epochs=1", "hparams.phase2_epochs=1"], STEPS_PER_EPOCH + 1, "reconboost/beta"),
    ("gblending", ["hparams.super_epoch=2"], STEPS_PER_EPOCH + 1, "gblending/w/"),
    # (its held-out update runs on every rank, batch norm over the local batch at epoch 0, then
    # averages; a large alpha_lr from the middle makes the weight move visibly, unclipped)
    ("lfm", ["hparams.schedule=learned", "hparams.held_out_clips=2", "hparams.held_out_batch=2",
             "hparams.alpha_lr=2.0", "hparams.initial_a_cls=0.5"], STEPS_PER_EPOCH + 1, "lfm/a_cls"),
]

@pytest.fixture(scope="module")
def launches(dataset, tmp_path_factory):
    """The runs of the comparisons below in two launches started together: one process trains the
    one-process runs in turn, two processes the two-process ones (a small run's time is mostly
    its process' start-up and imports; each run has its own trainer, out and records, the
    process group is the first run's)."""
    root = tmp_path_factory.mktemp("launches")
    one, two = {}, {}
    for method, extra, steps, _ in METHOD_CASES:
        one[method] = two[method] = (base_overrides(dataset, method, *extra), steps, False)
    # the resume test: stopped in epoch 1 under 2 processes, against one process all along
    one["resume"] = (base_overrides(dataset, "opm", *OPM), 2 * STEPS_PER_EPOCH, False)
    two["resume"] = (base_overrides(dataset, "opm", *OPM), STEPS_PER_EPOCH + 1, False)
    # the evaluation test: a global batch of 2, no training
    one["evaluate"] = two["evaluate"] = ([*base_overrides(dataset, "joint"), "data.batch_size=2"], 0, True)
    # the cache test: 2 processes without and with a fresh cache
    two["plain"] = (base_overrides(dataset, "ogm_ge", "data.cache=off"), 2 * STEPS_PER_EPOCH, False)
    two["cached"] = (base_overrides(dataset, "ogm_ge", f"data.cache={root / 'cache'}"), 2 * STEPS_PER_EPOCH, False)
    started = {}
    for world_size, runs in ((1, one), (2, two)):
        folder = root / f"world{world_size}"
        specs = [run_spec(folder / name, overrides, max_steps=steps, evaluate=evaluate)
                 for name, (overrides, steps, evaluate) in runs.items()]
        started[world_size] = (start_runs(folder, world_size, specs), list(runs))
    return {**{world_size: Launch(*args) for world_size, args in started.items()}, "cache": root / "cache"}


@pytest.mark.parametrize("method,extra,steps,watched", METHOD_CASES)
def test_two_processes_equal_one_process_on_the_global_batch(launches, method, extra, steps, watched):
    (one,), (one_state,), one_out = launches[1].result(method)
    two, two_states, out = launches[2].result(method)
    assert two[0]["world_size"] == 2 and len(one["steps"]) == steps
    assert any(key.startswith(watched) for key in one["steps"][-1]), one["steps"][-1].keys()
    # the ranks agree exactly with each other (same collectives' results, same noise key) ...
    assert two[0]["steps"] == two[1]["steps"]
    assert_same_state(two_states[0], two_states[1], rtol=0, atol=0)
    # ... and with one process up to rounding
    assert_same_steps(one["steps"], two[0]["steps"])
    assert_same_state(one_state, two_states[0])
    if method == "ogm_ge":
        assert any(c < 1 for step in one["steps"] for key, c in step.items() if key.startswith("coeff/"))
    if method == "lfm":  # (the two updates, before epochs 0 and 1, moved the weight)
        assert all(abs(step["lfm/a_cls"] - 0.5) > 1e-3 for step in one["steps"][STEPS_PER_EPOCH:])
    if method == "opm":
        assert any(q > 0 for step in one["steps"] for key, q in step.items() if key.startswith("drop_prob/"))
    if method == "boost":  # a classifier was added after epoch 0, on every rank, and then trained
        assert one["assignments"] == two[0]["assignments"] == two[1]["assignments"]
        assert one["assignments"][0][1] is not None
    # only rank 0 wrote the run directory: one line per finished epoch, global training sums
    one_lines = (one_out / "metrics.jsonl").read_text().splitlines()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(one_lines) == (steps - 1) // STEPS_PER_EPOCH
    a, b = json.loads(one_lines[0]), json.loads(lines[0])
    for key in ("train/loss", "train/acc", "val/acc", "val/loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_resume_with_another_world_size(launches, tmp_path):
    """Stopped mid-epoch 1 under 2 processes, finished in 1: the same parameters as 1 process
    all along (the plan of global batches does not depend on the world size)."""
    total = 2 * STEPS_PER_EPOCH
    (one,), (one_state,), _ = launches[1].result("resume")
    _, _, out = launches[2].result("resume")
    (rest,), (resumed_state,), _ = launch(tmp_path, "resumed", 1, max_steps=total, resume_out=out)
    assert len(rest["steps"]) == total - STEPS_PER_EPOCH - 1
    assert_same_steps(one["steps"][STEPS_PER_EPOCH + 1:], rest["steps"])
    assert_same_state(one_state, resumed_state)


def test_distributed_evaluation_shards_the_splits_and_gathers_the_same_metrics(launches):
    """Each rank decodes its shard of every evaluation batch (a global batch of 2: the last
    batch of an odd split is rank 0's alone); the gathered metrics, missing-modality metrics and
    linear probes equal one process's on the same weights, on both ranks."""
    (one,), _, _ = launches[1].result("evaluate")
    two, _, _ = launches[2].result("evaluate")
    whole = one["evaluate"]["decoded"]
    shards = [r["evaluate"]["decoded"] for r in two]
    for split in ("val", "test"):
        n = whole[split]
        assert [s[split] for s in shards] == [(n + 1) // 2, n // 2], (split, n)
    assert one["evaluate"]["val"]["val/samples"] == whole["val"]
    assert any(n % 2 for n in whole.values()), whole  # (the uneven case is exercised)
    for rank in (0, 1):
        for key in ("val", "test", "test_missing", "probe"):
            a, b = one["evaluate"][key], two[rank]["evaluate"][key]
            assert a.keys() == b.keys(), key
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (rank, key, k)
    # dropping half the audio features changed the test metrics (the drop applied, with the global batch's draws)
    assert one["evaluate"]["test_missing"]["test/loss/audio"] != pytest.approx(one["evaluate"]["test"]["test/loss/audio"])


def test_shard_bounds_cover_the_batch_like_array_split():
    for total in range(0, 12):
        for world in range(1, 5):
            bounds = [shard_bounds(total, r, world) for r in range(world)]
            expected = [(int(a[0]) if len(a) else None, len(a)) for a in
                        __import__("numpy").array_split(range(total), world)]
            assert [hi - lo for lo, hi in bounds] == [n for _, n in expected]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))


def test_single_process_distributed_is_the_identity():
    d = Distributed()
    t = torch.randn(3)
    assert not d.enabled and d.is_main and d.all_reduce_sum(t) is t and d.broadcast_object([1]) == [1]


def test_local_batch_norm_makes_synced_layers_plain_batch_norm_and_puts_them_back(gen):
    """LFM's held-out forward: every rank holds the whole batch, and torch's SyncBatchNorm cannot
    be differentiated twice; inside the context both kinds of synced layer run plain batch norm
    on the local batch, after it their own forward again."""
    from mmfast.distributed import local_batch_norm

    net = nn.Sequential(CpuSyncBatchNorm(3), nn.SyncBatchNorm(3), nn.BatchNorm1d(3))
    x = torch.randn(6, 3, generator=gen, requires_grad=True)
    with local_batch_norm(net):
        assert all(m.forward.func is nn.modules.batchnorm._BatchNorm.forward for m in net[:2])
        y = net(x)
        (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        g.sum().backward()  # (second order through each layer)
    expected = nn.Sequential(*[nn.BatchNorm1d(3) for _ in range(3)])(x)
    torch.testing.assert_close(y, expected)
    assert all("forward" not in m.__dict__ for m in net)
    assert type(net[0]).forward is CpuSyncBatchNorm.forward


def test_cpu_sync_batch_norm_is_batch_norm_outside_a_process_group(gen):
    """The converted layers keep weights and statistics and, in one process, compute exactly
    what torch's batch norm does (the 2-process case is covered by the runs above)."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3),
                        nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(5, 2, 8, 8, generator=gen)
    net(x)  # running statistics move
    converted = sync_batch_norm(__import__("copy").deepcopy(net), torch.device("cpu"))
    assert isinstance(converted[1], CpuSyncBatchNorm) and isinstance(converted[5], CpuSyncBatchNorm)
    assert_same_state(net.state_dict(), converted.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(converted(x), net(x), rtol=0, atol=0)
    net.eval(), converted.eval()
    torch.testing.assert_close(converted(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["naive", "dali"])
def test_loader_shards_together_are_the_global_batches(dataset, backend):
    """The distributed sampler of both loaders: rank r's batches are the r-th contiguous shards
    of the one-process batches (same clips, same random crops), epoch after epoch; batch_shard
    names each shard's first row; a last batch smaller than the world is left out."""
    from mmfast.data import DataConfig, FrameRecipe, build_loader

    # (the naive loader decodes in this process: the plan and its shards do not involve its worker
    # processes, whose start-up per loader would be most of the test's time)
    workers = 0 if backend == "naive" else 1
    cfg = DataConfig(root=str(dataset), batch_size=8, num_workers=workers, frames=FrameRecipe(size=32))
    whole = build_loader(cfg, "train", backend)
    world = 3
    shards = []
    for rank in range(world):
        loader = build_loader(cfg, "train", backend)
        loader.set_shard(rank, world)
        shards.append(loader)
    for epoch in range(2):
        expected = list(whole)
        got = [list(loader) for loader in shards]
        assert all(len(g) == len(whole) == len(expected) for g in got)  # (21 clips: 8, 8, 5 >= 3 ranks)
        for b, batch in enumerate(expected):
            for key in batch:
                assert torch.equal(torch.cat([g[b][key] for g in got]), batch[key]), (epoch, b, key)
            starts = [loader.batch_shard(b) for loader in shards]
            sizes = [len(g[b]["label"]) for g in got]
            assert [t for _, t in starts] == [len(batch["label"])] * world
            assert [s for s, _ in starts] == [sum(sizes[:r]) for r in range(world)]
    tail = build_loader(DataConfig(root=str(dataset), batch_size=10, num_workers=workers, frames=FrameRecipe(size=32)),
                         "train", backend)
    tail.set_shard(0, 2)  # 21 clips in batches of 10: the last holds 1 clip, fewer than 2 ranks
    assert len(tail) == 2 and sum(len(b["label"]) for b in tail) == 10


def test_batch_size_smaller_than_the_world_is_refused(dataset):
    from mmfast.data import DataConfig, build_loader

    loader = build_loader(DataConfig(root=str(dataset), batch_size=1, num_workers=0), "train", "naive")
    with pytest.raises(ValueError, match="data.batch_size=1 is the global batch: it must be at least the world size 2"):
        loader.set_shard(0, 2)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        loader.set_shard(2, 2)


def _gather_rows_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        d = Distributed.current()
        uneven = d.gather_rows(torch.arange(6.0).view(3, 2) if rank == 0 else torch.full((1, 2), -1.0))
        one_empty = d.gather_rows(torch.arange(4, dtype=torch.int64) if rank == 0 else None)
        all_empty = d.gather_rows(None)
        objects = d.gather_objects([f"clip{rank}"])
        torch.save({"uneven": uneven, "one_empty": one_empty, "all_empty": all_empty, "objects": objects},
                   f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_rows_takes_uneven_and_empty_shards(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_rows_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["uneven"], torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [-1.0, -1.0]]))
        assert torch.equal(got["one_empty"], torch.arange(4)) and got["one_empty"].dtype == torch.int64
        assert got["all_empty"] is None and got["objects"] == [["clip0"], ["clip1"]]


def launch_cli(tmp_path, dataset, faults: dict, overrides=(), timeout=300):
    """`mmfast train` in 2 processes as torchrun starts them; faults: rank -> MMFAST_FAULT.
    Returns (rank 0's return code, its stderr, seconds from the fault to rank 0's exit)."""
    import re
    import time

    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("MMFAST_FAULT", None)
        if rank in faults:
            env["MMFAST_FAULT"] = faults[rank]
        args = ["train", "--config", "embedded", *base_overrides(dataset, "ogm_ge"), f"out={tmp_path / 'run'}",
                *overrides]
        procs.append(subprocess.Popen([sys.executable, "-m", "mmfast", *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _, err = procs[0].communicate(timeout=timeout)
        ended = time.time()
    finally:
        for p in procs:
            p.kill()
        faulty = procs[1].communicate()[1]
    fault = re.search(r"mmfast fault: \S+ \w+ at ([0-9.]+)", faulty)
    assert fault, f"rank 1 never reached its fault point:\n{faulty[-3000:]}"
    return procs[0].returncode, err, ended - float(fault.group(1))


def test_a_rank_that_dies_ends_the_run_within_seconds(dataset, tmp_path):
    """Rank 1 is killed after its second step; rank 0's next collective fails at once (the
    connection closes) and it exits with a message, long before dist_timeout_s (600 s)."""
    code, err, seconds = launch_cli(tmp_path, dataset, {1: "train_step@2"})
    assert code == 1 and "a collective failed" in err and "Traceback" not in err, err[-3000:]
    assert seconds < 20, seconds


def test_a_stalled_rank_ends_the_run_after_dist_timeout_s(dataset, tmp_path):
    """Rank 1 stalls (sleeps) after its second step: rank 0 waits dist_timeout_s, not gloo's 30
    minutes, then exits naming the timeout."""
    code, err, seconds = launch_cli(tmp_path, dataset, {1: "train_step@2:stall"}, ["dist_timeout_s=5"])
    assert code == 1 and "stalled longer than dist_timeout_s (5.0 s)" in err and "Traceback" not in err, err[-3000:]
    assert "timed out" in err.lower(), err[-3000:]
    assert 4 <= seconds < 30, seconds


def test_ranks_build_one_cache_and_read_what_the_other_wrote(dataset, launches):
    """data.cache with 2 gloo processes: each rank caches the clips it decodes in the first
    epoch (its shard), and in the second reads every clip of its shard from the cache, among
    them clips the other rank wrote; the training is the uncached one's, bit for bit."""
    steps = 2 * STEPS_PER_EPOCH
    plain, plain_states, _ = launches[2].result("plain")
    cached, cached_states, _ = launches[2].result("cached")
    cache = launches["cache"]
    assert cached[0]["steps"] == plain[0]["steps"] and len(plain[0]["steps"]) == steps
    for a, b in zip(plain_states, cached_states):
        assert_same_state(a, b, rtol=0, atol=0)
    train = [record["cache"]["train"] for record in cached]
    shards = [11, 10]  # clips per rank per epoch (21 training clips: shards 4/4, 4/4, 3/2)
    assert [t["decoded"] for t in train] == [2 * n for n in shards]  # epoch 1 only (2 modalities)
    assert [t["reads"] for t in train] == [2 * n for n in shards]  # epoch 2: every clip from the cache
    assert plain[0]["cache"] == {}
    assert len(list(cache.glob("??/*.npy"))) >= 2 * sum(shards)
    # rank 0's second-epoch shard holds clips only rank 1 decoded (read from rank 1's entries)
    from mmfast.data import DataConfig, build_loader

    loader = build_loader(DataConfig(root=str(dataset), batch_size=8, seed=3), "train")
    loader.set_shard(0, 2)
    first = {int(i) for ids in loader.plan(0) for i in ids}
    loader.epoch = 1
    second = {int(i) for ids in loader.plan(0) for i in ids}
    assert len(first) == shards[0] and second - first

"""Run directories that never lie (mmfast/run_dir.py): a run is read from and written to the
directory given, one writer at a time, an epoch end survives a kill at any of its points (the
resumed run ends with the files of an uninterrupted one), nothing non-finite is saved, a resume
refuses config changes that change the training, and bad input ends in a clear message.

Kills are real (SIGKILL) and land at named points through MMFAST_FAULT (mmfast.run_dir.fault_point),
not through sleeps."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmfast.config import load_config
from mmfast.data import DataError, generate
from mmfast.run_dir import RunDirError
from mmfast.trainer import NonFiniteError, Trainer, resume

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")

COMMON = ["epochs=3", "data.batch_size=8", "data.size=32", "data.num_workers=1", "progress=false", "precision=fp32",
          "method=ogm_ge", "seed=1"]
VOLATILE = ("time/", "throughput/")  # (keys that differ between two runs of the same training)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("rundir") / "cremad", clips=30, seed=2)


@pytest.fixture(scope="module")
def no_val_dataset(dataset, tmp_path_factory):
    """The same clips without a val split: every epoch is the best so far, so every epoch end
    writes best.pt (the crash windows between last.pt and best.pt exist at each)."""
    root = tmp_path_factory.mktemp("noval") / "cremad"
    shutil.copytree(dataset, root)
    (root / "val.csv").unlink()
    return root


def config(dataset, out, *overrides):
    return load_config("embedded", [f"data.root={dataset}", f"out={out}", *COMMON, *overrides])


def cli(*args, fault=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MMFAST_FAULT", None)
    if fault:
        env["MMFAST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mmfast", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def train_args(dataset, out, *overrides):
    return ["train", "--config", "embedded", f"data.root={dataset}", f"out={out}", *COMMON, *overrides]


def metrics_lines(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def metrics_lines_raw(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def summary_of(out):
    saved = json.loads((Path(out) / "summary.json").read_text())
    saved.pop("wall_time_s")
    return saved


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def leftovers(out):
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*.tmp"))


@pytest.fixture(scope="module")
def uninterrupted(no_val_dataset, tmp_path_factory):
    """The reference: the same training, never interrupted, in its own process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = cli(*train_args(no_val_dataset, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ---- crash consistency --------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    "epoch_end.before_last@2",  # the epoch is redone
    "epoch_end.between_last_and_best@2",  # best.pt still holds epoch 0: rebuilt from last.pt
    "epoch_end.before_metrics@2",  # the metrics line is missing: written from last.pt's history
    "write:last.pt@2",  # a partial last.pt.tmp; last.pt whole
    "write:best.pt@2",
    "write:metrics.jsonl@2",  # a partial metrics line
    "train_step@4",  # the middle of epoch 1, no mid-epoch checkpoint: resumes from epoch 0's end
])
def test_a_kill_at_any_point_of_the_epoch_end_resumes_to_the_uninterrupted_run(no_val_dataset, uninterrupted,
                                                                               tmp_path, fault):
    out = tmp_path / "run"
    killed = cli(*train_args(no_val_dataset, out), fault=fault)
    assert killed.returncode == -9, killed.stderr[-3000:]  # (SIGKILL at the fault point)
    resumed = cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert leftovers(out) == []
    assert metrics_lines(out) == metrics_lines(uninterrupted)  # every epoch once, in order
    assert summary_of(out) == summary_of(uninterrupted)  # the test metrics of the true best weights
    assert_same_weights(weights(out / "checkpoints" / "best.pt"), weights(uninterrupted / "checkpoints" / "best.pt"))
    assert_same_weights(weights(out / "checkpoints" / "last.pt"), weights(uninterrupted / "checkpoints" / "last.pt"))


def test_with_a_val_split_a_kill_at_the_epoch_end_keeps_the_selected_best(dataset, tmp_path):
    """Model selection on val (the best epoch need not be the last): killed between last.pt and
    best.pt at the first and at the last epoch end, the resumed run selects and tests what the
    uninterrupted one does."""
    reference = tmp_path / "reference"
    assert cli(*train_args(dataset, reference)).returncode == 0
    for epoch in (1, 3):
        out = tmp_path / f"killed{epoch}"
        assert cli(*train_args(dataset, out), fault=f"epoch_end.between_last_and_best@{epoch}").returncode == -9
        resumed = cli("train", "--resume", str(out))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert summary_of(out) == summary_of(reference)
        assert_same_weights(weights(out / "checkpoints" / "best.pt"), weights(reference / "checkpoints" / "best.pt"))


def test_a_best_pt_cut_short_is_rebuilt_and_eval_uses_the_true_best(no_val_dataset, uninterrupted, tmp_path):
    """Killed between last.pt and best.pt at the last epoch end: eval (which writes nothing)
    already reports the best epoch's weights; the resume rewrites best.pt and the summary."""
    out = tmp_path / "run"
    assert cli(*train_args(no_val_dataset, out), fault="epoch_end.between_last_and_best@3").returncode == -9
    assert torch.load(out / "checkpoints" / "best.pt", weights_only=False)["best"]["epoch"] == 1  # stale
    reader = resume(out, read_only=True)
    with torch.no_grad():
        for t in reader.model.state_dict().values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.zero_()  # (so that a load_best that loads nothing shows)
    reader.load_best()
    assert_same_weights(reader.model.state_dict(), weights(uninterrupted / "checkpoints" / "best.pt"))
    assert torch.load(out / "checkpoints" / "best.pt", weights_only=False)["best"]["epoch"] == 1  # (eval wrote nothing)
    with pytest.warns(UserWarning, match="best.pt rewritten"):
        trainer = resume(out)
    trainer.fit()
    assert summary_of(out)["test/acc"] == summary_of(uninterrupted)["test/acc"]
    assert_same_weights(weights(out / "checkpoints" / "best.pt"), weights(uninterrupted / "checkpoints" / "best.pt"))


def test_a_truncated_last_pt_falls_back_to_the_previous_checkpoint(no_val_dataset, uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(no_val_dataset, out), fault="epoch_end.before_metrics@2").returncode == -9
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # (a copy cut short)
    resumed = cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "last.pt cannot be read" in resumed.stderr and "previous.pt" in resumed.stderr
    assert metrics_lines(out) == metrics_lines(uninterrupted)
    assert summary_of(out) == summary_of(uninterrupted)
    # no readable checkpoint at all: a clear error, not a traceback
    for name in ("last.pt", "previous.pt"):
        (out / "checkpoints" / name).write_bytes(b"not a checkpoint")
    broken = cli("train", "--resume", str(out))
    assert broken.returncode == 2 and "no checkpoint in" in broken.stderr and "Traceback" not in broken.stderr


def test_summary_wall_time_sums_the_segments(dataset, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(config(dataset, out, "epochs=1"))
    first = trainer.fit()
    trained = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["wall_time_s"]
    assert 0 < trained <= first["wall_time_s"]
    again = resume(out).fit()  # a finished run: only the test pass runs
    assert again["wall_time_s"] >= trained and again["wall_time_s"] > 0.5 * first["wall_time_s"]
    more = resume(out, ["epochs=2"]).fit()  # trained further: both epochs' time
    assert more["wall_time_s"] >= trained + metrics_lines_raw(out)[1]["time/epoch_s"]
    assert json.loads((out / "summary.after-1-epochs.json").read_text())["epochs"] == 1  # the old ending, kept
    assert more["epochs"] == 2 and len(metrics_lines(out)) == 2


# ---- where a run reads and writes -----------------------------------------------------------

def test_a_copied_run_directory_is_its_own_run(dataset, tmp_path):
    original = tmp_path / "a"
    Trainer(config(dataset, original, "epochs=1")).fit()
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file() and p.name != ".lock"}
    copy = tmp_path / "b"
    shutil.copytree(original, copy)
    resume(copy, ["epochs=2"]).fit()
    after = {p: p.read_bytes() for p in original.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # the original is untouched
    assert len(metrics_lines(copy)) == 2 and len(metrics_lines(original)) == 1
    assert yaml.safe_load((copy / "config.yaml").read_text())["out"] == str(copy)
    reader = resume(copy, read_only=True)
    assert reader.out == copy and reader.epoch == 2
    done = cli("eval", str(copy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["run"] == str(copy)


def test_one_writer_per_run_directory(dataset, tmp_path):
    out = tmp_path / "run"
    first = Trainer(config(dataset, out, "epochs=1"))
    with pytest.raises(RunDirError, match="held by a Trainer of this process that was not closed"):
        resume(out)
    with pytest.raises((RunDirError, FileExistsError)):
        Trainer(config(dataset, out, "epochs=1"))
    first.fit()  # (the lock is released at the end of fit)
    resume(out).close()


def test_another_process_holding_the_run_is_named_and_its_death_frees_the_run(dataset, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "mmfast", *train_args(dataset, out, "checkpoint_every=1")],
                              env=dict(os.environ, MMFAST_FAULT="train_step@2:stall", OMP_NUM_THREADS="1"),
                              stderr=subprocess.PIPE, text=True)
    try:
        for line in holder.stderr:  # (until it stalls, holding the lock)
            if "mmfast fault: train_step stall" in line:
                break
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {holder.pid} on"):
            resume(out)
    finally:
        holder.kill()
        holder.wait()
    resume(out).close()  # (the OS released the killed holder's lock)


def test_forked_data_workers_do_not_keep_the_lock(dataset, tmp_path):
    """The naive loader forks its persistent workers (in a process without DALI) while the
    lock is held; they live on after fit() and must not hold the lock."""
    script = f"""
import sys
from mmfast.config import load_config
from mmfast.data import naive
from mmfast.trainer import Trainer, resume
cfg = load_config("embedded", {[f"data.root={dataset}", f"out={tmp_path / 'naive'}", *COMMON, "epochs=1",
                                "data.backend=naive", "data.num_workers=1"]!r})
trainer = Trainer(cfg)
assert naive._worker_start_method() == "fork"
trainer.fit()
resume(cfg.out).close()
print("resumed")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and "resumed" in done.stdout, done.stderr[-3000:]


def test_a_fresh_run_refuses_a_directory_with_any_run_state(dataset, tmp_path):
    out = tmp_path / "run"
    killed = cli(*train_args(dataset, out, "checkpoint_every=1"), fault="train_step@2")
    assert killed.returncode == -9  # in epoch 0: a mid-epoch last.pt, no metrics line yet
    assert (out / "checkpoints" / "last.pt").exists() and not (out / "metrics.jsonl").exists()
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(config(dataset, out))
    trainer = resume(out)  # (the killed process's lock went with it)
    assert trainer.global_step == 1  # (killed after step 2, before its checkpoint)
    trainer.close()
    # killed before its first checkpoint: a resume starts from the beginning
    early = tmp_path / "early"
    assert cli(*train_args(dataset, early), fault="train_step@1").returncode == -9
    assert not (early / "checkpoints").exists()
    restarted = resume(early)
    assert restarted.global_step == 0
    assert restarted.fit()["epochs"] == 3


# ---- divergence ------------------------------------------------------------------------------

def test_divergence_is_caught_before_a_checkpoint_is_written(dataset, tmp_path):
    out = tmp_path / "diverged"
    trainer = Trainer(config(dataset, out, "optim.lr=1e6", "checkpoint_every=1", "method=joint"))
    with pytest.raises(NonFiniteError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert "training step" in message
    saved = sorted((out / "checkpoints").glob("*.pt"))
    assert saved  # (the first steps' updates were finite and saved)
    for path in saved:  # only finite state on disk
        state = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor)
                   and v.is_floating_point()), path
    kept = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["global_step"]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'last.pt'} ({kept} steps trained" in message
    # epoch-end checkpoints only: the same clear stop, never scikit-learn's "Input contains NaN"
    quiet = tmp_path / "quiet"
    with pytest.raises(NonFiniteError, match="no checkpoint was written"):
        Trainer(config(dataset, quiet, "optim.lr=1e6", "method=joint")).fit()
    assert not (quiet / "checkpoints").exists()


# ---- what a resume may change ------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(config(dataset, out, "epochs=2")).fit()
    return out


@pytest.mark.parametrize("change,needle", [
    ("data.batch_size=16", "'data.batch_size' changed since the checkpoint: 8 in"),
    ("seed=5", "'seed' changed since the checkpoint: 1 in"),
    ("method=joint", "'method' changed since the checkpoint: 'ogm_ge' in"),
    ("optim.lr=0.5", "'optim.lr' changed"),
    ("hparams.alpha=0.3", "'hparams.alpha' changed"),
    ("epochs=1", "has trained 2 epochs already"),
])
def test_a_resume_refuses_changes_that_change_the_training(finished, change, needle, tmp_path):
    with pytest.raises(RunDirError, match=needle.replace("(", r"\(")):
        resume(finished, [change])
    # the same change edited into config.yaml (a copy of the run)
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    key, value = change.split("=")
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    section = saved
    for part in key.split(".")[:-1]:
        section = section.setdefault(part, {})
    section[key.split(".")[-1]] = yaml.safe_load(value)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(RunDirError, match="changed since the checkpoint|trained 2 epochs"):
        resume(copy)


def test_a_resume_accepts_what_does_not_change_the_training(finished, dataset, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    trainer = resume(finished, ["epochs=3", "progress=false", "checkpoint_every=2", f"data.root={moved}",
                                f"data.cache={tmp_path / 'cache'}", "data.cache_max_gb=1"])
    assert trainer.cfg.epochs == 3 and trainer.cfg.data.root == str(moved)
    assert trainer.cfg.data.cache == str(tmp_path / "cache")  # (the same samples with or without a cache)
    trainer.close()
    other = generate(tmp_path / "other", clips=30, seed=7)  # other clips: refused
    with pytest.raises(RunDirError, match="differs from the one the checkpoint trained on"):
        resume(finished, [f"data.root={other}"])


def test_cosine_schedule_length_cannot_change_on_resume(dataset, tmp_path):
    out = tmp_path / "cos"
    Trainer(config(dataset, out, "epochs=1", "optim.scheduler=cosine")).fit()
    with pytest.raises(RunDirError, match="cosine"):
        resume(out, ["epochs=2"])


# ---- clear messages -----------------------------------------------------------------------------

def run_cli_expecting_message(*args, fault=None, needle):
    done = cli(*args, fault=fault)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith("mmfast ") and needle in done.stderr, done.stderr[-3000:]
    return done


def test_a_full_disk_gives_a_message_leaves_no_temporary_and_the_run_resumes(dataset, tmp_path):
    out = tmp_path / "full"
    run_cli_expecting_message(*train_args(dataset, out), fault="write:last.pt@2:enospc",
                              needle="cannot write " + str(out / "checkpoints" / "last.pt") + ": No space left")
    assert leftovers(out) == []
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1  # the old one, whole
    assert len(metrics_lines(out)) == 1
    done = cli("train", "--resume", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["epoch"] for row in metrics_lines(out)] == [0, 1, 2]


def test_ctrl_c_gives_a_message_and_the_run_resumes(dataset, tmp_path):
    out = tmp_path / "interrupted"
    done = cli(*train_args(dataset, out), fault="write:last.pt@2:interrupt")
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "interrupted" in done.stderr and "--resume" in done.stderr
    assert leftovers(out) == []
    assert cli("train", "--resume", str(out)).returncode == 0


def test_unwritable_out_and_bad_paths_give_messages(dataset, tmp_path):
    run_cli_expecting_message(*train_args(dataset, tmp_path / "ro"), fault="write:config.yaml:erofs",
                              needle="Read-only file system")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    run_cli_expecting_message(*train_args(afile, tmp_path / "r1"), needle="'data.root' must be a dataset folder")
    run_cli_expecting_message(*train_args(dataset, afile), needle="is a file")
    bad = tmp_path / "badyaml"
    bad.mkdir()
    (bad / "config.yaml").write_text("epochs: [1,\n")
    run_cli_expecting_message("train", "--resume", str(bad), needle="is not valid YAML at line")
    run_cli_expecting_message("eval", str(tmp_path / "nowhere"), needle="is not a run directory")


def test_bad_values_are_refused(dataset, tmp_path, finished):
    for value in (".nan", ".inf", "-.inf"):
        with pytest.raises(ValueError, match="'optim.lr' must be (a finite number|>= 0)"):
            config(dataset, tmp_path / "x", f"optim.lr={value}")
    assert config(dataset, tmp_path / "x", "optim.lr=1e6").optim.lr == 1e6  # (YAML 1.1 reads 1e6 as a string)
    reader = resume(finished, read_only=True)
    for bad in (2.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="drop probability of 'audio' must be in"):
            reader.evaluate("test", missing={"audio": bad})
    run_cli_expecting_message("eval", str(finished), "--missing", "audio=2", needle="must be in [0, 1]")
    with pytest.raises(ValueError, match="out= cannot change it"):
        resume(finished, [f"out={tmp_path / 'elsewhere'}"])
    empty_val = tmp_path / "emptyval"
    shutil.copytree(dataset, empty_val)
    (empty_val / "val.csv").write_text("")
    with pytest.raises(DataError, match="split 'val' is empty"):
        Trainer(config(empty_val, tmp_path / "ev"))


def test_a_checkpoint_from_before_histories_keeps_the_metrics_and_refuses_a_moved_dataset(dataset, tmp_path):
    """Version-1 checkpoints carry no metric history, dataset identity, wall time or precision:
    the history is read from metrics.jsonl (so a later repair does not cut it down), and a
    changed data.root is refused, since nothing tells whether it holds the same clips."""
    out = tmp_path / "old"
    Trainer(config(dataset, out, "epochs=1")).fit()
    for name in ("last.pt", "best.pt"):
        path = out / "checkpoints" / name
        state = torch.load(path, weights_only=False)
        for key in ("history", "dataset", "wall_time_s", "precision"):
            del state[key]
        state["version"] = 1
        torch.save(state, path)
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    with pytest.raises(RunDirError, match="cannot tell whether it holds the same clips"):
        resume(out, [f"data.root={moved}"])
    resume(out, ["epochs=2"]).fit()
    assert [row["epoch"] for row in metrics_lines(out)] == [0, 1]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert [row["epoch"] for row in state["history"]] == [0, 1]

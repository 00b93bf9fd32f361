"""The `mmfast` command line (mmfast/cli.py): train, resume and eval end to end, what is printed
on a terminal and off one, argument errors. (Run-directory faults: tests/test_run_dir.py.)"""
import json
import os
import subprocess
import sys

import pytest

from mmfast.cli import _parse_missing
from mmfast.data import generate

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("cli") / "cremad", clips=30, seed=2)


def test_command_line_train_resume_and_eval(dataset, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    common = [sys.executable, "-m", "mmfast"]
    args = ["train", "--config", "embedded", "method=ogm_ge", "epochs=1", "seed=1", f"out={out}", f"data.root={dataset}",
            "data.batch_size=8", "data.size=32", "data.num_workers=1", "progress=false"]
    done = subprocess.run(common + args, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["best_epoch"] == 0
    evaluated = subprocess.run(common + ["eval", str(out), "--missing", "audio=0.5"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["test/samples"] == 6
    bad = subprocess.run(common + ["train", "--config", "embedded", f"data.root={dataset}", "hparams.alpha=-1",
                                   "method=ogm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "config key 'hparams': ogm.alpha must be >= 0" in bad.stderr
    again = subprocess.run(common + ["train", "--resume", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]  # a finished run resumes to its end at once


def test_off_a_terminal_progress_is_one_line_per_epoch(dataset, tmp_path):
    """`make demo > log`: no progress-bar frames in the log, one line per epoch instead."""
    out = tmp_path / "log"
    done = subprocess.run([sys.executable, "-m", "mmfast", "train", "--config", "embedded", "epochs=2", f"out={out}",
                           f"data.root={dataset}", "data.batch_size=8", "data.size=32", "data.num_workers=1",
                           "progress=true"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "it/s" not in done.stderr  # (tqdm's frames)
    lines = [line for line in done.stderr.splitlines() if " epoch " in line]
    assert [line.split(" epoch ")[1].split(":")[0] for line in lines] == ["1/2", "2/2"], done.stderr[-3000:]
    assert all("train loss" in line and "val acc" in line for line in lines)


@pytest.mark.parametrize("text,needle", [("audio=2", "must be in [0, 1]"), ("audio=-1", "must be in [0, 1]"),
                                         ("audio=x", "expected modality=probability pairs"),
                                         ("audio=nan", "must be in [0, 1]")])
def test_missing_drop_probabilities_are_checked(text, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        _parse_missing(text)
    assert _parse_missing("audio=0.3,visual=1") == {"audio": 0.3, "visual": 1.0}


def test_argument_errors_name_the_problem(tmp_path):
    common = [sys.executable, "-m", "mmfast"]
    no_config = subprocess.run(common + ["train"], capture_output=True, text=True)
    assert no_config.returncode == 2 and "give --config" in no_config.stderr
    both = subprocess.run(common + ["train", "--config", "embedded", "--resume", str(tmp_path)], capture_output=True,
                          text=True)
    assert both.returncode == 2 and "give no --config" in both.stderr
    moved = subprocess.run(common + ["train", "--resume", str(tmp_path), f"out={tmp_path}/x"], capture_output=True,
                           text=True)
    assert moved.returncode == 2 and "Traceback" not in moved.stderr


def test_data_cache_builds_prunes_and_names_bad_input(dataset, tmp_path):
    from mmfast.cli import main

    cache = tmp_path / "cache"
    args = ["data", "cache", "--config", "embedded", "--no-progress", f"data.root={dataset}", f"data.cache={cache}",
            "data.size=32"]
    assert main(args) == 0
    n = len(list(cache.glob("??/*.npy")))
    assert n == 2 * 30  # two modalities of every clip of every split
    (cache / "ab").mkdir(exist_ok=True)
    (cache / "ab" / ("ab" + "0" * 38 + ".npy")).write_bytes(b"stale")
    assert main(args + ["--prune"]) == 0 and len(list(cache.glob("??/*.npy"))) == n
    common = [sys.executable, "-m", "mmfast", "data", "cache", "--config", "embedded", f"data.root={dataset}"]
    naive = subprocess.run(common + ["data.backend=naive", f"data.cache={cache}"], capture_output=True, text=True)
    assert naive.returncode == 2 and "naive loader decodes every epoch" in naive.stderr
    (tmp_path / "a_file").write_text("x")
    bad = subprocess.run(common + [f"data.cache={tmp_path / 'a_file'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot use" in bad.stderr and "Traceback" not in bad.stderr

"""The run directory: where one training run keeps what a user trusts (config.yaml,
checkpoints/{last,previous,best}.pt, metrics.jsonl, summary.json), and the rules that keep those
files true to the training that happened.

- **Self-locating.** A run is resumed and evaluated from the directory given, whatever path its
  config.yaml names: a moved or copied directory is its own run.
- **One writer.** A training holds an exclusive lock (``flock`` on ``.lock``) on its directory
  for its whole life. The OS drops the lock when the process dies, so a killed run never blocks
  its own resume. A fresh run refuses a directory that holds any run state.
- **last.pt is the commit point.** Every file is written atomically (temporary file, fsync,
  rename). At an epoch end the trainer writes last.pt (which records the epoch's metrics and the
  best epoch so far), then best.pt, then the metrics line. Whatever a crash cuts short after
  last.pt is rebuilt from it when the run resumes (``repair``): metrics.jsonl is rewritten from
  the checkpoint's metric history, and a best.pt that missed its epoch is copied from last.pt,
  which still holds that epoch's end. A crash before last.pt leaves the previous epoch end
  whole, and the resumed run redoes the epoch.
- **previous.pt** is the checkpoint last.pt replaced: a last.pt that cannot be read (a
  truncated copy, a damaged disk) falls back to it, and the run says so.

``fault_point`` marks the places where tests inject a crash (``MMFAST_FAULT``).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import socket
import sys
import time
import weakref
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # (not POSIX: no lock)
    fcntl = None

RUN_STATE = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")  # what makes a directory a run
LOCK = ".lock"
CHECKPOINTS = ("last.pt", "previous.pt")  # the order a resume tries them in


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names the directory or file."""


# ---- fault injection (tests) -------------------------------------------------------------------

def _parse_faults(text: str | None) -> dict:
    """`point[@n][:action],...` -> {point: [n, action]}; the action runs the n-th time (default 1)."""
    faults = {}
    for item in filter(None, (text or "").split(",")):
        where, _, action = item.rpartition(":")
        if action not in _FAULT_ACTIONS:  # (points have colons too: write:last.pt)
            where, action = item, ""
        point, _, count = where.partition("@")
        faults[point] = [int(count or 1), action or "kill"]
    return faults


_FAULT_ACTIONS = ("kill", "stall", "interrupt", "enospc", "erofs")
_faults = _parse_faults(os.environ.get("MMFAST_FAULT"))


def set_faults(text: str | None) -> None:
    """Arm fault points in this process, as MMFAST_FAULT does for a new one: `point[@n][:action]`
    joined by commas. Actions: kill (SIGKILL, the default), stall (sleep for an hour),
    interrupt (KeyboardInterrupt), enospc (a full disk), erofs (a read-only file system)."""
    global _faults
    _faults = _parse_faults(text)


def fault_point(name: str) -> None:
    """A named place where a test may crash the process: the epoch end's steps
    (epoch_end.before_last, epoch_end.between_last_and_best, epoch_end.before_metrics), inside a
    file's write (write:last.pt, write:best.pt, write:config.yaml, write:.lock, ...) and after
    each training step (train_step). Costs one dict lookup when nothing is armed."""
    if not _faults or name not in _faults:
        return
    armed = _faults[name]
    armed[0] -= 1
    if armed[0] > 0:
        return
    del _faults[name]
    action = armed[1]
    print(f"mmfast fault: {name} {action} at {time.time():.3f}", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stall":
        time.sleep(3600)
    elif action == "interrupt":
        raise KeyboardInterrupt
    elif action in ("enospc", "erofs"):
        code = errno.ENOSPC if action == "enospc" else errno.EROFS
        raise OSError(code, os.strerror(code))


# ---- writing ---------------------------------------------------------------------------------

@contextlib.contextmanager
def writing(path: Path):
    """OSErrors while writing `path` become a RunDirError naming it and the cause."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        raise RunDirError(f"cannot write {path}: {reason}") from err


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview, *, keep_previous: Path | None = None) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename: a crash leaves either
    the old file or the new one whole, never a mix; a failed write (a full disk, Ctrl-C)
    removes the temporary file and leaves the old one. keep_previous: the replaced file is
    kept there (hard-linked first, so `path` exists at every moment)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        link = None
        try:
            with open(tmp, "wb") as f:
                half = len(data) // 2
                f.write(data[:half])
                fault_point(f"write:{path.name}")  # (a crash here leaves a partial temporary file)
                f.write(data[half:])
                f.flush()
                os.fsync(f.fileno())
            if keep_previous is not None and path.exists():
                link = keep_previous.with_name(keep_previous.name + ".tmp")
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()
                try:
                    os.link(path, link)
                except OSError:  # (a file system without hard links)
                    shutil.copyfile(path, link)
                os.replace(link, keep_previous)
            os.replace(tmp, path)
        except BaseException:
            for leftover in (tmp, link):
                if leftover is not None:
                    with contextlib.suppress(OSError):
                        leftover.unlink()
            raise
        _fsync_dir(path.parent)


def atomic_save(obj, path: Path, *, keep_previous: Path | None = None) -> None:
    """torch.save(obj) to `path`, atomically (atomic_write)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer(), keep_previous=keep_previous)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def append_line(path: Path, line: str) -> None:
    """One line appended and fsynced (metrics.jsonl: a crash loses at most a partial last line,
    which repair rewrites from the checkpoint)."""
    with writing(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(line[:len(line) // 2])
            f.flush()
            fault_point(f"write:{path.name}")  # (a crash here leaves half a line)
            f.write(line[len(line) // 2:] + "\n")
            f.flush()
            os.fsync(f.fileno())


def remove_temporaries(out: Path) -> list[str]:
    """Delete the temporary files of writes a crash cut short; returns their names."""
    found = sorted(p for folder in (out, out / "checkpoints") if folder.is_dir() for p in folder.glob("*.tmp"))
    for p in found:
        with writing(p):
            p.unlink()
    return [str(p.relative_to(out)) for p in found]


def run_state(out: Path) -> list[str]:
    """The run files present in `out` (empty for a directory a fresh run may use)."""
    return [name for name in RUN_STATE if (Path(out) / name).exists()]


# ---- the lock --------------------------------------------------------------------------------

_held_locks = weakref.WeakSet()  # this process's held locks (closed in forked children)


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): drop the copies of the parent's lock files, so
    the lock ends with the parent, not with its longest-lived worker."""
    for lock in list(_held_locks):
        with contextlib.suppress(OSError):
            lock._file.close()
        lock._file = None
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """An exclusive, non-blocking flock on OUT/.lock, held until release() or the process's end
    (the OS releases it when the process dies: a killed run does not block its resume; forked
    children do not inherit it). The file names the holder (pid, host, start time) for the error
    a second writer gets."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None or fcntl is None:
            return
        with writing(self.path):
            fault_point(f"write:{LOCK}")
            f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(f"cannot lock {self.path}: {err.strerror}") from None
            if holder.startswith(f"pid {os.getpid()} on {socket.gethostname()},"):
                raise RunDirError(f"{self.path.parent} is held by a Trainer of this process that was not closed: call "
                                  f"its close() (fit() does at its end) or use `with Trainer(...)`") from None
            raise RunDirError(f"{self.path.parent} is in use by another run ({holder}); one run writes a run "
                              f"directory at a time: wait for it to end or choose another out=") from None
        with writing(self.path):
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
        self._file = f
        _held_locks.add(self)

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # (closing the descriptor drops the flock)
            self._file = None
        _held_locks.discard(self)


# ---- reading and repairing -------------------------------------------------------------------

def _load(path: Path, device) -> dict:
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or not {"model", "epoch", "global_step", "config"} <= set(state):
        raise ValueError("not an mmfast checkpoint")
    return state


def read_checkpoint(out: Path, device) -> tuple[Path | None, dict | None, list[str]]:
    """The checkpoint a resume continues from, read: (path, state, notes). last.pt, or
    previous.pt when last.pt cannot be read (a note says so); (None, None, []) when the run
    wrote no checkpoint yet; a RunDirError when checkpoints exist and none can be read."""
    folder = Path(out) / "checkpoints"
    unreadable = []
    for name in CHECKPOINTS:
        path = folder / name
        if not path.exists():
            continue
        try:
            state = _load(path, device)
        except Exception as err:  # (a truncated zip, a pickle error, another file altogether)
            unreadable.append((path, f"{type(err).__name__}: {err}"))
            continue
        notes = [f"{bad} cannot be read ({why}); continuing from {path} (epoch {state['epoch']}, step "
                 f"{state['global_step']}) instead" for bad, why in unreadable]
        return path, state, notes
    if unreadable:
        raise RunDirError(f"no checkpoint in {folder} can be read: "
                          + "; ".join(f"{p.name}: {why}" for p, why in unreadable))
    return None, None, []


def load_checkpoint(path: Path, device) -> dict:
    try:
        return _load(path, device)
    except Exception as err:
        raise RunDirError(f"{path} cannot be read ({type(err).__name__}: {err})") from None


def read_metrics(path: Path) -> list | None:
    """The lines of metrics.jsonl as dicts; None when a line is not JSON (a cut-short append)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            return None
    return rows


def best_record(path: Path) -> dict | str:
    """{"best": best.pt's best epoch record, "global_step": its step}, or why it cannot be read."""
    if not path.exists():
        return "missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return {"best": state["best"], "global_step": state["global_step"]}
    except Exception as err:
        return f"unreadable ({type(err).__name__})"


def best_epoch_of(path: Path):
    """The best epoch best.pt records, or a string saying why it cannot be read."""
    record = best_record(path)
    return record["best"]["epoch"] if isinstance(record, dict) else record


def _as_lines(rows: list) -> list[str]:
    return [json.dumps(row) for row in rows]  # (NaN == NaN and tuples == lists, as in the file)


def history_from_file(out: Path, epochs: int) -> list | None:
    """A checkpoint without a metric history (written before checkpoints carried one): the first
    `epochs` lines of metrics.jsonl, if they are epochs 0..epochs-1; else None (no repair)."""
    rows = read_metrics(Path(out) / "metrics.jsonl")
    if rows is None or len(rows) < epochs or [r.get("epoch") for r in rows[:epochs]] != list(range(epochs)):
        return None
    return rows[:epochs]


def repair(out: Path, state: dict, source: Path) -> tuple[list[str], dict | None]:
    """Make the run's derived files agree with the checkpoint `state` (read from `source`) it
    resumes from; returns (what was changed, a best record to adopt or None). metrics.jsonl
    must hold the checkpoint's history line for line. best.pt must hold the checkpoint's best
    epoch: copied from `source` when that checkpoint was written at the end of that very epoch
    (a crash between last.pt and best.pt). A best.pt written after `source` (a resume from
    previous.pt) holds a later best the run's lineage really reached: its record is adopted, so
    model selection goes on from it and the weights it names exist."""
    out = Path(out)
    done = [f"removed {name}, a write cut short" for name in remove_temporaries(out)]
    history = state.get("history")
    if history is not None:
        metrics = out / "metrics.jsonl"
        found = read_metrics(metrics)
        if found is None or _as_lines(found) != _as_lines(history):
            count = "an unreadable line" if found is None else f"{len(found)} lines"
            atomic_write_text(metrics, "".join(line + "\n" for line in _as_lines(history)))
            done.append(f"metrics.jsonl rewritten from {source.name}: {len(history)} epochs (it held {count})")
    best = state["best"]["epoch"]
    best_path = out / "checkpoints" / "best.pt"
    record = best_record(best_path)
    if isinstance(record, dict) and record["best"]["epoch"] == best:
        return done, None
    if best is not None and state["epoch"] == best + 1 and state["batch_in_epoch"] == 0:
        atomic_write(best_path, source.read_bytes())
        held = record["best"]["epoch"] if isinstance(record, dict) else record
        done.append(f"best.pt rewritten from {source.name} (it held epoch {held}; the best is epoch {best})")
        return done, None
    if isinstance(record, dict) and record["global_step"] > state["global_step"]:
        done.append(f"best.pt holds epoch {record['best']['epoch']}, reached after {source.name}: the run goes on "
                    f"selecting from it")
        return done, record["best"]
    if best is not None:
        raise RunDirError(f"{best_path} ({record if isinstance(record, str) else 'epoch ' + str(record['best']['epoch'])}) "
                          f"does not hold the best epoch {best} that {source} records, and no checkpoint holds its "
                          f"weights")
    return done, None


def set_aside(path: Path, why: str) -> Path:
    """Rename a file the run must no longer use (an unreadable last.pt, a stale summary) so that
    nothing overwrites it: PATH -> PATH's stem.WHY[.N]PATH's suffix."""
    target = path.with_name(f"{path.stem}.{why}{path.suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.{why}.{n}{path.suffix}")
    with writing(target):
        os.replace(path, target)
    return target


# ---- what a resume may change ------------------------------------------------------------------

# Keys a resume may change: they do not change what the run computes. out is the directory
# given; epochs may grow (not under the cosine schedule, whose length it is).
RESUMABLE = {
    "epochs": "more epochs", "out": "the run directory is the one given", "progress": "the progress bar",
    "checkpoint_every": "how often mid-epoch checkpoints are written", "data.num_workers": "decoding threads",
    "device": "where the run computes", "retain_freed_memory": "an allocator setting",
    "dist_timeout_s": "the collectives' timeout", "data.root": "where the dataset is (the same clip lists)",
    "recipes": "recipes applied at the start already",
    "model.weights": "read at start-up only (the checkpoint's weights replace them)",
    "data.cache": "where decoded clips are kept (the same samples with or without it)",
    "data.cache_max_gb": "the cache's disk budget",
}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value and key not in ("recipes",):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(saved: dict, current: dict, *, completed_epochs: int, where: Path) -> None:
    """Refuse a resume whose config changes what the run computes: every key outside RESUMABLE
    must equal the checkpoint's. (Keys a newer mmfast added are compared with their default.)"""
    from . import config as config_mod

    defaults = flatten(config_mod.Config().to_dict())
    old, new = flatten(saved), flatten(current)
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE or key.startswith("recipes."):
            continue
        before = old.get(key, defaults.get(key))
        after = new.get(key, defaults.get(key))
        if before != after and not (_is_nan(before) and _is_nan(after)):
            allowed = ", ".join(sorted(RESUMABLE))
            raise RunDirError(f"config key {key!r} changed since the checkpoint: {before!r} in {where}, {after!r} now; "
                              f"a resume continues the same training and may change only {allowed}. Start a new run "
                              f"(another out=) to train with {key}={after!r}")
    epochs = new.get("epochs", old.get("epochs"))
    if epochs < completed_epochs:
        raise RunDirError(f"config key 'epochs' is {epochs}, but the checkpoint {where} has trained "
                          f"{completed_epochs} epochs already (the last one in part, if it stopped mid-epoch)")
    if epochs != old.get("epochs") and new.get("optim.scheduler") == "cosine":
        raise RunDirError(f"config key 'epochs' changed ({old.get('epochs')} -> {epochs}) under optim.scheduler=cosine: "
                          f"the cosine schedule's length is epochs, so the run would not continue the same schedule")


def _is_nan(x) -> bool:
    return isinstance(x, float) and x != x



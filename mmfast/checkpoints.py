"""The run directory as a training run uses it: opening it for a fresh run, a resume or a read,
the checkpoint to continue from, the repairs a resume makes, the epoch end's writes in their
crash-safe order, the summary and the best weights. The trainer owns the training state (what
goes into a checkpoint); this object owns where and how it is written. The rules behind it are
in mmfast/run_dir.py and docs/reliability.md. In a distributed run only rank 0 touches the
files (``Distributed.on_main``); an error it meets is raised on every rank."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from . import config as config_mod
from . import run_dir as run_files
from .distributed import Distributed
from .run_dir import RunDirError, fault_point

CHECKPOINT_VERSION = 2  # 2: history, dataset identity, wall time, precision
MODES = ("fresh", "resume", "read")


class RunDirectory:
    """mode: "fresh" (refuses a directory holding a run), "resume" (continues the run in it,
    repairing what a crash cut short) or "read" (evaluation: no lock, no writes)."""

    def __init__(self, out: str | Path, mode: str, dist: Distributed, device):
        if mode not in MODES:
            raise ValueError(f"run directory mode must be one of {MODES}, got {mode!r}")
        self.out, self.mode, self.dist, self.device = Path(out), mode, dist, device
        self.lock = run_files.RunLock(self.out)
        self.resumed_from: Path | None = None  # the checkpoint the run continues from
        self.kept: tuple | None = None  # (path, epoch, step) of the newest checkpoint known good
        self._chosen_state = None
        self._writer = None

    # ---- opening -----------------------------------------------------------------------------

    def open(self, cfg: config_mod.Config) -> dict | None:
        """Lock and check the directory for the mode; returns the checkpoint state to continue
        from (None: a fresh start), its config checked against `cfg` (a resume may change only
        what does not change the training: run_dir.RESUMABLE)."""
        if self.mode == "fresh":
            self.dist.on_main(self._claim_fresh)
            return None
        path, notes = self.dist.on_main(lambda: self._choose_checkpoint(cfg))
        for note in notes:
            warnings.warn(note, stacklevel=3)
        self.resumed_from = path
        if path is None:
            return None
        state, self._chosen_state = self._chosen_state, None  # (one process: read once)
        if state is None:
            state = run_files.load_checkpoint(path, self.device)
        if state.get("version", 0) > CHECKPOINT_VERSION:
            raise RunDirError(f"{path} was written by a newer mmfast (checkpoint version {state['version']})")
        completed = state["epoch"] + (1 if state["batch_in_epoch"] else 0)
        run_files.check_resume_config(state["config"], cfg.to_dict(), completed_epochs=completed, where=path)
        if state.get("history") is None:  # (written before checkpoints carried it)
            state["history"] = run_files.history_from_file(self.out, state["epoch"])
        self.kept = (path, state["epoch"], state["global_step"])
        return state

    def _claim_fresh(self) -> None:
        with run_files.writing(self.out):
            if self.out.exists() and not self.out.is_dir():
                raise RunDirError(f"out={self.out} is a file, not a run directory")
            self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        present = run_files.run_state(self.out)
        if present:
            raise FileExistsError(f"{self.out} already holds a run ({', '.join(present)}); resume it with --resume "
                                  f"{self.out} or choose another out=")

    def _choose_checkpoint(self, cfg):
        """Rank 0: (the checkpoint to continue from, notes). A resume sets an unreadable last.pt
        aside, so that the next save does not rotate it over the good previous.pt."""
        self._chosen_state = None
        if not (self.out / "config.yaml").exists():
            raise FileNotFoundError(f"{self.out} holds no run (no config.yaml)")
        if self.mode == "resume":
            self.lock.acquire()
        path, state, notes = run_files.read_checkpoint(self.out, self.device)
        if path is None:
            if self.mode == "read":
                raise FileNotFoundError(f"{self.out} holds no checkpoint yet (the run was stopped before its first)")
            rows = run_files.read_metrics(self.out / "metrics.jsonl")
            if rows or (self.out / "summary.json").exists():
                raise RunDirError(f"{self.out} records finished epochs (metrics.jsonl, summary.json) but holds no "
                                  f"checkpoint: it cannot be resumed")
        last = self.out / "checkpoints" / "last.pt"
        if self.mode == "resume" and path is not None and path != last and last.exists():
            notes.append(f"{last} set aside as {run_files.set_aside(last, 'unreadable').name}")
        if not self.dist.enabled:
            self._chosen_state = state
        return path, notes

    def write_config(self, cfg: config_mod.Config) -> None:
        """A fresh run's config.yaml (written once the run could be built: a failed start leaves
        no run state)."""
        self.dist.on_main(lambda: config_mod.dump_config(cfg, self.out / "config.yaml"))

    @staticmethod
    def check_dataset(state: dict, identity: dict, cfg: config_mod.Config) -> None:
        """The dataset must be the one the checkpoint trained on (the same split lists): a
        changed data.root is accepted only where it points at the same clips."""
        saved = state.get("dataset")
        old_root, root = state["config"]["data"]["root"], cfg.data.root
        if saved is None:
            if old_root != root:
                raise RunDirError(f"data.root changed from {old_root!r} to {root!r}, and the checkpoint (written "
                                  f"before checkpoints recorded their dataset) cannot tell whether it holds the same "
                                  f"clips: resume with data.root={old_root}")
            return
        if saved["fingerprint"] == identity["fingerprint"]:
            return
        moved = f"data.root changed from {old_root!r} to {root!r}, and the dataset there" if old_root != root \
            else f"the dataset at data.root={root!r}"
        raise RunDirError(f"{moved} differs from the one the checkpoint trained on (clips per split "
                          f"{saved['clips']} then, {identity['clips']} now, or other clips or labels); a resume "
                          f"continues the same training: start a new run to train on this dataset")

    def repair(self, state: dict | None, cfg: config_mod.Config) -> dict | None:
        """At a resume (rank 0 writes): make metrics.jsonl and best.pt agree with the checkpoint
        and keep config.yaml the config the run continues with (out: this directory). Returns a
        best-epoch record to adopt (a best.pt written after the checkpoint), or None."""
        def on_main():
            adopted = None
            if state is None:
                changes = [f"removed {name}, a write cut short" for name in run_files.remove_temporaries(self.out)]
            else:
                changes, adopted = run_files.repair(self.out, state, self.resumed_from)
            for change in changes:
                warnings.warn(f"{self.out}: {change}", stacklevel=5)
            saved = config_mod.load_config(self.out / "config.yaml", apply_recipe=False).to_dict()
            if saved != cfg.to_dict():
                config_mod.dump_config(cfg, self.out / "config.yaml")
            return adopted

        return self.dist.on_main(on_main)

    def acquire(self) -> None:
        """The lock again (fit() after an earlier fit released it)."""
        self.dist.on_main(self.lock.acquire)

    def close(self) -> None:
        self.lock.release()

    # ---- writing -----------------------------------------------------------------------------

    def save(self, name: str, state_fn, *, epoch: int, step: int) -> None:
        """state_fn() atomically to checkpoints/NAME on rank 0 (last.pt keeps the one it replaces
        as previous.pt); the other ranks wait. A failed write names what is still kept."""
        path = self.out / "checkpoints" / name

        def write():
            previous = path.with_name("previous.pt") if name == "last.pt" else None
            try:
                run_files.atomic_save(state_fn(), path, keep_previous=previous)
            except RunDirError as err:
                raise RunDirError(f"{err}; {self.kept_checkpoint()}") from err.__cause__

        self.dist.on_main(write)  # (rank 0's error, a full disk, is raised on every rank)
        if name == "last.pt":
            self.kept = (path, epoch, step)

    def commit_epoch(self, save_last, save_best, metrics: dict, improved: bool) -> None:
        """The epoch end's writes, in the order that makes any crash repairable: last.pt (the
        commit: it records the epoch's metrics and the best epoch), best.pt, the metrics line."""
        fault_point("epoch_end.before_last")
        save_last()
        fault_point("epoch_end.between_last_and_best")
        if improved:
            save_best()
        fault_point("epoch_end.before_metrics")
        self.dist.on_main(lambda: self._log(metrics))

    def _log(self, metrics: dict) -> None:
        run_files.append_line(self.out / "metrics.jsonl", json.dumps(metrics))
        writer = self._tensorboard()
        if writer is not None:
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, metrics["epoch"])
            writer.flush()

    def _tensorboard(self):
        """A TensorBoard writer on the run directory when tensorboard is installed, else None."""
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer = False
            else:
                self._writer = SummaryWriter(str(self.out / "tensorboard"))
        return self._writer or None

    def write_summary(self, summary: dict) -> None:
        """summary.json (atomically) and the curves, on rank 0."""
        if self.dist.is_main:
            run_files.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            from .plots import plot_run

            plot_run(self.out)

    def set_stale_summary_aside(self) -> None:
        """A finished run trained further: its summary.json would describe weights best.pt no
        longer holds until the new end; it is kept as summary.after-K-epochs.json."""
        def on_main():
            path = self.out / "summary.json"
            if path.exists():
                try:
                    epochs = int(json.loads(path.read_text())["epochs"])
                except (ValueError, KeyError, TypeError, OSError):  # (written before summaries named it)
                    epochs = None
                run_files.set_aside(path, "stale" if epochs is None else f"after-{epochs}-epochs")

        self.dist.on_main(on_main)

    # ---- reading -----------------------------------------------------------------------------

    def best_weights(self, best_epoch: int | None, device) -> dict:
        """The model weights of the run's best epoch. best.pt must hold it; where an epoch end
        was cut short between last.pt and best.pt, the checkpoint read at start-up holds that
        epoch's end and its weights are used."""
        path = self.out / "checkpoints" / "best.pt"
        if best_epoch is None:
            raise RunDirError(f"{self.out}: no epoch has finished yet, so there is no best checkpoint")
        held = run_files.best_epoch_of(path)
        if held == best_epoch:
            return run_files.load_checkpoint(path, device)["model"]
        if self.resumed_from is not None:
            state = run_files.load_checkpoint(self.resumed_from, device)
            if state["best"]["epoch"] == best_epoch and state["epoch"] == best_epoch + 1 \
                    and state["batch_in_epoch"] == 0:
                return state["model"]
        raise RunDirError(f"{path} holds epoch {held}, but the run's best is epoch {best_epoch} and no "
                          f"checkpoint holds that epoch's weights")

    def kept_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, in words (for error messages)."""
        if self.kept is None or self.kept[0] is None:
            return "no checkpoint was written before it"
        path, epoch, step = self.kept
        return f"the last good checkpoint is {path} ({step} steps trained, epoch {epoch})"

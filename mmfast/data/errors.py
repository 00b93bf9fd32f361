"""Bad input in the data layer: one error type naming the file and the reason, and the skip
policy (``on_error="skip"``) that counts what it skipped and reports it at the end of an epoch."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A clip that cannot be read: ``path`` is the file (or clip), ``reason`` says why; ``clip``
    is the clip's id when known."""

    def __init__(self, path, reason: str, clip: str | None = None):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.clip = clip

    def __reduce__(self):  # crosses process boundaries (DataLoader workers) whole
        return DataError, (self.path, self.reason, self.clip)


def detached(err: DataError) -> DataError:
    """The same error without its traceback and context: a stored error whose traceback holds
    frames (and their f_back chain) would keep the loader that made it in a reference cycle."""
    return DataError(err.path, err.reason, err.clip)


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


@dataclass
class SkipReport:
    """What on_error="skip" left out: counts by reason, the first few errors in full and the
    name (clip id, else file) of every skipped sample."""

    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    names: list = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.counts[err.reason.split(":")[0]] += 1
        if len(self.examples) < 10:
            self.examples.append(str(err))
        self.names.append(err.clip or err.path)

    def copy(self) -> "SkipReport":
        return SkipReport(Counter(self.counts), list(self.examples), list(self.names))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        reasons = ", ".join(f"{n} {r}" for r, n in self.counts.most_common())
        return f"skipped {self.total} samples ({reasons}); e.g. " + "; ".join(self.examples[:3])

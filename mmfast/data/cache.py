"""The decoded-sample cache: the deterministic part of each clip's decoding, written once and
read back every epoch after (the DALI loader's side is in dali_loader.py; docs/data.md says
what is cached per recipe and how large it is).

An entry is one modality of one clip: a standard ``.npy`` file (NumPy's format: a short header
and the raw array, so a reader maps or reads it without parsing; ``np.load`` and DALI's
``fn.readers.numpy`` read it as it is) followed by a 16-byte end record (magic, CRC-32 of the
bytes before it, their length), which those readers ignore. Entries are named by a hash of their
key:

    key = (format version, what the entry holds and the recipe fields it depends on, the DALI
           version and decoder that made it, and each source file's absolute path, size,
           modification and change times in ns)

so a changed file, recipe or decoder is decoded again under a new name; stale entries stay until
``mmfast data cache --prune`` (or a deletion of the folder) removes them.

Integrity: an entry is written to a temporary name and renamed into place, so a killed build or a
full disk leaves either no entry or a temporary file, never a partial entry under its name. The
first read of an entry in a process checks its end record (length and CRC-32 of the whole
file); later reads check the length. A truncated or damaged entry is removed and decoded again,
never read as data. No fsync: the checksum, not durability, keeps a power loss from serving
damaged data.

Writers take an exclusive lock (``flock`` on ``DIR/.lock``) for the budget's bookkeeping
(``DIR/.usage``: the bytes the entries hold), so several runs (or the ranks of a distributed
run) can build one cache at once; readers take no lock. Beyond the budget (``data.cache_max_gb``)
nothing more is written and the remaining clips are decoded every epoch as without a cache.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("mmfast.data")

FORMAT = 1
CACHE_SETTINGS = ("off", "auto")  # or a folder
ENV_DIR = "MMFAST_CACHE_DIR"
_TMP_MAX_AGE_S = 3600
# An entry is a standard .npy file followed by an end record: magic, CRC-32 of everything before
# it, and that length (readers of the format, np.load and DALI, read the array and ignore it).
_MAGIC = b"MMFC"
_TRAILER = struct.Struct("<4sIQ")  # a temporary file older than this is a killed build's and is removed


def default_cache_dir() -> Path:
    """Where ``data.cache=auto`` keeps entries: $MMFAST_CACHE_DIR, else $XDG_CACHE_HOME/mmfast/decoded,
    else ~/.cache/mmfast/decoded (XDG's user cache folder: local to the machine, so each node
    of a multi-node run keeps its own)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "mmfast" / "decoded"


def resolve_cache_dir(setting: str) -> Path | None:
    """None for "off"; the folder for "auto" or a folder."""
    if not isinstance(setting, str) or not setting:
        raise ValueError(f"data.cache must be 'off', 'auto' or a folder, got {setting!r}")
    if setting == "off":
        return None
    return default_cache_dir() if setting == "auto" else Path(setting).expanduser()


def source_signature(paths) -> list:
    """[(absolute path, size, modification and change times in ns)] of the files an entry is
    decoded from; None when one cannot be read (the decoder, not the cache, then says what is
    wrong with it). The change time is the kernel's (a copy that keeps the modification time,
    as `cp -p` or `rsync -a` do, still gets a new one)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return None
        out.append((os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return out


def entry_key(contents: dict, sources: list) -> str:
    """The entry's name: a hash of what it holds (`contents`: JSON-able) and its sources."""
    text = json.dumps({"format": FORMAT, "contents": contents, "sources": sources}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _npy_header(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
    return buf.getvalue()


class CacheStore:
    """One cache folder. ``read(key)`` returns an entry's array or None (absent, or found damaged
    and removed); ``write_many([(key, array)])`` adds entries until the budget is spent."""

    def __init__(self, root: Path, max_gb: float):
        self.root = Path(root)
        if not (max_gb >= 0):
            raise ValueError(f"data.cache_max_gb must be >= 0, got {max_gb!r}")
        self.max_bytes = int(max_gb * 1e9)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"data.cache: cannot use {self.root} as a cache folder: {exc.strerror or exc} "
                             f"(data.cache=off reads without a cache; data.cache=DIR names another folder)") from None
        if not (self.root / ".usage").exists():
            with self._locked():
                self._write_usage(self._scan())
        self._verified: dict = {}  # key -> (file size, data offset, shape, dtype), checked in full here
        self.full = False  # the budget was reached: no more writes in this process
        self._dirs: set = set()  # entry folders known to exist
        self.written = self.reads = self.damaged = 0

    # -- layout -----------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    # -- reading ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether the entry is there (not checked: read() checks)."""
        return self.path(key).exists()

    def read(self, key: str, rows=None, out: np.ndarray | None = None) -> np.ndarray | None:
        """The entry's array (`rows`: only these indices of its first axis; `out`: read into
        this array, of the entry's shape and type), or None (absent, or damaged: then it is
        removed)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            info = self._verified.get(key)
            if info is None or info[0] != size:  # first read here, or written again meanwhile
                array = self._read_verified(key, fd, size, rows)
                if out is None:
                    return array
                _check_out(out, array.shape, array.dtype)
                np.copyto(out, array)
                return out
            _, offset, shape, dtype = info
            self.reads += 1
            if rows is None:
                if out is None:
                    out = np.empty(shape, dtype)
                _check_out(out, shape, dtype)
                _pread_into(fd, out, offset)
                return out
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            out = np.empty((len(rows),) + tuple(shape[1:]), dtype)
            for k, r in enumerate(rows):
                if not 0 <= r < shape[0]:
                    raise ValueError(f"row {r} of an entry of {shape[0]}")
                _pread_into(fd, out[k], offset + int(r) * row_bytes)
            return out
        except (OSError, ValueError) as exc:
            self._discard(key, str(exc))
            return None
        finally:
            os.close(fd)

    def _read_verified(self, key, fd, size, rows):
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            n = os.preadv(fd, [view[got:]], got)
            if n <= 0:
                break
            got += n
        if got != size or size < _TRAILER.size or bytes(data[-_TRAILER.size:-12]) != _MAGIC:
            raise ValueError(f"{got} bytes and no end record (truncated)")
        crc, length = struct.unpack("<IQ", bytes(data[-12:]))
        if length != size - _TRAILER.size:
            raise ValueError(f"{size - _TRAILER.size} bytes where {length} were written (truncated)")
        if zlib.crc32(view[:length]) != crc:
            raise ValueError("CRC-32 mismatch (damaged)")
        import io

        head = io.BytesIO(bytes(view[:min(length, 4096)]))
        shape, dtype = _read_header(head)
        offset = head.tell()
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dtype.itemsize != length:
            raise ValueError(f"the header's shape {shape} does not fill the entry (damaged)")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        if rows is not None and not all(0 <= r < shape[0] for r in rows):
            raise ValueError(f"rows {list(rows)} of an entry of {shape[0]}")
        self._verified[key] = (size, offset, shape, dtype)
        self.reads += 1
        return array if rows is None else array[list(rows)]

    def _discard(self, key: str, why: str) -> None:
        path = self.path(key)
        log.warning("decoded-sample cache: entry %s is unreadable (%s); it is removed and decoded again", path, why)
        self.damaged += 1
        self._verified.pop(key, None)
        try:
            with self._locked():
                try:
                    freed = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    freed = 0
                self._write_usage(max(0, self._usage() - freed))
        except OSError as exc:  # (a read-only or full disk: the entry stays unread in this process)
            self._stop_writing(exc)

    # -- writing ----------------------------------------------------------------------------
    def write_many(self, items: list) -> list:
        """Adds the entries [(key, array)] (True each), or leaves out those beyond the budget
        (False). An entry another process wrote meanwhile is kept as it is. The files are written
        under temporary names first; the lock is held only to check the budget and rename them.
        A write that fails (a full disk, a quota) ends this process's writes, never the run."""
        if self.full or not items:
            return [False] * len(items)
        staged = []  # (key, path, temporary file, bytes, header length, shape, dtype)
        try:
            for key, array in items:
                path = self.path(key)
                if path.exists():
                    staged.append((key, path, None, 0, 0, None, None))
                    continue
                array = np.ascontiguousarray(array)
                header = _npy_header(array)
                body = memoryview(array).cast("B")
                length = len(header) + body.nbytes
                trailer = _MAGIC + struct.pack("<IQ", zlib.crc32(body, zlib.crc32(header)), length)
                if path.parent not in self._dirs:
                    path.parent.mkdir(exist_ok=True)
                    self._dirs.add(path.parent)
                tmp = _write_temporary(path, header, body, trailer)
                staged.append((key, path, tmp, length + len(trailer), len(header), array.shape, array.dtype))
            done = self._commit(staged)
        except OSError as exc:
            self._stop_writing(exc)
            done = [False] * len(items)
        finally:
            for item in staged:
                if item[2] is not None:
                    item[2].unlink(missing_ok=True)  # (committed ones were renamed away)
        return done

    def _commit(self, staged: list) -> list:
        done = []
        with self._locked():
            usage = start = self._usage()
            for key, path, tmp, size, header, shape, dtype in staged:
                if tmp is None or path.exists():  # (another process wrote it meanwhile)
                    done.append(True)
                    continue
                if self.full or usage + size > self.max_bytes:
                    if not self.full:
                        log.info("decoded-sample cache %s: the budget of %.3g GB is reached; the clips not cached "
                                 "are decoded every epoch", self.root, self.max_bytes / 1e9)
                    self.full = True
                    done.append(False)
                    continue
                os.replace(tmp, path)
                usage += size
                self._verified[key] = (size, header, shape, dtype)
                self.written += 1
                done.append(True)
            if usage != start:
                self._write_usage(usage)
        return done

    def _stop_writing(self, exc: OSError) -> None:
        self.full = True
        log.warning("decoded-sample cache %s: cannot write (%s); the clips not cached are decoded every epoch",
                    self.root, exc.strerror or exc)

    # -- bookkeeping ------------------------------------------------------------------------
    def _locked(self):
        return _FileLock(self.root / ".lock")

    def _usage(self) -> int:
        try:
            return int((self.root / ".usage").read_text())
        except (OSError, ValueError):
            return self._scan()

    def _write_usage(self, value: int) -> None:
        _write_atomic(self.root / ".usage", str(int(value)).encode())

    def _scan(self) -> int:
        """Bytes the committed entries hold (and removal of killed builds' temporary files)."""
        total, now = 0, time.time()
        for folder in self.root.iterdir() if self.root.exists() else ():
            if not folder.is_dir() or len(folder.name) != 2:
                continue
            for path in folder.iterdir():
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if ".tmp-" in path.name:
                    if now - st.st_mtime > _TMP_MAX_AGE_S:
                        path.unlink(missing_ok=True)
                    continue
                total += st.st_size
        return total

    def usage(self) -> dict:
        """{'entries', 'bytes'} of the committed entries (a scan)."""
        entries = sum(1 for _ in self.root.glob("??/*.npy"))
        with self._locked():
            total = self._scan()
            self._write_usage(total)
        return {"entries": entries, "bytes": total}

    def prune(self, keep: set) -> int:
        """Removes every entry whose key is not in `keep`; returns how many."""
        removed = 0
        with self._locked():
            for path in self.root.glob("??/*.npy"):
                if path.stem not in keep:
                    path.unlink(missing_ok=True)
                    self._verified.pop(path.stem, None)
                    removed += 1
            self._write_usage(self._scan())
        return removed


def _read_header(f) -> tuple:
    """(shape, dtype) of the .npy file open at its start; leaves it at the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("a Fortran-ordered array (not written by mmfast)")
    return shape, dtype


def _check_out(out: np.ndarray, shape, dtype) -> None:
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"an entry of {tuple(shape)} {dtype} where {out.shape} {out.dtype} was expected")


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    if os.preadv(fd, [view], offset) != view.nbytes:
        raise ValueError("short read (truncated)")


def _temporary_name(path: Path) -> Path:
    # (host and pid: writers on several machines may share a network folder)
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")


def _write_temporary(path: Path, *parts) -> Path:
    tmp = _temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_atomic(path: Path, *parts) -> None:
    tmp = _write_temporary(path, *parts)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _FileLock:
    """An exclusive flock held for a `with` block (blocking: writers hold it to check the
    budget and rename, not while they write)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a+b")
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
                return self
            except OSError as exc:  # (EINTR: a signal arrived while waiting)
                if exc.errno != errno.EINTR:
                    self.file.close()
                    raise

    def __exit__(self, *exc):
        self.file.close()
        return False

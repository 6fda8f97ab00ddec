"""Writing outputs so that a failure leaves nothing half-written behind, and checking what was written.

Folders are written under a temporary name next to their final place and renamed when complete. While a
process writes one, it holds an exclusive ``flock`` on the temporary folder; the lock dies with the process (even
on ``kill -9``), so a later writer recognises the leftovers of a killed one (an unlocked temporary folder) and
removes them.
The same kind of lock on an output folder itself keeps a second process from writing into it (:class:`WriterLock`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: there, leftovers are not recognised and stay
    fcntl = None


def lock_folder(folder: Path) -> int | None:
    """Hold an exclusive lock on ``folder`` (released by :func:`unlock_folder` or when the process dies)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def unlock_folder(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


WRITER_FILE = ".writer.pid"  # inside a folder held by a WriterLock: the holder's pid and host, for messages


class FolderInUseError(FileExistsError):
    """Another live process holds the folder's writer lock; the message names the folder and that process."""


class WriterLock:
    """One writer per output folder (``train``, ``study --frontier``): an exclusive ``flock`` on the folder itself.

    The lock dies with its process (even on ``kill -9``), so a folder left by a dead writer is free again; the
    writer's pid (and host) sits in ``folder/.writer.pid`` while it holds the lock, to name it to a refused
    second writer, and is removed on release. A pid file found when taking a free lock is a dead writer's
    (:attr:`stale_writer`). Taking the lock writes nothing but that file; a folder that does not exist yet is locked by
    a later :meth:`acquire` once it is created (``missing_ok``).
    """

    def __init__(self, folder: str | Path, command: str):
        self.folder, self.command = Path(folder), command
        self.fd: int | None = None
        self.stale_writer: str | None = None  # a dead writer whose pid file was left behind (see _holder)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, missing_ok: bool = False) -> WriterLock:
        """Take the lock (non-blocking): :class:`FolderInUseError` if a live process holds it."""
        if self.fd is not None or fcntl is None:
            return self
        if missing_ok and not self.folder.is_dir():
            return self
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._holder()
            raise FolderInUseError(
                f"{self.folder} is in use: another process ({holder}) is writing to it; one writer per folder: "
                f"wait for it to end (or stop it), or choose another output folder"
            ) from None
        self.fd = fd
        self.stale_writer = self._holder(recorded_only=True)
        write_text_atomic(self.folder / WRITER_FILE, f"{os.getpid()} {socket.gethostname()} {self.command}\n")
        return self

    def _holder(self, recorded_only: bool = False) -> str | None:
        """The recorded writer: ``pid N`` (``on host H`` when another host wrote it) and its command."""
        try:
            pid, host, command = (self.folder / WRITER_FILE).read_text().split(maxsplit=2)
        except (OSError, ValueError, UnicodeDecodeError):
            return None if recorded_only else "pid unknown"
        where = "" if host == socket.gethostname() else f" on {host}"
        return f"pid {pid}{where}, {command.strip()}"

    def release(self) -> None:
        if self.fd is not None:
            (self.folder / WRITER_FILE).unlink(missing_ok=True)  # before the unlock: never a next writer's file
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale(parent: Path, pattern: str) -> list[Path]:
    """Remove the temporary folders ``parent/pattern`` that no live process holds (a killed writer's leftovers)."""
    removed = []
    if fcntl is None or not Path(parent).is_dir():
        return removed
    for folder in Path(parent).glob(pattern):
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer holds it
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


@contextmanager
def atomic_folder(final: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to ``final``; on success it is renamed to ``final``, on error removed.

    ``final`` must not exist unless ``overwrite`` (then the old folder is replaced only once the new one is
    complete); a file of that name is never replaced. Leftover temporary folders of killed writers of ``final``
    are removed first.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} is a file, not a folder; choose another output path")
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another output folder or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, f".{final.name}.tmp-*")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the finished folder private
    lock = lock_folder(tmp)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        unlock_folder(lock)


class OutputWriteError(OSError):
    """Writing an output failed (a full disk, above all); the message names the file and what to do next."""


# How a full disk shows in errors that carry no errno: safetensors' SafetensorError quotes Rust's io::Error.
_NO_SPACE = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded", "os error 28")
# ... and how other failed writes do (safetensors' IoError, torch.save's RuntimeError from its zip writer).
_WRITE_FAILED = ("IoError", "I/O error", "os error", "file write failed")


def write_failure(err: BaseException) -> str | None:
    """``err`` described as a failed write (``no space left on device`` first), or None if it is not one."""
    first = (str(err).strip().splitlines() or [""])[0]
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        s in str(err) for s in _NO_SPACE
    ):
        return f"no space left on device ({type(err).__name__}: {first})"
    if (isinstance(err, OSError) and not isinstance(err, OutputWriteError)) or any(
        s in str(err) for s in _WRITE_FAILED
    ):
        return f"{type(err).__name__}: {first}"
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file by renaming a complete temporary file into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_text(path: Path, label: str = "") -> str:
    """``path``'s UTF-8 text; a file that cannot be read or is not UTF-8 fails in one line naming it (after
    ``label``, e.g. the flag that named the file)."""
    name = f"{label} {path}" if label else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ValueError(f"{name} cannot be read ({err.strerror or err})") from None


def read_json(path: str | Path, lines: bool = False):
    """The JSON object in ``path`` (``lines``: the list of objects of a JSON Lines file); a file that cannot be read,
    is not UTF-8, is cut short or holds something other than objects fails in one line naming it."""
    path = Path(path)
    text = read_text(path)
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()] if lines else [(0, text)]
    values = []
    for number, chunk in numbered:
        where = f"{path} line {number}" if lines else str(path)
        try:
            value = json.loads(chunk)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON, damaged or cut short ({err})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__} {str(value)[:40]}")
        values.append(value)
    return values if lines else values[0]


# What reading a field that JSON data lacks, or holds as another type, raises.
_LAYOUT_ERRORS = (KeyError, TypeError, AttributeError, IndexError, StopIteration, ValueError)


def from_json(files, make, *args):
    """``make(*args)`` on data read from the JSON ``files``: a missing field or a value of the wrong type fails in
    one line naming the files, not as a bare KeyError or TypeError from deep inside ``make``."""
    try:
        return make(*args)
    except _LAYOUT_ERRORS as err:
        names = ", ".join(str(f) for f in files)
        raise ValueError(
            f"{names}: not the layout expected, a field is missing or of the wrong type ({type(err).__name__}: "
            f"{err}); regenerate {'it' if len(files) == 1 else 'them'} with the command that wrote "
            f"{'it' if len(files) == 1 else 'them'}"
        ) from err


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path, digest=None):
    """Feed every file under ``folder`` (sorted relative names and contents; hidden entries skipped) to ``digest``."""
    digest = digest if digest is not None else hashlib.sha256()
    folder = Path(folder)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(file)}\0".encode())
    return digest


CHECKSUMS = "checksums.json"


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file in ``folder`` in ``folder/checksums.json``."""
    folder = Path(folder)
    sums = {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def verify_checksums(folder: Path, what_to_do: str) -> None:
    """Check every file listed in ``folder/checksums.json``; the error names the file and ``what_to_do``."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise ValueError(
            f"{folder} has no {CHECKSUMS}: it is incomplete or was written by an older fdiv_kernels, "
            f"so it cannot be checked; {what_to_do}"
        )
    try:
        sums = json.loads(listing.read_text())
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise ValueError("not a mapping of file names to sha256 digests")
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{listing} is damaged ({err}); {what_to_do}") from None
    for name, expected in sums.items():
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{listing} lists {name!r}, which is outside the checkpoint; {what_to_do}")
        if not file.is_file():
            raise ValueError(f"{file} is missing (the checkpoint's {CHECKSUMS} lists it); {what_to_do}")
        if file_sha256(file) != expected:
            raise ValueError(
                f"{file} is damaged: its sha256 differs from the one recorded when the checkpoint was "
                f"written; {what_to_do}"
            )

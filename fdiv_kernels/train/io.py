"""Writing outputs so that a failure leaves nothing half-written behind, and checking what was written.

Folders are written under a temporary name next to their final place and renamed when complete. While a
process writes one, it holds an exclusive ``flock`` on the temporary folder; the lock dies with the process (even
on ``kill -9``), so a later writer recognises the leftovers of a killed one (an unlocked temporary folder) and
removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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

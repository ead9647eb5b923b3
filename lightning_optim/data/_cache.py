"""Cache helpers: the cache root, an inter-process file lock, atomically published directories and files,
content checksums, and the error and warning that name a damaged cache file.

Checksums are SHA-256 (``hashlib``), read in 8 MiB chunks: on CPUs with the SHA extensions (AMD Zen, Intel
since Ice Lake) OpenSSL's SHA-256 is faster than BLAKE2b, and it is in every Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["default_cache_dir", "file_lock", "atomic_dir", "atomic_write_text", "file_sha256",
           "refuse_unwritable", "CacheError", "CacheWarning", "CHUNK_BYTES"]

CHUNK_BYTES = 8 << 20


class CacheError(ValueError):
    """A cache file that is missing, unreadable, or does not match what was recorded when it was written."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path}: {reason}")


class CacheWarning(UserWarning):
    """A damaged or outdated cache entry was found and is being rebuilt or upgraded."""


def default_cache_dir() -> Path:
    """``$LIGHTNING_OPTIM_CACHE``, else ``$XDG_CACHE_HOME/lightning_optim``, else ``~/.cache/lightning_optim``."""
    env = os.environ.get("LIGHTNING_OPTIM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_optim"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """A ``flock`` on ``path`` (processes on one machine, e.g. the ranks of a DDP run).

    Exclusive by default (the writer); ``shared=True`` for readers, who may hold it together but never while a
    writer does. A reader of a cache it cannot write (a read-only copy) locks the existing lock file opened
    read-only, or reads unlocked when there is none (then it cannot exclude a writer who has write access).
    """
    import fcntl

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    except OSError:
        if not shared:
            raise
        try:
            fh = open(path)
        except OSError:
            yield
            return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory beside ``target``; it replaces ``target`` only when the block succeeds.

    An existing ``target`` is renamed aside before the new one is renamed in and deleted afterwards, so it is
    absent only between two renames (never while a large directory is being deleted), and a failed block
    leaves it untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)
        os.replace(target, Path(old) / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_unwritable(fault: CacheError, directory: Path) -> None:
    """Raise ``fault`` with the reason it cannot be repaired if ``directory`` (holding the entry) is read-only."""
    if directory.exists() and not os.access(directory, os.W_OK):
        raise CacheError(fault.path, f"{fault.reason}; it cannot be rebuilt because {directory} is not writable")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path`` (readers see old or new)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike, on_chunk: Callable[[memoryview], None] | None = None) -> tuple[int, str]:
    """``(size in bytes, SHA-256 hex digest)`` of the file at ``path``, read in chunks of ``CHUNK_BYTES``.

    ``on_chunk`` sees every chunk (a multiple of 8 bytes except possibly the last), e.g. to check its values
    in the same pass.
    """
    h = hashlib.sha256()
    size = 0
    buf = memoryview(bytearray(CHUNK_BYTES))
    with open(path, "rb") as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            chunk = buf[:n]
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
            size += n
    return size, h.hexdigest()

"""Checkpoint files that fail loudly and never half-overwrite: :func:`atomic_save` and :func:`load_checkpoint`.

Usage::

    from lightning_optim.checkpoint import atomic_save, load_checkpoint

    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "run/last.pt")
    state = load_checkpoint("run/last.pt")          # weights_only=True, CRC-verified, on CPU

:func:`atomic_save` writes to a temporary file in the destination's folder, flushes and ``fsync``\\ s it, then
``os.replace``\\ s it over the destination (atomic on POSIX and Windows) and syncs the folder. If anything fails
— an object that cannot be pickled, a full disk, an interrupt — the temporary file is removed and the file
that was there before is left exactly as it was.

:func:`load_checkpoint` only reads. A missing, empty, truncated or corrupt file raises
:class:`CheckpointError` (a ``RuntimeError``; :class:`CheckpointNotFoundError` is also a
``FileNotFoundError``) whose message names the file and says what is wrong with it. ``torch.save`` files are
zip archives that record a CRC-32 per record; ``torch.load`` does not check them, so a flipped bit inside a
tensor would load silently. ``verify=True`` (the default) checks every record's CRC first (one extra read
of the file).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "CheckpointNotFoundError", "atomic_save", "load_checkpoint", "verify_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; ``path`` is the file, the message says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"checkpoint file {self.path!r} {reason}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete ``torch.save`` file whose records match their CRC.

    Files in torch's legacy (pre-1.6, non-zip) format cannot be verified this way and pass unchecked.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise CheckpointNotFoundError(p, "does not exist")
    if p.is_dir():
        raise CheckpointError(
            p, "is a directory (a sharded torch.distributed.checkpoint folder? load it with "
            "torch.distributed.checkpoint or the Trainer's strategy)"
        )
    size = _size(p)
    if size == 0:
        raise CheckpointError(p, "is empty (0 bytes): the write that produced it was interrupted")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        if head[:2] == b"\x80\x02" or head[:1] == b"\x80":  # legacy pickle-based torch.save format
            return
        raise CheckpointError(p, f"is not a torch checkpoint ({size} bytes, starts with {head!r}): corrupt or truncated")
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise CheckpointError(p, f"is truncated or corrupt ({size} bytes; the zip directory is unreadable: {err})") from err
    except (OSError, EOFError, ValueError) as err:
        raise CheckpointError(p, f"is truncated or corrupt ({size} bytes: {err})") from err
    if bad is not None:
        raise CheckpointError(p, f"is corrupt: record {bad!r} does not match its CRC-32 ({size} bytes)")


def load_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    weights_only: bool = True,
    verify: bool = True,
    **torch_load_kwargs: Any,
) -> Any:
    """``torch.load`` that never writes and names the file in every error (see the module docstring)."""
    p = Path(os.fspath(path))
    if verify:
        verify_checkpoint(p)
    elif not p.exists():
        raise CheckpointNotFoundError(p, "does not exist")
    try:
        return torch.load(p, map_location=map_location, weights_only=weights_only, **torch_load_kwargs)
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(p, "does not exist") from err
    except pickle.UnpicklingError as err:
        if weights_only and "weights_only" in str(err):
            raise CheckpointError(
                p, f"holds objects that weights_only=True refuses to load (pass weights_only=False only for files "
                f"you trust): {str(err).splitlines()[0]}"
            ) from err
        raise CheckpointError(p, f"is corrupt ({_size(p)} bytes; unpickling failed: {err})") from err
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            p, f"is truncated or corrupt ({_size(p)} bytes; torch.load failed: {type(err).__name__}: {err})"
        ) from err


def atomic_save(obj: Any, path: str | os.PathLike, **torch_save_kwargs: Any) -> Path:
    """``torch.save(obj, path)`` that either writes the whole file or leaves ``path`` untouched.

    Writes ``.<name>.<random>.tmp`` beside ``path``, fsyncs it, ``os.replace``\\ s it over ``path`` and fsyncs
    the folder. The parent folder is created if needed. Returns the path written.
    """
    p = Path(os.fspath(path))
    if p.is_dir():
        raise IsADirectoryError(f"cannot save a checkpoint to {os.fspath(p)!r}: it is a directory")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f, **torch_save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        if p.exists():  # keep the existing file's permissions
            try:
                os.chmod(tmp, p.stat().st_mode & 0o7777)
            except OSError:
                pass
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(p.parent)
    return p


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Checkpoint files that fail loudly and never half-overwrite: :func:`atomic_save` and :func:`load_checkpoint`.

Usage::

    from lightning_optim.checkpoint import atomic_save, load_checkpoint

    atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "run/last.pt", checksum=True)
    state = load_checkpoint("run/last.pt")          # weights_only=True, verified, on CPU

**Writing.** :func:`atomic_save` writes to a temporary file ``.<name>.<host>-<pid>.<random>.tmp`` in the
destination's own folder (never the system temp directory, so the final step is a rename, not a copy
across filesystems), flushes and ``fsync``\\ s it, then ``os.replace``\\ s it over the destination (atomic on
POSIX and Windows) and syncs the folder. If anything fails — an object that cannot be pickled, a full disk,
an interrupt — the temporary file is removed and the file that was there before is left exactly as it was.
A process killed outright (SIGKILL, power loss) cannot clean up: its temporary file stays behind, is never
mistaken for a checkpoint (it does not end in the destination's suffix), and is deleted by the next
:func:`atomic_save` into that folder once its process is gone (:func:`remove_stale_temp_files`).

**Checksums.** ``checksum=True`` also writes ``<name>.sha256``, the SHA-256 of the whole file in
``sha256sum`` format (``sha256sum -c last.ckpt.sha256`` checks it by hand). The digest is computed from the
bytes as they are written, the sidecar is written to its own temporary file first, and the order is: remove
the old sidecar, replace the checkpoint, put the new sidecar in place. So a crash at any point leaves either
a matching pair or a complete checkpoint without a sidecar — never a good file with a stale digest.

**Verifying.** :func:`verify_checkpoint` checks, in order of strength:

- a sidecar, when there is one: the SHA-256 of every byte of the file. This catches what CRC-32 cannot: a
  flipped bit in the zip directory or local headers (which can go unnoticed or be misread), a file replaced
  by a different one, and it is independent of how torch lays out its archive;
- otherwise the CRC-32 that ``torch.save``'s zip archive records for each record (``torch.load`` itself
  does not check them, so a flipped bit inside a tensor would load silently). Enough to catch a flipped
  bit in tensor data or a truncated file, which is why files written without a sidecar (by Lightning's
  default ``TorchCheckpointIO``, or by a crash between the two renames above) still load;
- a folder (a ``torch.distributed.checkpoint`` directory) only through a manifest,
  ``lightning_optim.manifest.json``, that lists every file with its size and SHA-256
  (:func:`write_manifest`, written last, after every rank has finished writing).

:func:`load_checkpoint` only reads. A missing, empty, truncated or corrupt file raises
:class:`CheckpointError` (a ``RuntimeError``; :class:`CheckpointNotFoundError` is also a
``FileNotFoundError``) whose message names the file and says what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import socket
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "CHECKSUM_SUFFIX",
    "MANIFEST_NAME",
    "CheckpointError",
    "CheckpointNotFoundError",
    "atomic_save",
    "checksum_path",
    "file_sha256",
    "load_checkpoint",
    "remove_stale_temp_files",
    "verify_checkpoint",
    "write_manifest",
]

CHECKSUM_SUFFIX = ".sha256"
MANIFEST_NAME = "lightning_optim.manifest.json"
_MANIFEST_FORMAT = "lightning-optim-manifest/1"
_CHUNK = 8 << 20
# torch.save's legacy format starts with the pickle (protocol 2) of its magic number, a 10-byte LONG1
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; ``path`` is the file, the message says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"checkpoint file {self.path!r} {reason}")


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def checksum_path(path: str | os.PathLike) -> Path:
    """The SHA-256 sidecar of checkpoint ``path``: ``<path>.sha256``."""
    p = Path(os.fspath(path))
    return p.with_name(p.name + CHECKSUM_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the whole file (read in 8 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# -- verifying --------------------------------------------------------------------------------------------------


def _read_sidecar(path: Path, sidecar: Path) -> str:
    try:
        text = sidecar.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(path, f"has an unreadable checksum file {os.fspath(sidecar)!r}: {err}") from err
    match = re.match(r"\s*([0-9a-fA-F]{64})\b", text)
    if match is None:
        raise CheckpointError(
            path, f"has a malformed checksum file {os.fspath(sidecar)!r} (expected '<64 hex digits>  <name>', "
            f"found {text[:80]!r})"
        )
    return match.group(1).lower()


def _verify_zip_crc(p: Path, size: int) -> str:
    with open(p, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        if head == _LEGACY_MAGIC:  # legacy (pre-1.6) pickle-based torch.save format: nothing to check against
            return "legacy"
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
    return "crc32"


def _verify_manifest(folder: Path) -> str:
    manifest = folder / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            raise ValueError(f"not a {_MANIFEST_FORMAT} manifest with a non-empty 'files' table")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(folder, f"has an unreadable or malformed manifest {os.fspath(manifest)!r}: {err}") from err
    for rel, entry in sorted(files.items()):
        member = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(folder, f"has a manifest entry outside the folder: {rel!r}")
        if not member.is_file():
            raise CheckpointError(folder, f"is incomplete: {rel!r}, listed in its manifest, is missing")
        size = _size(member)
        if size != entry.get("size"):
            raise CheckpointError(
                folder, f"is corrupt: {rel!r} has {size} bytes, its manifest says {entry.get('size')} (truncated?)"
            )
        if file_sha256(member) != entry.get("sha256"):
            raise CheckpointError(folder, f"is corrupt: {rel!r} does not match the SHA-256 in its manifest")
    return "manifest"


def verify_checkpoint(path: str | os.PathLike, *, require_checksum: bool = False) -> str:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, uncorrupted checkpoint; say how it was checked.

    Returns ``"sha256"`` (whole file against its sidecar), ``"crc32"`` (no sidecar: every zip record against
    its CRC-32), ``"manifest"`` (a folder against :data:`MANIFEST_NAME`) or ``"legacy"`` (torch's pre-1.6
    format, which records no checksum: not verified). ``require_checksum=True`` refuses a file without a
    sidecar and a folder without a manifest instead of falling back.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise CheckpointNotFoundError(p, "does not exist")
    if p.is_dir():
        if (p / MANIFEST_NAME).exists():
            return _verify_manifest(p)
        raise CheckpointError(
            p, f"is a directory without a {MANIFEST_NAME} (a sharded torch.distributed.checkpoint folder whose save "
            "did not finish, or was written without lightning_optim's manifest): it cannot be verified"
        )
    try:
        return _verify_file(p, require_checksum)
    except OSError as err:  # permissions, I/O errors: say so, not "corrupt"
        raise CheckpointError(p, f"cannot be read: {err}") from err


def _verify_file(p: Path, require_checksum: bool) -> str:
    size = _size(p)
    if size == 0:
        raise CheckpointError(p, "is empty (0 bytes): the write that produced it was interrupted")
    sidecar = checksum_path(p)
    if not sidecar.exists() and p.is_symlink():  # ModelCheckpoint(save_last="link"): the target's digest
        sidecar = checksum_path(p.resolve())
    if sidecar.exists():
        expected = _read_sidecar(p, sidecar)
        if file_sha256(p) != expected:
            raise CheckpointError(
                p, f"is corrupt: its SHA-256 does not match {os.fspath(sidecar)!r} ({size} bytes; truncated, "
                "altered or replaced after it was written)"
            )
        return "sha256"
    if require_checksum:
        raise CheckpointError(p, f"has no checksum file {os.fspath(sidecar)!r} (require_checksum=True)")
    return _verify_zip_crc(p, size)


def load_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    weights_only: bool | None = True,
    verify: bool = True,
    **torch_load_kwargs: Any,
) -> Any:
    """``torch.load`` that never writes and names the file in every error (see the module docstring).

    ``weights_only=None`` leaves the choice to ``torch.load`` (``True`` since torch 2.6).
    """
    p = Path(os.fspath(path))
    if p.is_dir():
        raise CheckpointError(p, "is a directory (a torch.distributed.checkpoint folder): load it through the "
                              "Trainer's strategy or torch.distributed.checkpoint, not torch.load")
    if verify:
        verify_checkpoint(p)
    elif not p.exists():
        raise CheckpointNotFoundError(p, "does not exist")
    try:
        return torch.load(p, map_location=map_location, weights_only=weights_only, **torch_load_kwargs)
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(p, "does not exist") from err
    except pickle.UnpicklingError as err:
        if weights_only is not False and "weights_only" in str(err):
            raise CheckpointError(
                p, f"holds objects that weights_only=True refuses to load (pass weights_only=False only for files "
                f"you trust): {str(err).splitlines()[0]}"
            ) from err
        raise CheckpointError(p, f"is corrupt ({_size(p)} bytes; unpickling failed: {err})") from err
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            p, f"is truncated or corrupt ({_size(p)} bytes; torch.load failed: {type(err).__name__}: {err})"
        ) from err


# -- writing ----------------------------------------------------------------------------------------------------


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


# .<destination name>.<host>-<pid>.<mkstemp's random part>.tmp
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows: never probe there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): keep its file
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers of this host left in ``folder``; return what was removed.

    Only files named like :func:`atomic_save`'s temporaries, written on this host by a process that no longer
    exists, are touched (a file of a live process, or of another host sharing the folder, is kept).
    """
    removed: list[Path] = []
    host = _host_tag()
    try:
        entries = list(Path(os.fspath(folder)).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


class _HashingWriter:
    """A write-only file wrapper that feeds every byte written to a SHA-256 (what ``torch.save`` needs)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.error: BaseException | None = None  # the first failed write (torch masks it while closing the zip)

    def write(self, data: bytes) -> int:
        try:
            written = self._f.write(data)
        except BaseException as err:
            self.error = self.error or err
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self._f.flush()


def _write_temp(folder: Path, name: str, write: Callable[[BinaryIO], None]) -> Path:
    """Write a new temporary file beside ``folder / name`` with ``write``, fsync it, and return its path.

    On any failure the temporary file is removed and the exception propagates.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.{_host_tag()}-{os.getpid()}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _copy_mode(tmp: Path, dest: Path) -> None:
    """Give ``tmp`` the permissions of the file it replaces, or the umask's default for a new file."""
    try:
        if dest.exists():
            os.chmod(tmp, dest.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
    except OSError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def atomic_save(obj: Any, path: str | os.PathLike, *, checksum: bool = False, **torch_save_kwargs: Any) -> Path:
    """``torch.save(obj, path)`` that either writes the whole file or leaves ``path`` untouched.

    Writes ``.<name>.<host>-<pid>.<random>.tmp`` beside ``path``, fsyncs it, ``os.replace``\\ s it over
    ``path`` and fsyncs the folder. ``checksum=True`` also writes the SHA-256 sidecar ``<name>.sha256`` (see
    the module docstring for the order that keeps the pair consistent). The parent folder is created if
    needed; stale temporary files of dead writers in it are removed first. Returns the path written.
    """
    p = Path(os.fspath(path))
    if p.is_dir():
        raise IsADirectoryError(f"cannot save a checkpoint to {os.fspath(p)!r}: it is a directory")
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(p.parent)
    writer: _HashingWriter | None = None

    def write_checkpoint(f: BinaryIO) -> None:
        nonlocal writer
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer, **torch_save_kwargs)
        except BaseException as err:
            if writer.error is not None and writer.error is not err:
                raise writer.error from err  # "No space left on device", not torch's "unexpected pos"
            raise

    try:
        tmp = _write_temp(p.parent, p.name, write_checkpoint)
    except OSError as err:
        raise _naming(err, p) from err
    tmp_sidecar: Path | None = None
    try:
        _copy_mode(tmp, p)
        if checksum:
            assert writer is not None
            line = f"{writer.sha256.hexdigest()}  {p.name}\n".encode()
            sidecar = checksum_path(p)
            tmp_sidecar = _write_temp(p.parent, sidecar.name, lambda f: f.write(line))
            _copy_mode(tmp_sidecar, p)
            _unlink_quietly(sidecar)  # never a new file beside the old digest (see the module docstring)
            os.replace(tmp, p)
            os.replace(tmp_sidecar, sidecar)
        else:
            os.replace(tmp, p)
    except BaseException as err:
        _unlink_quietly(tmp)
        if tmp_sidecar is not None:
            _unlink_quietly(tmp_sidecar)
        if isinstance(err, OSError):
            raise _naming(err, p) from err
        raise
    _fsync_dir(p.parent)
    return p


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` (the checkpoint, not a temporary file) as its file name; same errno and class."""
    if err.errno is None:
        return err
    return OSError(err.errno, f"cannot write checkpoint: {err.strerror or err}", os.fspath(path))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike, *, fsync: bool = False) -> Path:
    """Write :data:`MANIFEST_NAME` into checkpoint ``folder``: every other file's relative path, size and SHA-256.

    Call it once, after every writer of the folder has finished (it is the mark of a completed save);
    :func:`verify_checkpoint` then checks the folder against it. ``fsync=True`` first flushes every listed
    file to disk (for writers that do not, such as ``torch.save`` of Lightning's ``meta.pt``). Written
    atomically; returns its path.
    """
    root = Path(os.fspath(folder))
    if not root.is_dir():
        raise NotADirectoryError(f"cannot write a checkpoint manifest into {os.fspath(root)!r}: not a directory")
    files = {}
    for member in sorted(root.rglob("*")):
        if not member.is_file() or member.name == MANIFEST_NAME or _TEMP_NAME.match(member.name):
            continue
        rel = member.relative_to(root).as_posix()
        if fsync:
            _fsync_file(member)
        files[rel] = {"size": member.stat().st_size, "sha256": file_sha256(member)}
    if not files:
        raise CheckpointError(root, "is empty: there is nothing to write a manifest for")
    payload = json.dumps({"format": _MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True).encode()
    target = root / MANIFEST_NAME
    tmp = _write_temp(root, MANIFEST_NAME, lambda f: f.write(payload))
    try:
        _copy_mode(tmp, target)
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(root)
    return target


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

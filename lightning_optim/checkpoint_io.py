"""Verified checkpoints for Lightning: :class:`VerifiedCheckpointIO` and :func:`newest_verified_checkpoint`.

Usage::

    import lightning as L
    from lightning_optim.checkpoint_io import VerifiedCheckpointIO, newest_verified_checkpoint

    trainer = L.Trainer(plugins=[VerifiedCheckpointIO()], callbacks=[ModelCheckpoint(...)])
    found = newest_verified_checkpoint("lightning_logs/llama-tiny")   # every version_*/checkpoints/*.ckpt
    for path, reason in found.skipped:
        print(f"skipped {path}: {reason}")
    trainer.fit(model, datamodule, ckpt_path=found.path)

What :class:`VerifiedCheckpointIO` does that Lightning's default ``TorchCheckpointIO`` does not:

- **Saving** goes through :func:`lightning_optim.checkpoint.atomic_save` with ``checksum=True``: the temporary
  file is in the destination's folder (``TorchCheckpointIO`` stages through fsspec in the system temp
  directory; when that is another filesystem the final step is a copy, and a process killed during the copy
  leaves a truncated or empty destination); it is fsynced, renamed over the destination, the folder is
  fsynced, and the SHA-256 of the whole file is written beside it as ``<name>.sha256``. A failed save (full
  disk, exception, SIGKILL) leaves the previous file as it was and no partial destination; nothing is
  written to the system temp directory, and a killed writer's temporary file is removed by the next save.
- **Non-finite weights are refused**: before anything is written, every floating tensor of
  ``checkpoint["state_dict"]`` is checked; a NaN or ±inf raises :class:`NonFiniteCheckpointError` naming the
  file and the first such tensor. ``ModelCheckpoint`` deletes an old checkpoint only after the new one was
  written, so a diverged run can never rotate away the last finite checkpoint.
- **Loading** verifies the file first (the SHA-256 sidecar, or the zip's CRC-32s for files written without
  one) and raises :class:`~lightning_optim.checkpoint.CheckpointError` naming the file for a missing, empty,
  truncated, bit-flipped or foreign file, instead of a bare ``EOFError`` or ``UnpicklingError``. Then it is
  ``torch.load`` with Lightning's own arguments: ``map_location`` and ``weights_only`` as the Trainer passes
  them (``None`` is torch's default, ``True``), so ``trainer.fit(ckpt_path=...)`` behaves as before.
- **Removing** a checkpoint removes its sidecar too.

Under DDP (and any strategy that saves from rank 0 alone) the plugin runs on rank 0 only: a refused save
raises there, and the other ranks are stopped by Lightning's launcher or ``torchrun`` when rank 0 exits.

What it does not cover: ``ModelParallelStrategy`` (FSDP2) with ``save_distributed_checkpoint=True`` (its
default) never calls the ``CheckpointIO`` for a save or a load: every rank writes its shards with
``torch.distributed.checkpoint`` and rank 0 writes ``meta.pt`` with ``torch.save``, straight into the
checkpoint folder, and the load reads them the same way. Such a save is therefore neither atomic nor
checksummed through this plugin; a folder without a manifest is reported as unverifiable by
:func:`newest_verified_checkpoint`. For those runs use
:class:`lightning_optim.checkpoint_dcp.VerifiedModelParallelStrategy` instead of ``ModelParallelStrategy``:
it stages the folder, writes a manifest of per-file SHA-256s last, renames the folder into place, and
verifies the manifest on load.
Only local paths are supported (a ``s3://``-style URL is refused: ``fsync`` and ``os.replace`` have no
meaning there).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    atomic_save,
    checksum_path,
    load_checkpoint,
    verify_checkpoint,
)

__all__ = ["NewestCheckpoint", "NonFiniteCheckpointError", "VerifiedCheckpointIO", "first_non_finite",
           "newest_verified_checkpoint"]


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint was not written because a model weight holds NaN or ±inf; ``tensor`` names it."""

    def __init__(self, path: str | os.PathLike, tensor: str, reason: str) -> None:
        self.tensor = tensor
        super().__init__(path, reason)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # a DTensor shard: check this rank's part, no collective
    return to_local() if callable(to_local) else t


def first_non_finite(tensors: Mapping[str, Any]) -> tuple[str, torch.Tensor] | None:
    """The first ``(name, tensor)`` of ``tensors`` (in order) that is floating point and holds a NaN or ±inf.

    One reduction per tensor and one host sync per device in all (not one per tensor).
    """
    checked: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            local = _local(value)
            if local.numel():
                checked.append((name, local, torch.isfinite(local).all()))
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, _, ok in checked:
        by_device.setdefault(ok.device, []).append(ok)
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    return next((name, local) for name, local, ok in checked if not bool(ok))


def _describe_non_finite(name: str, t: torch.Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return (f"was not written: model weight {name!r} (shape {tuple(t.shape)}, {t.dtype}) holds {nan} NaN and "
            f"{inf} inf of {t.numel()} values. The earlier checkpoints are kept; resume from the newest one "
            "(lightning_optim.checkpoint_io.newest_verified_checkpoint) with a lower learning rate, clipping or "
            "lightning_optim.callbacks.NonFiniteGuard")


def _check_local_path(path: Any, action: str) -> Path:
    text = os.fspath(path)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(text)) and not str(text).startswith("file://"):
        raise ValueError(f"VerifiedCheckpointIO {action} local files only, not {text!r} (fsync and an atomic "
                         "rename have no meaning on a remote store; use Lightning's TorchCheckpointIO there)")
    return Path(str(text).removeprefix("file://"))


class VerifiedCheckpointIO(TorchCheckpointIO):
    """A ``CheckpointIO`` that writes atomically with a SHA-256 sidecar, refuses non-finite weights, and
    verifies before loading (see the module docstring).

    Args:
        check_finite: refuse to write a checkpoint whose ``state_dict`` holds a NaN or ±inf (default on).
        require_checksum: refuse to load a file that has no ``.sha256`` sidecar (by default such files, e.g.
            written by Lightning's ``TorchCheckpointIO``, are checked against their zip CRC-32s instead).
    """

    def __init__(self, check_finite: bool = True, require_checksum: bool = False) -> None:
        super().__init__()
        self.check_finite = check_finite
        self.require_checksum = require_checksum

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options "
                            f"(got {storage_options!r})")
        p = _check_local_path(path, "writes")
        if self.check_finite:
            state_dict = checkpoint.get("state_dict")
            if isinstance(state_dict, Mapping):
                bad = first_non_finite(state_dict)
                if bad is not None:
                    raise NonFiniteCheckpointError(p, bad[0], _describe_non_finite(*bad))
        atomic_save(checkpoint, p, checksum=True)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        p = _check_local_path(path, "reads")
        verify_checkpoint(p, require_checksum=self.require_checksum)
        return load_checkpoint(p, map_location=map_location, weights_only=weights_only, verify=False)

    def remove_checkpoint(self, path: Any) -> None:
        p = _check_local_path(path, "removes")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        try:
            checksum_path(p).unlink()
        except FileNotFoundError:
            pass


class NewestCheckpoint(NamedTuple):
    """What :func:`newest_verified_checkpoint` found: the checkpoint to resume from (or ``None``) and every newer
    candidate it refused, as ``(path, reason)``, newest first."""

    path: Path | None
    skipped: list[tuple[Path, str]]


def _candidates(root: Path) -> list[Path]:
    if root.suffix == ".ckpt" and (root.is_file() or root.is_dir()):
        return [root]
    found: set[Path] = set()
    for pattern in ("*.ckpt", "checkpoints/*.ckpt", "version_*/checkpoints/*.ckpt"):
        found.update(root.glob(pattern))
    return sorted(found)


def _age_key(path: Path) -> tuple[int, int, str]:
    stamp = path / MANIFEST_NAME if path.is_dir() and (path / MANIFEST_NAME).exists() else path
    try:
        mtime = stamp.stat().st_mtime_ns
    except OSError:
        mtime = -1
    numbers = [int(n) for n in re.findall(r"\d+", path.name)]
    return mtime, max(numbers, default=-1), os.fspath(path)


def newest_verified_checkpoint(
    roots: str | os.PathLike | Iterable[str | os.PathLike], *, require_checksum: bool = False
) -> NewestCheckpoint:
    """The newest checkpoint under ``roots`` that passes :func:`~lightning_optim.checkpoint.verify_checkpoint`.

    Each root may be a ``.ckpt`` file, a checkpoint folder, a logger version folder (``.../version_N``, its
    ``checkpoints/*.ckpt``) or a logger root (``lightning_logs/<name>``: every ``version_*/checkpoints/*.ckpt``).
    Candidates are tried newest first by modification time (a folder checkpoint by its manifest's), ties
    broken by the largest number in the name (the step); each one is verified (SHA-256 sidecar, else
    CRC-32; a folder by its manifest) and the first that passes is returned. Every newer one that failed is
    in ``skipped`` with the reason, so the caller can say why it is not resuming from it. Nothing is
    modified. ``path`` is ``None`` when no candidate passes: check ``skipped`` before starting from scratch.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    candidates: set[Path] = set()
    for root in roots:
        candidates.update(_candidates(Path(os.fspath(root))))
    skipped: list[tuple[Path, str]] = []
    for path in sorted(candidates, key=_age_key, reverse=True):
        try:
            verify_checkpoint(path, require_checksum=require_checksum)
        except CheckpointError as err:
            skipped.append((path, err.reason))
            continue
        return NewestCheckpoint(path, skipped)
    return NewestCheckpoint(None, skipped)

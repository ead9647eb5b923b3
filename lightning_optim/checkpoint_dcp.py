"""Verified checkpoints under FSDP2: :class:`VerifiedModelParallelStrategy`.

Usage::

    from lightning_optim.checkpoint_dcp import VerifiedModelParallelStrategy

    trainer = L.Trainer(strategy=VerifiedModelParallelStrategy(data_parallel_size=8), devices=8, ...)

Why a strategy and not the ``CheckpointIO`` plugin: Lightning's ``ModelParallelStrategy`` with
``save_distributed_checkpoint=True`` (its default) never calls the ``CheckpointIO``. Its ``save_checkpoint``
has every rank write its shards with ``torch.distributed.checkpoint`` straight into the checkpoint folder
and rank 0 write ``meta.pt`` with ``torch.save``; its ``load_checkpoint`` reads them back the same way.
Overwriting ``last.ckpt`` therefore rewrites the previous folder in place (a crash leaves a mix of two
saves), nothing is checksummed, and with ``save_distributed_checkpoint=False`` a non-finite check in the
plugin would run on rank 0 alone (the other ranks would wait in the Trainer's barrier). This subclass wraps
both methods:

- **save** (sharded): every rank writes into a staging folder ``.<name>.<token>.staging`` beside the
  destination; after a barrier (every shard written; DCP fsyncs its files) rank 0 fsyncs ``meta.pt``,
  writes the manifest ``lightning_optim.manifest.json`` (size and SHA-256 of every file, see
  :func:`lightning_optim.checkpoint.write_manifest`) and renames the folder into place. When a previous
  checkpoint of that name exists it is first renamed to ``.<name>.<token>.old`` and deleted after the new
  one is in place: a crash between the two renames leaves the previous folder complete under that hidden
  name (and the destination absent), never a mixed folder. A killed save leaves only a hidden staging
  folder, which the next save of that name deletes.
- **save** (``save_distributed_checkpoint=False``): the full file is written by rank 0 through the
  ``CheckpointIO``, by default :class:`~lightning_optim.checkpoint_io.VerifiedCheckpointIO` (atomic, SHA-256
  sidecar).
- **non-finite weights**: every rank checks its shards of ``state_dict`` and the ranks agree (one
  all-reduce) before anything is written; a NaN or ±inf raises
  :class:`~lightning_optim.checkpoint_io.NonFiniteCheckpointError` on every rank, naming the file and the
  tensor, so ``ModelCheckpoint`` never rotates away the last finite checkpoint.
- **shard-dependent optimizer state** (sharded saves, more than one rank): ``torch.distributed.checkpoint``
  reshards ``DTensor`` state to any world size, but it treats a *plain* tensor in the optimizer state as
  replicated: it writes one rank's copy and loads it whole on every rank. A plain tensor whose value depends
  on the rank's shard (a per-row statistic of the local rows, a shard-local basis) would therefore be saved
  from one rank only — the other ranks' values lost, and a resume in another world size wrong or refused
  for a shape mismatch. Before anything is written, every rank fingerprints each plain tensor of its
  optimizer state (shape, dtype and two integer sums of its raw bits, one weighted by position) and the
  fingerprints are compared across the ranks (one ``all_gather_object``); an entry that differs, or that
  only some ranks have, raises :class:`~lightning_optim.checkpoint.CheckpointError` on every rank naming
  it, and the previous checkpoint is kept. ``check_replicated_state=False`` writes such state anyway (one
  rank's copy). Cost: one read of the plain optimizer state per save (SOAP's replicated factors, step
  counters; ``DTensor`` state is not read).
- **load**: rank 0 verifies the folder against its manifest (or the file against its sidecar / CRC-32s)
  and every rank raises the same :class:`~lightning_optim.checkpoint.CheckpointError` naming it when that
  fails. A folder without a manifest (written by Lightning's own strategy, or a save that did not finish)
  is refused unless ``allow_unverified_folders=True``.
- **load, a newer optimizer**: a param-group setting the running optimizer has and the sharded checkpoint
  lacks (a hyperparameter added in a later release, e.g. ``cautious``) would make
  ``torch.distributed.checkpoint`` fail with ``Missing key in checkpoint state_dict``. It is left out of what
  is read, keeps the running optimizer's value, and a warning names it. Tensors missing from the checkpoint
  still fail the load.

Not covered: the staging folder and the swap need a POSIX file system shared by all ranks (the folder's
rename is done by rank 0); remote URLs are refused by the ``CheckpointIO``. The shard-dependent state check
needs every rank's state, so it runs for sharded saves only (with ``save_distributed_checkpoint=False`` the
other ranks hand Lightning an empty optimizer state); model buffers are not checked (FSDP2 leaves them
unsharded and per-rank by design, e.g. BatchNorm statistics).

**Moving a checkpoint between world sizes** (``tests/test_reshard_resume.py``): a sharded checkpoint saved
by 2 processes (FSDP2) resumes in 1 and in 4 processes and in HSDP 2×2, and an HSDP 2×2 checkpoint in 2
processes, with the optimizer state, gathered to full tensors, exactly as saved, for every registered matrix
or hybrid optimizer that runs on FSDP2; the next step matches the uninterrupted run to bfloat16 precision.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from datetime import timedelta
from typing import Any, Literal, Optional, Union

import torch
from torch.distributed.constants import default_pg_timeout
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from .checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointNotFoundError,
    _fsync_dir,
    checksum_path,
    verify_checkpoint,
    write_manifest,
)
from .checkpoint_io import NonFiniteCheckpointError, VerifiedCheckpointIO, _describe_non_finite, first_non_finite

__all__ = ["VerifiedModelParallelStrategy"]

_STAGING = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]+\.(?P<kind>staging|old)$")


class VerifiedModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose checkpoints are atomic, checksummed and verified (module docstring).

    Args:
        data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout:
            as for ``ModelParallelStrategy`` (spelled out so LightningCLI / YAML configs see them).
        check_finite: refuse to save weights holding NaN or ±inf (default on).
        check_replicated_state: refuse a sharded save whose optimizer state holds a plain (non-DTensor)
            tensor that differs between the ranks (default on; module docstring).
        require_checksum: refuse to load a single file without its ``.sha256`` sidecar.
        allow_unverified_folders: load a sharded folder that has no manifest (unverified) instead of refusing.
    """

    def __init__(
        self,
        data_parallel_size: Union[Literal["auto"], int] = "auto",
        tensor_parallel_size: Union[Literal["auto"], int] = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        check_finite: bool = True,
        check_replicated_state: bool = True,
        require_checksum: bool = False,
        allow_unverified_folders: bool = False,
    ) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.check_finite = check_finite
        self.check_replicated_state = check_replicated_state
        self.require_checksum = require_checksum
        self.allow_unverified_folders = allow_unverified_folders

    @property
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = VerifiedCheckpointIO(check_finite=False, require_checksum=self.require_checksum)
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    # -- saving ----------------------------------------------------------------------------------------------

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (one all-reduce), so that all ranks take the same branch."""
        total = self.reduce(torch.tensor([1.0 if flag else 0.0], device=self.root_device), reduce_op="sum")
        return float(total.item()) > 0.0

    def _refuse_non_finite(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        state_dict = checkpoint.get("state_dict")
        bad = first_non_finite(state_dict) if isinstance(state_dict, Mapping) else None
        if not self._any_rank(bad is not None):
            return
        if bad is not None:
            raise NonFiniteCheckpointError(path, bad[0], _describe_non_finite(*bad))
        raise NonFiniteCheckpointError(path, "", "was not written: a model weight holds NaN or inf on another rank "
                                       "(that rank's error names it); the earlier checkpoints are kept")

    def _refuse_rank_dependent_state(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Raise on every rank when a plain tensor of the optimizer state differs between ranks (docstring)."""
        import torch.distributed as dist

        mine = plain_state_fingerprints(checkpoint)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        problems = rank_dependent_entries(everyone)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointError(path, (
                f"was not written: the optimizer state holds plain (non-DTensor) tensors that differ between the "
                f"ranks: {shown}. torch.distributed.checkpoint saves one rank's copy of a plain tensor, so that "
                "state would be lost or wrong on resume (in any world size). Keep such state as a DTensor laid "
                "out like its parameter, or identical on every rank; check_replicated_state=False writes it "
                "anyway. The previous checkpoint is unchanged"))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(self.broadcast(os.fspath(filepath)))
        if self.check_finite:
            self._refuse_non_finite(checkpoint, path)
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        if self.check_replicated_state and self.world_size > 1:
            self._refuse_rank_dependent_state(checkpoint, path)
        token = self.broadcast(secrets.token_hex(4) if self.global_rank == 0 else None)
        staging = path.parent / f".{path.name}.{token}.staging"
        if self.global_rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(path)
        self.barrier("VerifiedModelParallelStrategy.save_checkpoint:staging")
        error: Exception | None = None
        try:
            super().save_checkpoint(checkpoint, staging)  # every rank's shards, then rank 0's meta.pt
        except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
            error = err
        if self._any_rank(error is not None):  # also the barrier: every shard is written
            if self.global_rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            if error is not None:
                raise error
            raise CheckpointError(path, "was not written: the save failed on another rank (its error says why); "
                                  "the previous checkpoint is unchanged")
        failure: BaseException | None = None
        if self.global_rank == 0:
            try:
                write_manifest(staging, fsync=True)
                _move_into_place(staging, path, token)
            except BaseException as err:  # tell the other ranks instead of leaving them in a barrier
                shutil.rmtree(staging, ignore_errors=True)
                failure = err
        message = self.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if message is not None:
            raise CheckpointError(path, f"was not written: rank 0 could not finish the save ({message})")

    # -- loading ---------------------------------------------------------------------------------------------

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(os.fspath(checkpoint_path)))
        failure: tuple[str, bool] | None = None
        if self.global_rank == 0:
            try:
                if not (path.is_dir() and self.allow_unverified_folders and not (path / MANIFEST_NAME).exists()):
                    verify_checkpoint(path, require_checksum=self.require_checksum)
            except CheckpointError as err:
                failure = (err.reason, isinstance(err, CheckpointNotFoundError))
        failure = self.broadcast(failure)
        if failure is not None:
            reason, missing = failure
            raise (CheckpointNotFoundError if missing else CheckpointError)(path, reason)
        absent = _param_group_keys_absent(path, self.optimizers) if path.is_dir() else []
        for opt, gi, key, value in absent:
            del opt.param_groups[gi][key]
        try:
            return super().load_checkpoint(path, weights_only=weights_only)
        finally:
            for opt, gi, key, value in absent:
                opt.param_groups[gi].setdefault(key, value)
            if absent and self.global_rank == 0:
                named = ", ".join(sorted({f"{key}={value!r}" for _, _, key, value in absent}))
                rank_zero_warn(f"{path}: the checkpoint's param groups have no {named}; the running optimizer's "
                               "value is kept (a setting added after the checkpoint was written)")


def _param_group_keys_absent(path: Path, optimizers: list[torch.optim.Optimizer]) -> list[tuple[Any, int, str, Any]]:
    """``(optimizer, group index, key, current value)`` for each param-group key of the running optimizers that
    the sharded checkpoint at ``path`` does not hold (DCP flattens them to ``optimizer_{i}.param_groups.{g}.{key}``).
    An optimizer the checkpoint holds nothing of is left alone: the load then fails as it should."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        saved = set(FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata)
    except Exception:  # not a DCP folder: Lightning's own load reports it
        return []
    absent = []
    for oi, opt in enumerate(optimizers):
        prefix = f"optimizer_{oi}.param_groups."
        if not any(k.startswith(prefix) for k in saved):
            continue
        for gi, group in enumerate(opt.param_groups):
            if f"{prefix}{gi}.params" not in saved:
                continue  # a group the checkpoint does not have: not ours to paper over
            absent += [(opt, gi, key, value) for key, value in group.items()
                       if key != "params" and f"{prefix}{gi}.{key}" not in saved]
    return absent


# -- shard-dependent plain state ----------------------------------------------------------------------------

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20  # elements per pass of the fingerprint: bounds its temporary memory (8 MiB per int64 copy)
_WEIGHTS = 8191  # positions are weighted by 1 + (index mod 8191) (a prime), so a permutation changes the sum


def tensor_fingerprint(t: torch.Tensor) -> tuple[int, int]:
    """Two wrapping int64 sums of ``t``'s raw bits: plain, and weighted by position (``1 + index mod 8191``).

    Equal tensors have equal fingerprints; tensors that differ in any bit almost never do (a difference cancels
    in both sums only by coincidence). The bits, not the values, are summed, so ``-0.0``/``0.0`` and NaN
    payloads count as different, as they are to a checkpoint."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_BITS[flat.element_size()])
    plain = weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        part = bits[start:start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + part.numel(), device=part.device, dtype=torch.int64) % _WEIGHTS + 1
        plain = plain + part.sum()
        weighted = weighted + (part * pos).sum()
    return int(plain), int(weighted)


def plain_state_fingerprints(checkpoint: Mapping[str, Any]) -> dict[str, tuple]:
    """``{label: (shape, dtype, fingerprint)}`` of every plain (non-DTensor) tensor in the checkpoint's
    ``optimizer_states``; labels name the optimizer, the parameter and the state key (or the group key)."""
    from torch.distributed.tensor import DTensor

    found: dict[str, tuple] = {}

    def visit(label: str, value: Any) -> None:
        if isinstance(value, DTensor):
            return
        if isinstance(value, torch.Tensor):
            found[label] = (tuple(value.shape), str(value.dtype), tensor_fingerprint(value))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{label}[{key!r}]", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{label}[{i}]", item)

    for i, state in enumerate(checkpoint.get("optimizer_states") or ()):
        visit(f"optimizer_states[{i}]", state)
    return found


def rank_dependent_entries(per_rank: list[Mapping[str, tuple]]) -> list[str]:
    """Labels whose fingerprint differs between the ranks' :func:`plain_state_fingerprints`, or that only some
    ranks have, each with what differs."""
    problems = []
    labels = sorted(set().union(*per_rank)) if per_rank else []
    for label in labels:
        held = [r for r, prints in enumerate(per_rank) if label in prints]
        if len(held) != len(per_rank):
            problems.append(f"{label} exists on ranks {held} only")
            continue
        values = [per_rank[r][label] for r in held]
        if any(v != values[0] for v in values[1:]):
            shapes = {tuple(v[0]) for v in values}
            detail = f"shapes {sorted(shapes)}" if len(shapes) > 1 else "values"
            problems.append(f"{label} ({detail} differ)")
    return problems


def _remove_leftovers(path: Path) -> None:
    """Delete hidden staging folders of ``path`` from killed saves, and ``.old`` copies once ``path`` exists."""
    for entry in path.parent.iterdir():
        match = _STAGING.match(entry.name)
        if match is None or match["name"] != path.name or not entry.is_dir():
            continue
        if match["kind"] == "staging" or path.exists():
            shutil.rmtree(entry, ignore_errors=True)


def _move_into_place(staging: Path, path: Path, token: str) -> None:
    """Rename the finished ``staging`` folder to ``path``; a previous ``path`` is kept as ``.old`` until then."""
    old: Path | None = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.{token}.old"
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)  # the previous checkpoint goes back where it was
        raise
    _fsync_dir(path.parent)
    try:
        checksum_path(path).unlink()  # the digest of a single file this folder replaced
    except FileNotFoundError:
        pass
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()

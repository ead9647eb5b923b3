"""``--ckpt_path last``: the newest checkpoint of the recipe's run directory that passes verification.

Lightning's own ``ckpt_path="last"`` looks only in the checkpoint folder of the *new* run (a fresh
``version_N``), finds nothing and trains from scratch. A recipe resolves it itself: every checkpoint under
``<save_dir>/<name>/version_*/checkpoints/`` (or ``--checkpoint.dirpath``, or
``<default_root_dir>/checkpoints`` without a logger), newest first, is verified (complete file, checksum);
the first that passes is used and the ones skipped are reported with the reason. No checkpoint at all is an
error: asking to resume and silently starting over would waste the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

__all__ = ["NoCheckpointError", "checkpoint_dirs", "resolve_last_checkpoint"]


class NoCheckpointError(FileNotFoundError):
    """``--ckpt_path last`` found no usable checkpoint."""


def checkpoint_dirs(save_dir: str | None, name: str | None, dirpath: str | None, root_dir: str) -> list[Path]:
    """Where this recipe's runs keep their checkpoints (see the module docstring)."""
    if dirpath:
        return [Path(dirpath)]
    if save_dir is None:
        return [Path(root_dir) / "checkpoints"]
    run_root = Path(save_dir) / (name or "")
    return sorted(run_root.glob("version_*/checkpoints"))


def _candidates(dirs: Iterable[Path]) -> list[Path]:
    found = [p for d in dirs if d.is_dir() for p in d.iterdir() if p.name.endswith(".ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _verify(path: Path) -> None:
    from lightning_optim.checkpoint import CheckpointError, verify_checkpoint

    if path.is_dir():  # a torch.distributed.checkpoint folder (FSDP2): complete once its .metadata exists
        if not (path / ".metadata").is_file():
            raise CheckpointError(path, "is a distributed checkpoint folder without .metadata (an interrupted save)")
        return
    verify_checkpoint(path)


def resolve_last_checkpoint(dirs: list[Path]) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest verified checkpoint in ``dirs`` and the newer ones skipped, with the reason."""
    skipped: list[tuple[Path, str]] = []
    for path in _candidates(dirs):
        try:
            _verify(path)
        except Exception as err:  # a broken file is skipped and reported, never used
            skipped.append((path, str(err)))
            continue
        return path, skipped
    where = ", ".join(str(d) for d in dirs) or "(no run directory exists yet)"
    detail = "".join(f"\n  skipped {p}: {why}" for p, why in skipped)
    raise NoCheckpointError(f"--ckpt_path last: no usable checkpoint in {where}{detail}")

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


def resolve_last_checkpoint(dirs: list[Path]) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest verified checkpoint in ``dirs`` and the newer ones skipped, with the reason."""
    from lightning_optim.checkpoint_io import newest_verified_checkpoint

    found = newest_verified_checkpoint([d for d in dirs if d.is_dir()])
    if found.path is not None:
        return found.path, found.skipped
    where = ", ".join(str(d) for d in dirs) or "(no run directory exists yet)"
    detail = "".join(f"\n  skipped {p}: {why}" for p, why in found.skipped)
    raise NoCheckpointError(f"--ckpt_path last: no usable checkpoint in {where}{detail}")

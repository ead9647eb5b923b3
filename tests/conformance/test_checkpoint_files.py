"""Guarantee 6 — a corrupt, truncated or missing checkpoint file gets a clear error naming the file, and
nothing is overwritten: ``lightning_optim.checkpoint.load_checkpoint`` only reads, and ``atomic_save`` either
replaces the file whole or leaves the previous one byte for byte.

Per optimizer: its real state_dict (after a few steps) is saved, then truncated at several points, given a
flipped bit inside a tensor record, overwritten with garbage, or emptied; every load raises
``CheckpointError`` naming the file, and the directory is unchanged by the attempt. A save that fails half
way (an object that cannot be pickled) leaves the earlier checkpoint intact and no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch

import lightning_optim as lo
from lightning_optim.checkpoint import CheckpointError, CheckpointNotFoundError, atomic_save, load_checkpoint

from ._helpers import build, diff_states, make_model, train_steps


def _listing(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def _expect_named_error(path: Path, exc=CheckpointError) -> CheckpointError:
    folder = path.parent
    before = _listing(folder)
    with pytest.raises(exc) as info:
        load_checkpoint(path)
    err = info.value
    assert os.fspath(path) in str(err), f"the error does not name the file: {err}"
    assert _listing(folder) == before, "loading a bad checkpoint changed files in its folder"
    return err


def _trained_state(name: str):
    model = make_model()
    opt = build(name, model)
    sched = lo.create_scheduler("cosine", opt, total_steps=6, warmup_steps=1)
    train_steps(model, opt, sched, 0, 3)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}


def _tensor_record(path: Path) -> tuple[int, int]:
    """Offset and size of the largest tensor record's data inside a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        return info.header_offset + 30 + n + m, info.file_size


def test_corrupt_checkpoint_files(optim_name, tmp_path):
    state = _trained_state(optim_name)
    good = tmp_path / "good.pt"
    atomic_save(state, good)
    assert diff_states(load_checkpoint(good), state) == []
    data = good.read_bytes()

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    cases: dict[str, bytes] = {"empty": b"", "garbage": os.urandom(len(data))}
    for frac in (0.01, 0.5, 0.99):
        cases[f"truncated-{frac}"] = data[: max(1, int(len(data) * frac))]
    offset, size = _tensor_record(good)
    flipped = bytearray(data)
    flipped[offset + size // 2] ^= 0x10  # one bit inside a tensor: torch.load alone would not notice
    cases["bitflip"] = bytes(flipped)
    for case, content in cases.items():
        path = bad_dir / f"{case}.pt"
        path.write_bytes(content)
        err = _expect_named_error(path)
        assert err.path == os.fspath(path), case
    _expect_named_error(tmp_path / "missing.pt", CheckpointNotFoundError)
    assert good.read_bytes() == data


def test_failed_save_overwrites_nothing(optim_name, tmp_path):
    state = _trained_state(optim_name)
    path = tmp_path / "last.pt"
    atomic_save(state, path)
    before = path.read_bytes()
    broken = {**state, "oops": lambda: None}  # cannot be pickled: torch.save fails part way through
    with pytest.raises(Exception):
        atomic_save(broken, path)
    assert path.read_bytes() == before, "a failed save changed the existing checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"], "a failed save left a temporary file"
    # a successful save replaces it whole
    state["scheduler"]["last_epoch"] = 99
    atomic_save(state, path)
    assert load_checkpoint(path)["scheduler"]["last_epoch"] == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_weights_only_refusal_names_the_file(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"opt_state": {"seen": {1, 2}}, "obj": Path("x")}, path)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_checkpoint(path)
    assert os.fspath(path) in str(info.value)

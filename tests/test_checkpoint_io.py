"""VerifiedCheckpointIO in a real Trainer, and the faults a user meets: corrupt files, a full disk, a killed
writer on another filesystem than $TMPDIR, diverged weights, and picking the newest good checkpoint."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import lightning_optim.checkpoint as ckpt_mod
from lightning_optim import OptimConfig, OptimizerMixin
from lightning_optim.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointNotFoundError,
    verify_checkpoint,
    write_manifest,
)
from lightning_optim.checkpoint_io import NonFiniteCheckpointError, VerifiedCheckpointIO, newest_verified_checkpoint

REPO = Path(__file__).resolve().parents[1]


class MLP(OptimizerMixin, L.LightningModule):
    """Two linear layers; hyperparameters hold an OptimConfig as a dict, as the recipes' LanguageModel does."""

    def __init__(self, optim: OptimConfig | dict | None = None):
        super().__init__()
        cfg = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {"name": "adamw", "lr": 1e-2}))
        self.save_hyperparameters(ignore=["optim"])
        self.hparams["optim"] = dataclasses.asdict(cfg)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):  # 3 batches an epoch: a checkpoint every 3 steps ends an epoch
        x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def make_trainer(root: Path, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, max_steps=max_steps, plugins=[VerifiedCheckpointIO()],
        callbacks=list(callbacks), **kw,
    )


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tensor_data_offset(path: Path) -> int:
    """An offset in the middle of the largest tensor record's bytes inside a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + n + m + info.file_size // 2


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def small_checkpoint(value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value)}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the happy path -------------------------------------------------------------------------------------------


def test_fit_saves_verified_files_and_resume_is_exact(tmp_path):
    cfg = {"name": "adamw", "lr": 1e-2, "scheduler": "cosine", "warmup_steps": 2, "total_steps": 6}
    torch.manual_seed(0)
    straight = MLP(cfg)
    rotating = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=1, save_last=True,
                               filename="step{step}", auto_insert_metric_name=False)
    keep_all = ModelCheckpoint(dirpath=tmp_path / "all", every_n_train_steps=3, save_top_k=-1, filename="s{step}",
                               monitor="step", mode="max", auto_insert_metric_name=False)
    make_trainer(tmp_path / "a", 6, [rotating, keep_all]).fit(straight)
    # rotation removed step3.ckpt and its sidecar together; every checkpoint has its digest beside it
    assert files(tmp_path / "ckpt") == ["last.ckpt", "last.ckpt.sha256", "step6.ckpt", "step6.ckpt.sha256"]
    digest = (tmp_path / "ckpt" / "step6.ckpt.sha256").read_text()
    assert digest.split() == [ckpt_mod.file_sha256(tmp_path / "ckpt" / "step6.ckpt"), "step6.ckpt"]

    # resume from the step-3 checkpoint (the end of epoch 0) through the plugin: bit for bit the same run
    torch.manual_seed(123)  # another init: the weights must come from the checkpoint
    resumed = MLP(cfg)
    t2 = make_trainer(tmp_path / "c", 6, enable_checkpointing=False)
    t2.fit(resumed, ckpt_path=tmp_path / "all" / "s3.ckpt")
    assert t2.global_step == 6
    assert resumed.hparams["optim"]["scheduler"] == "cosine"
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_plugin_loads_with_lightnings_arguments(tmp_path):
    io = VerifiedCheckpointIO()
    path = tmp_path / "x.ckpt"
    io.save_checkpoint(small_checkpoint(2.0), path)
    loaded = io.load_checkpoint(path)  # Lightning's defaults: identity map_location, weights_only=None
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), 2.0))
    loaded = io.load_checkpoint(path, map_location="cpu", weights_only=True)
    assert loaded["global_step"] == 2
    # a file written without a sidecar (Lightning's TorchCheckpointIO) still loads, checked by its CRC-32s
    torch.save(small_checkpoint(3.0), tmp_path / "plain.ckpt")
    assert io.load_checkpoint(tmp_path / "plain.ckpt")["global_step"] == 3
    with pytest.raises(CheckpointError, match="no checksum file"):
        VerifiedCheckpointIO(require_checksum=True).load_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointNotFoundError, match="missing.ckpt"):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="s3://bucket/x.ckpt"):
        io.save_checkpoint(small_checkpoint(), "s3://bucket/x.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(small_checkpoint(), path, storage_options={"a": 1})


# -- corrupt files ------------------------------------------------------------------------------------------


def test_bit_flip_in_tensor_data_is_refused_by_fit(tmp_path):
    model = MLP()
    make_trainer(tmp_path, 3, [ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")]).fit(model)
    path = tmp_path / "ckpt" / "last.ckpt"
    flip_byte(path, tensor_data_offset(path))
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        make_trainer(tmp_path / "r", 6, enable_checkpointing=False).fit(MLP(), ckpt_path=path)
    assert info.value.path == os.fspath(path) and os.fspath(path) in str(info.value)
    # without the sidecar the zip's CRC-32 of the tensor record still catches it
    (tmp_path / "ckpt" / "last.ckpt.sha256").unlink()
    with pytest.raises(CheckpointError, match="CRC-32") as info:
        VerifiedCheckpointIO().load_checkpoint(path)
    assert os.fspath(path) in str(info.value)


@pytest.mark.parametrize("where", ["tensor", "zip-directory", "last-byte"])
def test_any_flipped_byte_is_refused_with_a_sidecar(tmp_path, where):
    io = VerifiedCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(small_checkpoint(), path)
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    central = int.from_bytes(data[eocd + 16: eocd + 20], "little")  # offset of the zip's central directory
    # "version made by" of the first central directory entry: nothing reads it, no CRC covers it
    offset = {"tensor": tensor_data_offset(path), "zip-directory": central + 4, "last-byte": len(data) - 1}
    flip_byte(path, offset[where])
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        io.load_checkpoint(path)
    assert os.fspath(path) in str(info.value)


@pytest.mark.parametrize("case", ["truncated", "empty", "random-bytes", "pickle-header"])
def test_damaged_files_are_refused_naming_the_file(tmp_path, case):
    io = VerifiedCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint(small_checkpoint(), good)
    data = good.read_bytes()
    content = {"truncated": data[: len(data) // 2], "empty": b"", "random-bytes": os.urandom(len(data)),
               "pickle-header": b"\x80\x04" + os.urandom(len(data))}[case]  # not torch's legacy magic number
    for with_sidecar in (True, False):
        bad = tmp_path / f"{case}-{with_sidecar}.ckpt"
        bad.write_bytes(content)
        if with_sidecar:
            shutil.copy(tmp_path / "good.ckpt.sha256", tmp_path / f"{bad.name}.sha256")
        with pytest.raises(CheckpointError) as info:
            io.load_checkpoint(bad)
        assert info.value.path == os.fspath(bad), (case, with_sidecar)
        with pytest.raises(CheckpointError):  # refused before torch.load, so never picked to resume from
            verify_checkpoint(bad)
        assert os.fspath(bad) in str(info.value)
    assert good.read_bytes() == data


# -- failed saves -------------------------------------------------------------------------------------------


def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class FillingDisk:
    """A file whose device fills up after ``room`` bytes: later writes raise ENOSPC, as the kernel's would."""

    def __init__(self, f, room: int):
        self._f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            _raise_enospc()
        self.room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, room: int = 1000) -> None:
    """From now on every file the checkpoint module opens for writing has only ``room`` bytes of space."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(ckpt_mod.os, "fdopen", lambda fd, *a, **k: FillingDisk(real_fdopen(fd, *a, **k), room))


@pytest.mark.parametrize("fault", ["write", "fsync"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    io = VerifiedCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(small_checkpoint(1.0), path)
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    if fault == "write":  # the disk fills after some bytes of the new file were written
        fill_disk(monkeypatch)
    else:
        monkeypatch.setattr(ckpt_mod.os, "fsync", _raise_enospc)
    for target in (path, tmp_path / "new.ckpt"):  # overwriting, and a new name
        with pytest.raises(OSError) as info:
            io.save_checkpoint(small_checkpoint(2.0), target)
        assert info.value.errno == errno.ENOSPC and info.value.filename == os.fspath(target)
        assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before, target
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1


class FailWritesAfter(Callback):
    """From the given step on, every checkpoint write hits a full disk."""

    def __init__(self, step: int, monkeypatch):
        self.step, self.monkeypatch = step, monkeypatch

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            fill_disk(self.monkeypatch)


def test_disk_full_during_fit_leaves_the_earlier_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    cb = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=1, filename="step{step}",
                         auto_insert_metric_name=False)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(tmp_path, 6, [FailWritesAfter(3, monkeypatch), cb]).fit(MLP())
    monkeypatch.undo()
    assert files(folder) == ["step2.ckpt", "step2.ckpt.sha256"]  # no truncated step4.ckpt, no temporary file
    assert VerifiedCheckpointIO().load_checkpoint(folder / "step2.ckpt")["global_step"] == 2


_KILLED_WRITER = """
import sys, time
from pathlib import Path
import torch
import lightning_optim.checkpoint as ckpt_mod  # the plugin's write path, without importing lightning (seconds)

marker, dest = Path(sys.argv[1]), Path(sys.argv[2])
real_write = ckpt_mod._HashingWriter.write
written = 0

def write(self, data):  # write half of the new checkpoint, then hang until killed
    global written
    written += len(data)
    out = real_write(self, data)
    if written > 2_000_000:
        self.flush()
        marker.write_text("mid-save")
        time.sleep(120)
    return out

ckpt_mod._HashingWriter.write = write
ckpt_mod.atomic_save({"state_dict": {"w": torch.ones(1024, 1024)}, "global_step": 2}, dest, checksum=True)
"""


def _other_filesystem_pair(tmp_path: Path) -> tuple[Path, Path] | None:
    """A checkpoint folder and a TMPDIR on different filesystems (st_dev), or None."""
    for base in ("/dev/shm", "/run/user/%d" % os.getuid(), "/var/tmp"):
        if os.path.isdir(base) and os.access(base, os.W_OK) and os.stat(base).st_dev != tmp_path.stat().st_dev:
            return Path(tempfile.mkdtemp(prefix="lo-ckpt-", dir=base)), tmp_path
    return None


def test_sigkill_mid_save_on_another_filesystem_than_tmpdir(tmp_path):
    pair = _other_filesystem_pair(tmp_path)
    if pair is None:
        pytest.skip(f"no writable folder on another filesystem than {tmp_path} (tried /dev/shm, /run/user, /var/tmp)")
    folder, tmp_root = pair
    try:
        tmpdir = tmp_root / "tmpdir"
        tmpdir.mkdir()
        assert os.stat(folder).st_dev != os.stat(tmpdir).st_dev
        io = VerifiedCheckpointIO()
        dest = folder / "last.ckpt"
        io.save_checkpoint(small_checkpoint(1.0), dest)
        before = dest.read_bytes()
        marker = tmp_root / "marker"
        env = {**os.environ, "TMPDIR": os.fspath(tmpdir), "PYTHONPATH": os.fspath(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), os.fspath(marker),
                                 os.fspath(dest)], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the writer exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the writer never reached the middle of its save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        proc.stderr.close()

        assert dest.read_bytes() == before, "the killed save changed the previous checkpoint"
        assert io.load_checkpoint(dest)["global_step"] == 1
        assert os.listdir(tmpdir) == [], "the save wrote into the system temp directory"
        leftovers = [n for n in files(folder) if n not in ("last.ckpt", "last.ckpt.sha256")]
        assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")
        assert newest_verified_checkpoint(folder).path == dest  # the temporary file is no candidate
        io.save_checkpoint(small_checkpoint(3.0), dest)  # the next save removes the dead writer's file
        assert files(folder) == ["last.ckpt", "last.ckpt.sha256"]
        assert io.load_checkpoint(dest)["global_step"] == 3
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- diverged weights ---------------------------------------------------------------------------------------


class PoisonWeights(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[2].weight[0, 3] = float("nan")


def test_non_finite_weights_are_never_written_and_rotation_keeps_the_finite_one(tmp_path):
    folder = tmp_path / "ckpt"
    cb = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=1, filename="step{step}",
                         auto_insert_metric_name=False)
    with pytest.raises(NonFiniteCheckpointError) as info:
        make_trainer(tmp_path, 6, [PoisonWeights(4), cb]).fit(MLP())
    err = info.value
    assert err.tensor == "net.2.weight" and "'net.2.weight'" in str(err) and "1 NaN" in str(err)
    assert os.fspath(folder / "step4.ckpt") in str(err)
    assert files(folder) == ["step2.ckpt", "step2.ckpt.sha256"]
    weights = VerifiedCheckpointIO().load_checkpoint(folder / "step2.ckpt")["state_dict"]
    assert all(torch.isfinite(t).all() for t in weights.values())
    # inf is refused too, and check_finite=False writes it anyway
    bad = {"state_dict": {"ok": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(NonFiniteCheckpointError, match="'b'.*0 NaN and 1 inf"):
        VerifiedCheckpointIO().save_checkpoint(bad, tmp_path / "inf.ckpt")
    assert not (tmp_path / "inf.ckpt").exists()
    VerifiedCheckpointIO(check_finite=False).save_checkpoint(bad, tmp_path / "inf.ckpt")
    assert (tmp_path / "inf.ckpt").exists()


# -- finding the newest good checkpoint ---------------------------------------------------------------------


def test_newest_verified_checkpoint_skips_corrupt_newer_files_and_says_why(tmp_path):
    io = VerifiedCheckpointIO()
    root = tmp_path / "lightning_logs" / "llama-tiny"
    v0, v1 = root / "version_0" / "checkpoints", root / "version_1" / "checkpoints"
    paths = {
        "old": v0 / "step0000100.ckpt", "good": v1 / "step0000200.ckpt", "corrupt": v1 / "step0000300.ckpt",
    }
    for i, path in enumerate(paths.values()):
        io.save_checkpoint(small_checkpoint(float(i + 1)), path)
    flip_byte(paths["corrupt"], tensor_data_offset(paths["corrupt"]))
    for i, path in enumerate(paths.values()):  # old < good < corrupt, whatever the file system's clock did
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    # a sharded folder whose save never finished (no manifest) is newer still
    unfinished = v1 / "step0000400.ckpt"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"shard")
    os.utime(unfinished, ns=(10**18 + 9 * 10**9, 10**18 + 9 * 10**9))

    found = newest_verified_checkpoint(root)
    assert found.path == paths["good"]
    assert [p for p, _ in found.skipped] == [unfinished, paths["corrupt"]]
    assert "manifest" in found.skipped[0][1] and "SHA-256" in found.skipped[1][1]
    assert newest_verified_checkpoint([v0]).path == paths["old"]
    assert newest_verified_checkpoint(root / "version_1").path == paths["good"]
    assert newest_verified_checkpoint(tmp_path / "nothing-here") == (None, [])

    # once the folder has its manifest it is the newest verified checkpoint; a damaged shard is refused
    (unfinished / ".metadata").write_bytes(b"meta")
    write_manifest(unfinished)
    assert newest_verified_checkpoint(root).path == unfinished
    (unfinished / "__0_0.distcp").write_bytes(b"shart")
    found = newest_verified_checkpoint(root)
    assert found.path == paths["good"] and "'__0_0.distcp'" in found.skipped[0][1]
    assert (unfinished / MANIFEST_NAME).exists()  # the search modifies nothing


# -- sharded (FSDP2) checkpoints ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_checkpoints_under_fsdp2_are_verified(tmp_path):
    """Two gloo ranks, VerifiedModelParallelStrategy (tests/dist_scripts/verified_dcp.py has the scenario)."""
    import json

    from tests.dist_utils import run_distributed

    run_distributed(REPO / "tests" / "dist_scripts" / "verified_dcp.py", str(tmp_path), nprocs=2, timeout=400,
                    out_dir=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in (0, 1))
    folder = tmp_path / "ckpt"
    assert r0["files"] == ["last.ckpt", "step2.ckpt", "step4.ckpt"]  # last.ckpt replaced once, nothing hidden left
    assert set(r0["verified"].values()) == {"manifest"}
    for r in (r0, r1):  # both ranks refuse the damaged folder, naming it and the file inside
        assert r["corrupt_path"] == os.fspath(folder / "last.ckpt")
        assert "'__0_0.distcp' does not match the SHA-256" in r["corrupt_resume"]
        assert r["newest"] == os.fspath(folder / "step4.ckpt") and r["skipped"][0][0] == os.fspath(folder / "last.ckpt")
        assert r["resumed_step"] == 6
        assert r["newer_resumed_step"] == 6 and r["newer_setting"] == [7]
        assert "step4.ckpt' was not written" in r["non_finite"]
    assert r1["non_finite_tensor"] == "model.fc1.weight" and "1 NaN" in r1["non_finite"]  # the rank that holds it
    assert r0["newer_warned"]  # rank 0 says which setting the checkpoint lacked
    assert "another rank" in r0["non_finite"]
    assert r0["poisoned_files"] == ["step2.ckpt"] and r0["poisoned_verified"] == "manifest"
    assert r0["full_files"] == ["step2.ckpt", "step2.ckpt.sha256"] and r0["full_verified"] == "sha256"
    assert r0["full_resumed_step"] == r1["full_resumed_step"] == 4


def test_killed_sharded_save_leaves_only_a_hidden_staging_folder_that_the_next_save_removes(tmp_path):
    from lightning_optim.checkpoint_dcp import _move_into_place, _remove_leftovers

    dest = tmp_path / "last.ckpt"
    dest.mkdir()
    (dest / "__0_0.distcp").write_bytes(b"previous")
    write_manifest(dest)
    killed = tmp_path / ".last.ckpt.0badc0de.staging"  # what a save killed mid-write leaves
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"half")
    assert newest_verified_checkpoint(tmp_path).path == dest  # the staging folder is no candidate
    _remove_leftovers(dest)
    assert files(tmp_path) == ["last.ckpt"]
    new = tmp_path / ".last.ckpt.12345678.staging"
    new.mkdir()
    (new / "__0_0.distcp").write_bytes(b"new")
    write_manifest(new)
    _move_into_place(new, dest, "12345678")
    assert files(tmp_path) == ["last.ckpt"] and (dest / "__0_0.distcp").read_bytes() == b"new"
    assert verify_checkpoint(dest) == "manifest"


def test_failed_folder_rename_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    import lightning_optim.checkpoint_dcp as dcp

    dest, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.abcd1234.staging"
    for folder, content in ((dest, b"previous"), (staging, b"new")):
        folder.mkdir()
        (folder / "__0_0.distcp").write_bytes(content)
        write_manifest(folder)
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(src) == os.fspath(staging):
            _raise_enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(dcp.os, "replace", replace)
    with pytest.raises(OSError):
        dcp._move_into_place(staging, dest, "abcd1234")
    monkeypatch.undo()
    assert (dest / "__0_0.distcp").read_bytes() == b"previous" and verify_checkpoint(dest) == "manifest"
    assert files(tmp_path) == [".last.ckpt.abcd1234.staging", "last.ckpt"]  # the caller removes the staging

"""Distributed faults in a recipe run: a rank that is stopped (SIGSTOP) or killed (SIGKILL) mid-training makes
the run fail within ``--dist_timeout`` (not Lightning's 30-minute default), with a message naming the collective,
and a non-zero exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.recipe_runner import RECIPES, env, size_override

TIMEOUT_S = 8


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _start(tmp_path: Path, cache: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "run.log"
    args = [*size_override(cache, steps=100000, global_batch=4), "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--dist_timeout", str(TIMEOUT_S), "--trainer.enable_progress_bar", "false",
            "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false", "--data.val_every_n_steps", "100000",
            "--trainer.log_every_n_steps", "1", "--trainer.logger", "false", "--norms.enabled", "false"]
    proc = subprocess.Popen([sys.executable, str(RECIPES / "tiny.py"), *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env(), cwd=tmp_path)
    return proc, log


def _wait_training(proc: subprocess.Popen, log: Path, limit: float = 240) -> int:
    """The rank-1 child's pid, once both ranks are past a few optimizer steps."""
    t0 = time.time()
    while time.time() - t0 < limit:
        assert proc.poll() is None, log.read_text()[-3000:]
        kids = _children(proc.pid)
        if kids and "run:\n  devices" in log.read_text():
            time.sleep(3)  # a few steps
            return kids[0]
        time.sleep(0.5)
    raise AssertionError("training did not start: " + log.read_text()[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_stuck_or_dead_rank_fails_the_run_within_the_timeout(sig, tmp_path, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("fault_cache"))
    # build the data cache once in one process, so the two ranks only read it
    subprocess.run([sys.executable, str(RECIPES / "tiny.py"), *size_override(cache, steps=1), "--trainer.logger",
                    "false", "--trainer.enable_progress_bar", "false", "--checkpoint.save_last", "false",
                    "--checkpoint.save_top_k", "0"], env=env(), cwd=tmp_path, check=True, capture_output=True,
                   timeout=300)
    proc, log = _start(tmp_path, cache)
    child = _wait_training(proc, log)
    os.kill(child, sig)
    stopped_at = time.time()
    try:
        proc.wait(timeout=TIMEOUT_S + 90)
        elapsed = time.time() - stopped_at
    finally:
        for pid in [child, proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert elapsed < TIMEOUT_S + 90, elapsed
    if sig == signal.SIGSTOP:  # the survivor waited out the timeout, and says where
        assert elapsed >= TIMEOUT_S - 4  # the survivor may already have been waiting for a step when it stopped
        assert f"rank 0 of 2 gave up after {TIMEOUT_S:g} s waiting in" in text, text[-3000:]


@pytest.mark.slow
def test_sigkill_while_saving_to_another_filesystem_then_resume_last(tmp_path, tmp_path_factory):
    """Checkpoints every step into /dev/shm while $TMPDIR is on another filesystem; the run is SIGKILLed at an
    arbitrary moment (often inside a save); ``--ckpt_path last`` then resumes from a verified checkpoint, and
    nothing is left in $TMPDIR."""
    shm = Path("/dev/shm")
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(temp).st_dev:
        pytest.skip("needs /dev/shm on a different filesystem from the temp directory")
    cache = str(tmp_path_factory.mktemp("kill_cache"))
    ckpt_dir = Path(f"/dev/shm/lo_kill_{os.getpid()}")
    args = [*size_override(cache, steps=100000), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
            "false", "--checkpoint.every_n_train_steps", "1", "--checkpoint.dirpath", str(ckpt_dir),
            "--data.val_every_n_steps", "100000", "--model.n_embd", "128", "--model.n_head", "4"]
    run_env = {**env(), "TMPDIR": str(temp)}
    log = tmp_path / "run.log"
    try:
        proc = subprocess.Popen([sys.executable, str(RECIPES / "tiny.py"), *args], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=run_env, cwd=tmp_path)
        t0 = time.time()
        while len(list(ckpt_dir.glob("step*.ckpt"))) < 3 and time.time() - t0 < 300:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(0.37)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps = [p for p in ckpt_dir.glob("*.ckpt")]
        assert steps, log.read_text()[-3000:]
        newest = max(int(p.stem[4:]) for p in ckpt_dir.glob("step*.ckpt"))
        resume_args = [*size_override(cache, steps=newest + 2), *args[len(size_override(cache)):], "--ckpt_path", "last"]
        resumed = subprocess.run([sys.executable, str(RECIPES / "tiny.py"), *resume_args], capture_output=True,
                                 text=True, env=run_env, cwd=tmp_path, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming from" in resumed.stdout + resumed.stderr
        staged = [p for p in temp.iterdir() if not p.name.startswith("torchinductor")]  # the compiler's own cache
        assert not staged, staged  # no checkpoint bytes were staged in the system temp directory
    finally:
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)

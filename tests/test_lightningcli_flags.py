"""LightningCLI's own --optimizer / --lr_scheduler with lightning_optim's classes: examples/lightningcli_optimizer.py
run as a user would, in a subprocess (about 10 s each on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_optim.schedules import WSDSchedule

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightningcli_optimizer.py"
WSD = dict(total_steps=6, decay_fraction=0.5, cooldown_shape="linear")  # f(4) = 2/3: neither 1 nor 0


def _fit(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "fit", "--trainer.max_steps", "4",
                           "--model.report", str(report), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, (json.loads(report.read_text()) if report.exists() else None)


@pytest.fixture(scope="module")
def muon_wsd(tmp_path_factory):
    """Muon from --optimizer (a plain parameter list, a 10000-token vocabulary), PerStepLR(wsd) from
    --lr_scheduler, 2 batches per epoch: 4 steps over 2 epochs."""
    proc, report = _fit(tmp_path_factory.mktemp("muon"),
                        "--optimizer", "lightning_optim.optim.muon.Muon", "--optimizer.lr", "0.02",
                        "--lr_scheduler", "lightning_optim.lr_scheduler.PerStepLR", "--lr_scheduler.schedule", "wsd",
                        "--lr_scheduler.total_steps", "6", "--lr_scheduler.decay_fraction", "0.5",
                        "--lr_scheduler.cooldown_shape", "linear", "--model.num_batches", "2",
                        "--model.vocab_size", "10000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, report


def test_lr_scheduler_flag_steps_per_optimizer_step(muon_wsd):
    _, report = muon_wsd
    assert report["optimizer"] == "Muon" and report["global_step"] == 4
    factor = WSDSchedule(**WSD)(4)
    assert factor == pytest.approx(2 / 3)
    assert len(report["groups"]) == 2  # the matrix and the AdamW part
    for group in report["groups"]:  # two epoch ends passed: a per-epoch step would have left f(2) or f(6)
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor), group


def test_optimizer_flag_routes_embedding_sized_matrices_of_a_plain_list_to_adamw_and_says_so(muon_wsd):
    proc, report = muon_wsd
    rules = {(tuple(row["shape"]), row["rule"]) for row in report["routing"]}
    assert rules == {((16, 16), "matrix"), ((10000, 16), "adamw"), ((16,), "adamw")}  # embedding, head: AdamW
    warned = [line for line in proc.stderr.splitlines() if "Muon" in line and "(10000, 16)" in line]
    assert warned, proc.stderr[-3000:]  # the unnamed list is routed by shape, and the run says so


def test_sophia_without_its_callback_fails_at_the_first_step_naming_it(tmp_path):
    proc, report = _fit(tmp_path, "--optimizer", "lightning_optim.optim.sophia.SophiaG")
    assert proc.returncode != 0 and report is None
    assert "RuntimeError: SophiaG is stepped inside a Lightning Trainer without the SophiaHessian callback" in proc.stderr
    assert "--trainer.callbacks+=lightning_optim.callbacks.SophiaHessian" in proc.stderr


def test_schedule_free_with_its_callback_from_the_command_line_trains(tmp_path):
    proc, report = _fit(tmp_path, "--optimizer", "lightning_optim.optim.sf_adamw.AdamWScheduleFree",
                        "--optimizer.warmup_steps", "2",
                        "--trainer.callbacks+=lightning_optim.callbacks.ScheduleFreeSwitch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["optimizer"] == "AdamWScheduleFree" and report["global_step"] == 4
    assert report["train_mode"] is False  # the switch left the average x in the model after fit

"""The lightning-optim console command: list, info, memory."""

import subprocess
import sys

import pytest

from lightning_optim.cli import main


def test_memory_7b_adamw_fp32_is_112_gb(capsys):
    assert main(["memory", "--params", "7e9", "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    rows = [l.strip() for l in out.splitlines() if l.startswith("  ")]
    for label in ("parameters ", "gradients ", "state: exp_avg ", "state: exp_avg_sq "):
        line = next(l for l in rows if l.startswith(label))
        assert "28.00 GB" in line, line
    assert "112.00 GB" in next(l for l in rows if l.startswith("total"))


def test_memory_dtypes_and_sharding(capsys):
    assert main(["memory", "--params", "1e9", "--optimizer", "sgd", "--weight-dtype", "bf16",
                 "--state-dtype", "fp32", "--shard", "4"]) == 0
    out = capsys.readouterr().out
    # per rank: 2 GB / 4 weights, 2 GB / 4 grads, 4 GB / 4 momentum → 2 GB in all
    assert "500.00 MB" in out and "1.00 GB" in out and "2.00 GB" in out


def test_list_and_info(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out and "2×P" in out and "wsd" in out and "inverse-sqrt" in out
    assert main(["info", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "weight_decay = 0.1" in out and "arXiv 1711.05101" in out


def test_errors_are_reported_not_raised(capsys):
    assert main(["info", "adamww"]) == 2
    assert "Did you mean 'adamw'" in capsys.readouterr().err
    assert main(["memory", "--optimizer", "adamw"]) == 2


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "lightning_optim.cli", "memory", "--params", "7e9"],
                         capture_output=True, text=True, check=True).stdout
    assert "112.00 GB" in out

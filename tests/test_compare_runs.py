"""``lightning-optim compare-runs`` on real event files: two short recipe runs (AdamW, Lion), then one command."""

from __future__ import annotations

import pytest

from lightning_optim.cli import main as cli_main
from tests.recipe_runner import RECIPES, run_recipe, size_override


def test_compare_runs_reads_recipe_logs_and_writes_png_and_table(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("adamw", "lion"):
        run_recipe(RECIPES / "tiny.py", [*size_override(cache, steps=6), "--optim.name", name,
                                         "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
                                         "--trainer.enable_progress_bar", "false", "--data.val_every_n_steps", "3",
                                         "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"])
    assert cli_main(["compare-runs", "lightning_logs/llama-tiny", "--out", "cmp"]) == 0
    png, md = tmp_path / "cmp" / "compare-runs.png", tmp_path / "cmp" / "compare-runs.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = [line for line in md.read_text().splitlines() if line.startswith("| version_")]
    assert len(rows) == 2, md.read_text()
    by_optimizer = {row.split("|")[2].strip(): row.split("|") for row in rows}
    assert set(by_optimizer) == {"adamw", "lion"}
    for cells in by_optimizer.values():
        assert cells[3].strip() == "6"  # steps
        assert cells[4].strip() == f"{6 * 4 * 32:,}"  # tokens: 6 steps x 4 sequences x 32 tokens
        assert float(cells[5]) > 0 and float(cells[6]) > 0  # final train and val loss
    assert "wrote" in capsys.readouterr().out


def test_compare_runs_names_a_folder_without_runs(tmp_path, capsys):
    assert cli_main(["compare-runs", str(tmp_path)]) == 2
    assert "no TensorBoard event file" in capsys.readouterr().err

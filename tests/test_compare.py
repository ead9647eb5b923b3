"""benchmarks/compare.py on its smoke configuration: the table, the PNG and per-run JSON; an interrupted
comparison completes the missing runs only."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compare_module():
    if "compare_bench" in sys.modules:
        return sys.modules["compare_bench"]
    spec = importlib.util.spec_from_file_location("compare_bench", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_compare_smoke_writes_table_png_and_resumes(tmp_path: Path) -> None:
    compare = _compare_module()
    out, results = tmp_path / "out", tmp_path / "results"
    kwargs = dict(optimizers=["adamw", "lion"], out_dir=out, results_dir=results, verbose=False)
    records = compare.compare("smoke", **kwargs)
    assert [r["run"] for r in records] == ["adamw__cosine", "lion__cosine"]
    for r in records:
        assert r["status"] == "ok", r.get("traceback", r["status"])
        assert r["steps"] == compare.CONFIGS["smoke"].steps and len(r["val"]) == 2
        assert math.isfinite(r["final_val_loss"]) and r["best_val_loss"] <= r["final_val_loss"]
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["skipped_steps"] == 0
        assert r["state_bytes"] == pytest.approx(r["state_bytes_estimate"], rel=0.01)
    table = (results / "compare-smoke.md").read_text()
    assert "| adamw | cosine |" in table and "| lion | cosine |" in table
    assert (results / "compare-smoke.png").stat().st_size > 10_000
    assert len(list((out / "tb").glob("*/events.out.tfevents.*"))) == 2  # TensorBoard runs side by side

    # interrupt: one run's result is lost; rerunning completes that one only
    kept = out / "runs" / "adamw__cosine.json"
    before = kept.stat().st_mtime_ns
    (out / "runs" / "lion__cosine.json").unlink()
    again = compare.compare("smoke", **kwargs)
    assert kept.stat().st_mtime_ns == before
    assert json.loads((out / "runs" / "lion__cosine.json").read_text())["status"] == "ok"
    lion_before = next(r for r in records if r["optimizer"] == "lion")
    lion_after = next(r for r in again if r["optimizer"] == "lion")
    assert lion_after["final_val_loss"] == pytest.approx(lion_before["final_val_loss"], abs=1e-5)  # reproducible


def test_plan_runs_schedule_free_and_extras() -> None:
    compare = _compare_module()
    cfg = compare.CONFIGS["cpu"]
    pairs = compare.plan_runs(cfg, ["adamw", "sf-adamw"], None)
    assert ("sf-adamw", "constant") in pairs and ("adamw", "cosine") in pairs and ("adamw", "wsd") in pairs
    assert compare.plan_runs(cfg, ["adamw"], ["cosine", "linear"]) == [("adamw", "cosine"), ("adamw", "linear")]
    with pytest.raises(ValueError, match="unknown optimizer"):
        compare.plan_runs(cfg, ["adamww"], None)
    assert cfg.steps % cfg.val_every_n_steps == 0

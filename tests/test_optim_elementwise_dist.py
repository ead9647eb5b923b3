"""FSDP2 on 2 CPU processes: sharded result == single-process result (Prodigy's one all-reduce of the stacked
sums, MARS's sharded norms, ADOPT, SF-AdamW)."""

import json
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


def test_fsdp2_matches_single_process(tmp_path):
    out = tmp_path / "elem.json"
    run_distributed(Path(__file__).parent / "dist_scripts" / "elem_fsdp2.py", str(out), nprocs=2, timeout=300)
    result = json.loads(out.read_text())
    for name, r in result.items():
        assert r["moved"] > 1e-4, name  # the optimizer did something
        assert r["max_diff"] < 1e-10, (name, r)
    assert result["prodigy"]["d_sharded"] == pytest.approx(result["prodigy"]["d_single"], rel=1e-10)
    assert result["prodigy"]["d_single"] > 1e-6

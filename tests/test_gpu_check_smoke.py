"""``benchmarks/gpu_check.py --smoke`` (the GPU readiness check at toy size on CPU) runs every part and writes
its report, so the script cannot rot between the runs on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Environment", "## GPU tests", "## Step times", "## Training", "## Compiled kernels")


def test_gpu_check_smoke_writes_every_section(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_OPTIM_COMPILE"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    report = tmp_path / "gpu_check.md"
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for section in SECTIONS:
        assert section in text, f"{section} missing from the report"
    body = {s: text.split(s, 1)[1].split("\n## ", 1)[0] for s in SECTIONS}
    failed = [s for s, b in body.items() if "Status: passed" not in b]
    assert not failed, f"parts failed: {failed}\n{text[-4000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lion |" in body["## Step times"] and "| muon |" in body["## Step times"]
    assert "| 3 |" in body["## Training"]  # 3 steps trained
    assert "| lion | bfloat16 |" in body["## Compiled kernels"]
    steps = (tmp_path / "gpu_step_time.md").read_text()
    assert "| optimizer | ours ms |" in steps and "| adopt |" in steps

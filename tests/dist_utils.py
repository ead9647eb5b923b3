"""Run a test script under ``torch.distributed.run`` with N CPU processes on gloo.

Lightning detects the torchrun environment (TorchElasticEnvironment) and does not re-launch, so a script can
build ``Trainer(accelerator="cpu", devices=2, strategy="ddp" | ModelParallelStrategy(...))`` directly. The
script writes its results (tensors, JSON) under ``out_dir``; the test reads and asserts on them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(script: str | Path, *args: str, nprocs: int = 2, timeout: float = 240, env: dict | None = None) -> str:
    """Launch ``script`` on ``nprocs`` local processes; raise with the full log if any rank fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed run failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout

"""Run a test script under ``torch.distributed.run`` with N CPU processes on gloo, and end it cleanly.

Lightning detects the torchrun environment (TorchElasticEnvironment) and does not re-launch, so a script can
build ``Trainer(accelerator="cpu", devices=2, strategy="ddp" | ModelParallelStrategy(...))`` directly. The
script writes its results (tensors, JSON) under ``out_dir``; the test reads and asserts on them.

Teardown. A script ends with :func:`finish`: (1) its results are already written and closed; (2) the number
of functional collectives still unwaited on this rank is recorded (it must be 0: such work would still hold
tensors on gloo's worker threads); (3) ``barrier`` so no rank tears down while another still communicates;
(4) ``destroy_process_group``; (5) a ``done_rank<r>.json`` marker, written atomically; (6) ``os._exit(0)``,
which leaves without Python's interpreter finalisation. Step 6 makes the exit immune to an abort
at interpreter finalisation (``terminate called without an active exception``, SIGABRT, after the script's
last line; seen under load): a gloo worker thread that frees a tensor with a Python object after the main
thread has begun finalising must take the GIL, and a thread taking the GIL during finalisation is ended with
``pthread_exit``, whose forced unwinding through C++ ``noexcept`` frames calls ``std::terminate``
(pytorch/pytorch#190489). By then the results are complete and the group is destroyed, so nothing a test
checks depends on finalisation. :func:`run_distributed` still fails the test if a rank exits non-zero, and
checks every rank's marker when ``out_dir`` is given.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

DONE = "done_rank{rank}.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(script: str | Path, *args: str, nprocs: int = 2, timeout: float = 240, env: dict | None = None,
                    out_dir: str | Path | None = None) -> str:
    """Launch ``script`` on ``nprocs`` local processes; raise with the full log if any rank fails.

    With ``out_dir`` (a script that ends with :func:`finish`), every rank must also have left its
    ``done_rank<r>.json`` marker there with no unwaited collectives."""
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
    if out_dir is not None:
        check_done(out_dir, nprocs, proc.stderr)
    return proc.stdout


def check_done(out_dir: str | Path, nprocs: int, log: str = "") -> None:
    """Every rank finished through :func:`finish`, with no functional collective left unwaited."""
    for rank in range(nprocs):
        path = Path(out_dir) / DONE.format(rank=rank)
        if not path.exists():
            raise RuntimeError(f"rank {rank} did not reach finish() ({path} missing):\n{log[-6000:]}")
        pending = json.loads(path.read_text())["pending_works"]
        if pending:
            raise RuntimeError(f"rank {rank} ended with {pending} unwaited functional collective(s) ({path})")


def finish(out_dir: str | Path) -> None:
    """End a torchrun test script (see the module docstring); call it after every result is written. Never returns."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    pending = int(torch._C._distributed_c10d._get_work_registry_size())
    dist.barrier()
    dist.destroy_process_group()
    path = Path(out_dir) / DONE.format(rank=rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pending_works": pending}))
    os.replace(tmp, path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

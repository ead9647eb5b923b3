"""Run a test script under ``torch.distributed.run`` with N CPU processes on gloo, and end it cleanly.

Lightning detects the torchrun environment (TorchElasticEnvironment) and does not re-launch, so a script can
build ``Trainer(accelerator="cpu", devices=2, strategy="ddp" | ModelParallelStrategy(...))`` directly. The
script writes its results (tensors, JSON) under ``out_dir``; the test reads and asserts on them.

Teardown. A script ends with :func:`finish`: (1) its results are already written and closed; (2) the number
of functional collectives still unwaited on this rank is recorded (it must be 0: such work would still hold
tensors on gloo's worker threads); (3) ``barrier`` so no rank tears down while another still communicates;
(4) ``destroy_process_group``; (5) a ``done_rank<r>.json`` marker, written atomically; (6) ``os._exit(0)``,
which leaves without Python's interpreter finalisation.

Why step 6. The abort seen under load at the very end of 2-rank FSDP2 runs (``terminate called without an
active exception``, SIGABRT, after the script's last line) has the signature of a C++ thread that is still
running while the interpreter finalises: a thread that must take the GIL then (to free a tensor's Python
object) is ended by ``pthread_exit``, whose forced unwinding through ``noexcept`` frames calls
``std::terminate`` (pytorch/pytorch#190489, with a residual race even in guarded builds). What was checked
here (torch 2.13, gloo): after ``destroy_process_group()`` a plain gloo job has no thread left but the main
one, whereas any job that ran ``fully_shard`` forward/backward keeps gloo's ``pt_gloo_runloop`` worker threads
and its ``gloo_tcp_loop`` alive, even after the model, optimizer and mesh are deleted and garbage-collected;
the thread census is identical with no optimizer, AdamW, Muon or SOAP, so the live threads come from FSDP2 /
gloo's teardown, not from this project's optimizers, which issue only synchronous collectives (no
``async_op``; every rank of every run records 0 unwaited functional collectives). The abort itself was not
reproduced here (0 in 168 loaded runs before this protocol: 120 of an FSDP2 muon+soap harness, 30 of
``conf_fsdp2.py muon soap``, 18 of ``muon_dist.py``; ``tests/dist_scripts/teardown_stress.py``), so it is not
tolerated: a non-zero exit still fails the test. Leaving through ``os._exit`` after the marker means those
threads never meet a finalising interpreter; results are complete and the group destroyed by then, so
nothing a test checks depends on finalisation. :func:`run_distributed` fails the test if a rank exits
non-zero, and with ``out_dir`` also if a rank's marker is missing or counts unwaited collectives.
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


def shard_per_block(model, mesh) -> None:
    """``fully_shard`` each of ``model.blocks``, then the root (embeddings, head, final norm): the FSDP2 layout of the
    recipe models (``LanguageModel.configure_model``), on ``mesh`` (1-D: FSDP; 2-D (replicate, shard): HSDP)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


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

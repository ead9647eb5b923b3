"""Launch a torchrun test script many times in parallel (a bounded loop) and count how its runs end.

    python tests/dist_scripts/teardown_stress.py --runs 30 --parallel 6 [--script muon_dist.py] [--nprocs 2]

Not a test (CI never runs it): the tool behind the teardown figures in ``tests/dist_utils.py``. Running
several launches at once loads the machine the way a busy CI runner does. For every run it records the exit
status, whether the log holds ``terminate called without an active exception`` (the abort at exit seen under
load) and whether every rank wrote its ``done_rank<r>.json`` marker (scripts that end through
:func:`tests.dist_utils.finish`), and prints the counts. Each run gets its own output directory under
``--work`` (default: a fresh temporary directory) with the launch's log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SIGNATURE = "terminate called without an active exception"


def one_run(script: Path, out: Path, nprocs: int, timeout: float) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.dist_utils import DONE, free_port

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(out)]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, log = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
    (out / "launch.log").write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    done = all((out / DONE.format(rank=r)).exists() for r in range(nprocs))
    return {"rc": rc, "abort": SIGNATURE in str(log), "done": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", default="muon_dist.py", help="a script in tests/dist_scripts/ (or a path)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    script = Path(args.script) if Path(args.script).exists() else HERE / args.script
    if not script.exists():
        raise SystemExit(f"--script: no such script {args.script!r} (looked in {HERE})")
    if args.runs < 1 or args.parallel < 1:
        raise SystemExit("--runs and --parallel must be >= 1")
    work = args.work or Path(tempfile.mkdtemp(prefix="teardown_stress_"))
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda i: one_run(script, work / f"run{i:03d}", args.nprocs, args.timeout),
                                range(args.runs)))
    tally = Counter((r["rc"], r["abort"], r["done"]) for r in results)
    print(f"{script.name}: {args.runs} runs, {args.parallel} at a time, logs under {work}")
    for (rc, abort, done), n in sorted(tally.items(), key=str):
        print(f"  {n:4d} x exit {rc}, abort signature {'yes' if abort else 'no'}, "
              f"all done markers {'yes' if done else 'no'}")


if __name__ == "__main__":
    main()

"""A ``torch.profiler`` trace of one Muon step under FSDP2 on 2 CPU processes (gloo) with the exchange cut into
its smallest buckets (one matrix per owner rank), to see bucket k+1's all-to-all in flight while bucket k is
orthogonalised.

    python benchmarks/overlap_trace.py            # -> benchmarks/results/overlap_trace.json (chrome://tracing)

Rank 0 profiles its second step (the first initialises the state) and writes the Chrome trace; the Newton–Schulz
of bucket ``k`` is the range ``matrix_dist.newton_schulz[bucket k]`` and the collectives are gloo's
``all_to_all`` ranges. It also prints the order of the exchange's events from ``_matrix_dist.recording()``
(issue / wait / ns / issue_back / wait_back per bucket), the same order tests/test_matrix_overlap.py asserts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lightning_optim import create_optimizer
    from lightning_optim.optim import _matrix_dist as md
    from tests.dist_scripts.muon_dist import batch, loss_of, make_model
    from tests.dist_utils import finish

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = create_optimizer("muon", model, lr=0.02)
    md.BUCKET_MB = 1e-9  # the smallest buckets: one matrix per owner rank
    for s in range(2):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        if s == 0:
            opt.step()
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, md.recording() as ev:
            opt.step()
    if dist.get_rank() == 0:
        prof.export_chrome_trace(str(out / "overlap_trace.json"))
        (out / "overlap_events.json").write_text(json.dumps(ev))
    finish(out)


def main() -> None:
    from tests.dist_utils import run_distributed

    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    run_distributed(Path(__file__), "--worker", str(out), nprocs=2, timeout=300, out_dir=out)
    for f in out.glob("done_rank*.json"):
        f.unlink()
    events = json.loads((out / "overlap_events.json").read_text())
    (out / "overlap_events.json").unlink()
    print(" -> ".join(f"{e}[{k}]" for e, k in events))
    print(f"trace: {out / 'overlap_trace.json'}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
    else:
        main()

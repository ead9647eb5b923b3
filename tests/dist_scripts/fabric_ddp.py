"""2-process Fabric DDP loop with StabilityGuard: a NaN loss on rank 1 only (step 3), a loss spike on rank 0 only
(step 7). Both ranks must drop both steps (the flags are summed over the ranks) and end with identical weights.
Writes ``rank{r}.json`` and ``weights{r}.pt`` under the output directory given as the first argument.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_optim.fabric import StabilityGuard, create_optimizer, create_scheduler
from tests.dist_utils import finish

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def main(out: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = create_optimizer("adamw", model, lr=1e-2)
    sched = create_scheduler("cosine", opt, total_steps=12, warmup_steps=1)
    fmodel, fopt = fabric.setup(model, opt)
    guard = StabilityGuard(fopt, sched, fabric=fabric, max_norm=1.0, window=4, min_history=3, threshold=4.0)
    rank = fabric.global_rank
    skipped, unchanged = [], []
    for step in range(10):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(16, 8, generator=g)
        loss = nn.functional.mse_loss(fmodel(x), x[:, :1].sin())
        if step == 3 and rank == 1:
            loss = loss * float("nan")
        if step == 7 and rank == 0:
            loss = loss * 1000.0
        before = [p.detach().clone() for p in model.parameters()]
        fabric.backward(loss)
        metrics = guard.step(loss)
        if metrics["stability/skipped"]:
            skipped.append(step)
            unchanged.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
    (out / f"rank{rank}.json").write_text(json.dumps({"skipped": skipped, "unchanged": unchanged,
                                                      "nonfinite": guard.nonfinite_steps, "spikes": guard.spike_steps}))
    torch.save([p.detach() for p in model.parameters()], out / f"weights{rank}.pt")
    finish(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""2-process DDP run: a loss spike on rank 1 only (step 20) and a NaN gradient on rank 1 only (step 25).

Both ranks must take the same decisions (skip both steps) and end with identical weights. The detector also
scores the gradient norm, so the NaN gradient is seen by both callbacks: it must be the guard's alone on every rank
(one spike, the step-20 one; one non-finite step). Writes
``rank{r}.json`` and ``weights{r}.pt`` under the output directory given as the first argument.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_optim.callbacks import GradientClipping, LayerNormMonitor, LossSpikeDetector, NonFiniteGuard
from tests.dist_utils import finish
from tests.dist_scripts.stab_common import Probe, TinyLM, all_finite, loader, trainer

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def main(out: Path) -> None:
    L.seed_everything(0)
    model = TinyLM(inject=[{"kind": "loss", "step": 20, "rank": 1}, {"kind": "nan_grad", "step": 25, "rank": 1}])
    detector = LossSpikeDetector(action="skip", window=8, monitor_grad_norm=True)
    guard = NonFiniteGuard()
    probe = Probe([20, 25])
    callbacks = [detector, guard, GradientClipping(max_norm=1.0), LayerNormMonitor(every_n_steps=10), probe]
    t = trainer(callbacks, 30, devices=2, strategy="ddp")
    t.fit(model, loader(batch_size=8))
    rank = t.global_rank

    def unchanged(step: int) -> bool:
        (w0, s0), (w1, s1) = probe.before[step], probe.after[step]
        return all(torch.equal(w0[k], w1[k]) for k in w0) and all(torch.equal(s0[k], s1[k]) for k in s0)

    result = {
        "spikes": detector.spikes, "skipped": detector.skipped,
        "spike_step": detector.events[0]["step"] if detector.events else None,
        "nonfinite": guard.total,
        "finite": all_finite(model.parameters()),
        "unchanged_20": unchanged(20), "unchanged_25": unchanged(25),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"weights{rank}.pt")
    finish(out)  # results written: barrier, destroy the group, leave without interpreter finalisation


if __name__ == "__main__":
    main(Path(sys.argv[1]))

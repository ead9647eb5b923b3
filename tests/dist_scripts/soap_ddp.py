"""torchrun script: SOAP and Sophia-G under Lightning DDP on 2 CPU processes (gloo).

Writes ``{out_dir}/{name}_rank{r}.pt`` (final weights) and the steps of Sophia's Hessian passes; the test
compares them with a single-process run and across ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist_scripts.soap_common import fit  # noqa: E402
from tests.dist_utils import finish  # noqa: E402

STEPS = 12


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    for name, extra in (("soap", {"precondition_frequency": 3, "max_precond_dim": 16}), ("sophia", {"hessian_interval": 5})):
        model, hess = fit(name, STEPS, world=2, strategy="ddp", **extra)
        rank = torch.distributed.get_rank()
        torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "passes": list(hess.passes)}, Path(out_dir) / f"{name}_rank{rank}.pt")
    finish(out_dir)


if __name__ == "__main__":
    main(sys.argv[1])

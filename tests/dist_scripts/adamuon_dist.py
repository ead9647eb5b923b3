"""AdaMuon on 2 CPU ranks, one launch: the Muon family's harness (``muon_dist.py``) run for ``adamuon`` only.

    torchrun --nproc_per_node=2 tests/dist_scripts/adamuon_dist.py OUT_DIR

DDP replicas (the Newton–Schulz work split between the ranks) and Lightning FSDP2 (``fully_shard`` per block,
DTensor state, the global ‖Ô‖_F all-reduced), each against the same steps in one process; the files and
``report.json`` are those ``muon_dist.py`` writes, read by ``tests/test_optim_adamuon.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist_scripts import muon_dist  # noqa: E402

muon_dist.NAMES = ["adamuon"]
muon_dist.HP["adamuon"] = {"lr": 3e-3}

if __name__ == "__main__":
    muon_dist.main()

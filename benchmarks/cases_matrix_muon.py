"""Step-time cases for the Muon family on the 23M GPT shape (6 layers, width 512, vocab 8192).

``CASES`` (``Case(label, ours, peers, matrices_only)``) is read by ``benchmarks/step_time.py``, which discovers
``benchmarks/cases_*.py``. The ``matrices_only`` cases compare with torch.optim.Muon and heavyball's Muon on the
matrix parameters only (the issue's 478 ms / 483 ms figures); the ``*-hybrid`` cases time the whole model in
one optimizer object. ``python benchmarks/cases_matrix_muon.py`` runs just these cases through step_time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_case import Case  # noqa: E402
from lightning_optim import create_optimizer  # noqa: E402


def _ours(name: str, **hp: Any) -> Callable[[list], Any]:
    """Matrices-only lists route by ndim; whole-model lists (step_time.gpt_params: token and position embeddings
    first) send the two embeddings and the 1-D parameters to the internal AdamW, as the module rules would."""

    def build(params: list) -> Any:
        if all(p.ndim == 2 for p in params):
            return create_optimizer(name, [{"params": params, "matrix": True, "name": "matrix"}], **hp)
        mats = [p for p in params[2:] if p.ndim == 2]
        rest = params[:2] + [p for p in params[2:] if p.ndim != 2]
        return create_optimizer(name, [{"params": mats, "matrix": True, "name": "matrix"},
                                       {"params": rest, "matrix": False, "name": "no_decay", "weight_decay": 0.0}],
                                **hp)

    return build


def _torch_muon(params: list) -> Any:
    return torch.optim.Muon(params, lr=0.01, weight_decay=0.0)


def _heavyball_muon(params: list) -> Any:
    import heavyball

    return heavyball.Muon(params, lr=0.01)


_PEERS = {"torch.optim.Muon": _torch_muon, "heavyball Muon": _heavyball_muon}

CASES = [
    Case("muon", _ours("muon"), dict(_PEERS), matrices_only=True),
    Case("muon-polar-express", _ours("muon", ns_coefficients="polar_express"), dict(_PEERS), matrices_only=True),
    Case("normuon", _ours("normuon"), dict(_PEERS), matrices_only=True),
    Case("sf-normuon", _ours("sf-normuon"), dict(_PEERS), matrices_only=True),
    Case("muon-hybrid", _ours("muon")),
    Case("d-muon-hybrid", _ours("d-muon")),
]


if __name__ == "__main__":  # the cases alone, through the shared runner
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import step_time

    step_time.main(["--only", ",".join(c.label for c in CASES), "--threads", "2",
                    "--out", str(Path(__file__).parent / "results" / "step_time_matrix_muon")])

"""Step-time cases for SOAP on the 23M GPT shape (6 layers, width 512, vocab 8192), read by
``benchmarks/step_time.py`` (it discovers ``benchmarks/cases_*.py`` modules exposing ``CASES``).

Every implementation gets the same algorithmic settings: lr 1e-3, betas (0.9, 0.999), shampoo_beta 0.999,
weight decay 0.1, a refresh every 10 steps, max_precond_dim 10000 (so the 8192-row embedding carries an
8192×8192 factor, as the reference and pytorch-optimizer do by default), no dimension merging. heavyball's
precondition-frequency schedule is switched off so it refreshes every 10 steps like the others. step_time.py
reports the median step, i.e. a step without a refresh; the refresh every 10 steps is timed separately by
``python benchmarks/cases_matrix_soap.py --refresh``.

    python benchmarks/step_time.py --only soap --out benchmarks/results/step_time_soap
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_optim import create_optimizer  # noqa: E402

HP = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)


@dataclass
class Case:
    """The record benchmarks/step_time.py reads: ``ours``/``peers`` build an optimizer from a parameter list."""

    label: str
    ours: Callable[[list], Any]
    peers: dict[str, Callable[[list], Any]] = field(default_factory=dict)
    matrices_only: bool = False


class _KeepGrads:
    """step_time.py sets each ``p.grad`` once; heavyball's step sets ``p.grad = None`` afterwards, so every later
    step would time an empty loop (0.5 ms). This wrapper puts the same gradients back before each step (a
    pointer assignment per parameter), for every implementation alike."""

    def __init__(self, opt: Any, params: list) -> None:
        self.opt, self.params, self.grads = opt, params, [p.grad for p in params]

    def step(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.opt.step()


def _keep(build: Callable[[list], Any]) -> Callable[[list], Any]:
    return lambda params: _KeepGrads(build(params), params)


def _ours(params: list) -> Any:
    return create_optimizer("soap", params, shampoo_beta=0.999, precondition_frequency=10, max_precond_dim=10000,
                            **HP)


def _pytorch_optimizer(params: list) -> Any:
    import pytorch_optimizer

    return pytorch_optimizer.SOAP(params, shampoo_beta=0.999, precondition_frequency=10,
                                  max_precondition_dim=10000, **HP)


def _heavyball(params: list) -> Any:
    import heavyball

    return heavyball.SOAP(params, shampoo_beta=0.999, precondition_frequency=10, max_precond_dim=10000,
                          merge_dims=False, use_precond_schedule=False, **HP)


_PEERS = {"heavyball SOAP": _keep(_heavyball), "pytorch-optimizer SOAP": _keep(_pytorch_optimizer)}

CASES = [
    Case("soap", _keep(_ours), dict(_PEERS)),
    Case("soap", _keep(_ours), dict(_PEERS), matrices_only=True),
]


def _refresh_times(threads: int = 2) -> None:
    """Mean step time over 10 steps (one refresh) for each implementation, after the initialising step."""
    import time

    import torch

    from benchmarks.step_time import gpt_params

    torch.set_num_threads(threads)
    for name, build in [("ours", _ours), *_PEERS.items()]:
        ps = gpt_params()
        opt = _keep(build)(ps)
        opt.step()  # eigh initialisation (8192×8192 included)
        opt.step()
        t0 = time.perf_counter()
        for _ in range(10):
            opt.step()
        print(f"{name}: {(time.perf_counter() - t0) / 10 * 1e3:.0f} ms/step averaged over 10 steps incl. 1 refresh",
              flush=True)


if __name__ == "__main__":
    if "--refresh" in sys.argv:
        _refresh_times()
    else:
        from benchmarks import step_time

        step_time.main(["--only", "soap", "--out", str(Path(__file__).parent / "results" / "step_time_soap"),
                        *[a for a in sys.argv[1:]]])

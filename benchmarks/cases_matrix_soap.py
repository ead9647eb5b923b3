"""Step-time cases for SOAP on the 23M GPT shape (6 layers, width 512, vocab 8192), read by
``benchmarks/step_time.py`` (it discovers ``benchmarks/cases_*.py`` modules exposing ``CASES``).

Every implementation gets the same algorithmic settings: lr 1e-3, betas (0.9, 0.999), shampoo_beta 0.999,
weight decay 0.1, a refresh every 10 steps, max_precond_dim 10000 (so the 8192-row embedding carries an
8192×8192 factor, as the reference and pytorch-optimizer do by default), no dimension merging. heavyball's
precondition-frequency schedule is switched off so it refreshes every 10 steps like the others. step_time.py
reports the median step, i.e. a step without a refresh; the refresh every 10 steps is timed separately by
``python benchmarks/cases_matrix_soap.py --refresh [--matrices]``.

Cases and what each implementation runs:

* ``soap`` (whole model, and ``matrices_only``): every implementation as shipped, all matmuls float32 — ours with
  the default ``matmul_dtype=None``, heavyball's ``SOAP`` (einsum projections on float32 state), pytorch-optimizer's
  ``SOAP`` (tensordot projections, float32).
* ``soap-bf16mm`` (``matrices_only``, and the whole model): ours with ``matmul_dtype="bfloat16"`` (the six
  per-step matmuls per matrix — ``G·Gᵀ``, ``Gᵀ·G``, ``Q_Lᵀ·G·Q_R``, ``Q_L·X·Q_Rᵀ`` — take bfloat16 inputs, results
  cast back to float32; state, eigh/QR refreshes float32). Peers: the two float32 ones above; heavyball with its
  own low-precision option ``storage_dtype="bfloat16"`` (bfloat16 Adam moments — its projections promote to
  float32, so its matmuls stay float32; pytorch-optimizer's SOAP has no precision option); and, so the
  comparison with low-precision matmuls is like for like, heavyball's and pytorch-optimizer's SOAP stepped under
  ``torch.set_float32_matmul_precision("medium")`` (torch's documented switch letting float32 matmuls compute in
  bfloat16 internally — on this CPU oneDNN/AMX — set only around their step and restored after; it also applies
  to their refresh's ``GG·Q`` product, not to eigh/QR). Timing only for pytorch-optimizer that way: it rotates m
  back and forth every step, and in bfloat16 m and v then disagree in the factors' null directions, so
  m/sqrt(v) blows up (a 64×32 matrix with a repeated gradient moves 0.5 per step at lr 1e-3 instead of 0.0025).

    python benchmarks/step_time.py --only soap,soap-bf16mm --out benchmarks/results/step_time_soap
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_case import Case  # noqa: E402
from lightning_optim import create_optimizer  # noqa: E402

HP = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)


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


class _Bf16Matmuls:
    """Steps ``opt`` under ``torch.set_float32_matmul_precision("medium")`` (float32 matmuls may compute in
    bfloat16), restoring the previous setting afterwards."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt

    def step(self) -> None:
        import torch

        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
        try:
            self.opt.step()
        finally:
            torch.set_float32_matmul_precision(before)


def _keep(build: Callable[[list], Any]) -> Callable[[list], Any]:
    return lambda params: _KeepGrads(build(params), params)


def _bf16_matmuls(build: Callable[[list], Any]) -> Callable[[list], Any]:
    return lambda params: _Bf16Matmuls(build(params))


def _ours(params: list, **extra: Any) -> Any:
    return create_optimizer("soap", params, shampoo_beta=0.999, precondition_frequency=10, max_precond_dim=10000,
                            **HP, **extra)


def _ours_bf16(params: list) -> Any:
    return _ours(params, matmul_dtype="bfloat16")


def _pytorch_optimizer(params: list) -> Any:
    import pytorch_optimizer

    return pytorch_optimizer.SOAP(params, shampoo_beta=0.999, precondition_frequency=10,
                                  max_precondition_dim=10000, **HP)


def _heavyball(params: list, **extra: Any) -> Any:
    import heavyball

    return heavyball.SOAP(params, shampoo_beta=0.999, precondition_frequency=10, max_precond_dim=10000,
                          merge_dims=False, use_precond_schedule=False, **HP, **extra)


def _heavyball_bf16_storage(params: list) -> Any:
    return _heavyball(params, storage_dtype="bfloat16")


_PEERS = {"heavyball SOAP": _keep(_heavyball), "pytorch-optimizer SOAP": _keep(_pytorch_optimizer)}
_PEERS_LOW = {
    **_PEERS,
    "heavyball SOAP storage bf16": _keep(_heavyball_bf16_storage),
    "heavyball SOAP + torch bf16 matmuls": _bf16_matmuls(_keep(_heavyball)),
    "pytorch-optimizer SOAP + torch bf16 matmuls": _bf16_matmuls(_keep(_pytorch_optimizer)),
}

CASES = [
    Case("soap", _keep(_ours), dict(_PEERS)),
    Case("soap", _keep(_ours), dict(_PEERS), matrices_only=True),
    Case("soap-bf16mm", _keep(_ours_bf16), dict(_PEERS_LOW)),
    Case("soap-bf16mm", _keep(_ours_bf16), dict(_PEERS_LOW), matrices_only=True),
]


def _refresh_times(threads: int = 2) -> None:
    """Mean step time over 10 steps (one refresh) for each implementation, after the initialising step
    (``--matrices``: the 24 hidden matrices only, as the ``matrices_only`` cases)."""
    import time

    import torch

    from benchmarks.step_time import gpt_params

    torch.set_num_threads(threads)
    for name, build in [("ours", _ours), ("ours bf16 matmuls", _ours_bf16), *_PEERS_LOW.items()]:
        ps = gpt_params(matrices_only="--matrices" in sys.argv)
        opt = build(ps) if name in _PEERS_LOW else _keep(build)(ps)
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

        step_time.main(["--only", "soap,soap-bf16mm", "--out", str(Path(__file__).parent / "results" / "step_time_soap"),
                        *[a for a in sys.argv[1:]]])

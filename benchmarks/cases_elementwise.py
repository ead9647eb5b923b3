"""Step-time cases for the elementwise family: ours against every installed peer of the same algorithm.

``CASES`` is read by ``benchmarks/step_time.py`` (every ``benchmarks/cases_*.py`` module is). Each record:
``label``, ``ours`` (params → optimizer), ``peers`` (name → params → optimizer, built only if the package
imports), ``matrices_only`` (peers that only take matrices get the matrices; ours gets the same set).

A plain label (``lion``) is ours as a user gets it: ``create_optimizer(name, params)`` with no options, i.e.
``compiled="auto"`` (the compiled kernels wherever a compiler is present). ``-eager`` runs ours with
``compiled=False`` (the foreach path); ``-bf16state`` the default path with ``state_dtype="bfloat16"``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from lightning_optim import create_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_case import Case  # noqa: E402


def _peer(module: str, attr: str, **kw: Any) -> Callable[[list], Any]:
    def build(params: list) -> Any:
        cls = getattr(importlib.import_module(module), attr)
        opt = cls(params, **kw)
        if hasattr(opt, "train") and "schedule" in (module + attr).lower() or attr == "SFAdamW":
            opt.train()
        return opt

    build.module = module  # type: ignore[attr-defined]
    return build


def _ours(name: str, **kw: Any) -> Callable[[list], Any]:
    return lambda params: create_optimizer(name, params, **kw)


def _fused_adamw(params: list) -> Any:
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


CASES = [
    Case("lion", _ours("lion"), {
        "lion-pytorch": _peer("lion_pytorch", "Lion", lr=1e-3, weight_decay=0.1),
        "pytorch-optimizer": _peer("pytorch_optimizer", "Lion", lr=1e-3, weight_decay=0.1),
    }),
    Case("signum", _ours("signum"), {
        "pytorch-optimizer SignSGD": _peer("pytorch_optimizer", "SignSGD", lr=1e-3, momentum=0.95, weight_decay=0.1),
    }),
    Case("adopt", _ours("adopt"), {
        "heavyball": _peer("heavyball", "ADOPT", lr=1e-3, weight_decay=0.1),
        "pytorch-optimizer": _peer("pytorch_optimizer", "ADOPT", lr=1e-3, weight_decay=0.1),
    }),
    Case("ademamix", _ours("ademamix"), {
        "heavyball": _peer("heavyball", "AdEMAMix", lr=1e-3, weight_decay=0.1, alpha=8.0),
        "pytorch-optimizer": _peer("pytorch_optimizer", "AdEMAMix", lr=1e-3, weight_decay=0.1, alpha=8.0),
    }),
    Case("mars", _ours("mars"), {
        "pytorch-optimizer": _peer("pytorch_optimizer", "MARS", lr=3e-3, weight_decay=0.1),
    }),
    Case("prodigy", _ours("prodigy"), {
        "prodigyopt": _peer("prodigyopt", "Prodigy", lr=1.0, weight_decay=0.1, use_bias_correction=True),
        "pytorch-optimizer": _peer("pytorch_optimizer", "Prodigy", lr=1.0, weight_decay=0.1, bias_correction=True),
    }),
    Case("sf-adamw", _ours("sf-adamw"), {
        "schedulefree": _peer("schedulefree", "AdamWScheduleFree", lr=1e-3, weight_decay=0.1),
        "heavyball": _peer("heavyball", "SFAdamW", lr=1e-3, weight_decay=0.1),
        "pytorch-optimizer": _peer("pytorch_optimizer", "ScheduleFreeAdamW", lr=1e-3, weight_decay=0.1),
    }),
    Case("adamw8bit", _ours("adamw8bit"), {}),
]

# The same algorithms on the eager foreach path (compiled=False) and with bf16 state, against the same peers.
_ELEMENTWISE = ("lion", "signum", "adopt", "ademamix", "mars", "prodigy", "sf-adamw")
CASES += [Case(f"{c.label}-eager", _ours(c.label, compiled=False), dict(c.peers))
          for c in CASES if c.label in _ELEMENTWISE]
CASES += [Case(f"{c.label}-bf16state", _ours(c.label, state_dtype="bfloat16"), dict(c.peers))
          for c in CASES if c.label in _ELEMENTWISE]

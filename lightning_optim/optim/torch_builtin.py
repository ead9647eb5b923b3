"""Factories for torch.optim's own optimizers where building one takes more than ``cls(params, **hp)``.

``adamw`` and ``adam`` pick the fused kernel; ``sgd`` checks Nesterov's preconditions. Their records
(defaults, state, paper) are in :mod:`lightning_optim.builtins`, with ``adafactor``, whose class is its own
factory.

AdamW (Loshchilov & Hutter 2019)::

    m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²;  p *= 1 - lr·wd;  p -= lr·(m/bc1)/(sqrt(v/bc2) + eps)

Defaults are the best 124M settings of Semenov et al. 2025 (arXiv 2509.01440): lr 1e-3, betas
(0.9, 0.999) — the paper finds 0.999 beats 0.95 — eps 1e-8, weight decay 0.1. ``fused=None`` picks
torch's fused kernel wherever every parameter is a plain tensor on a device that has one (CPU included)
and falls back to the foreach path otherwise (FSDP2 DTensor shards).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["adamw", "adam", "sgd", "fused_supported"]


def fused_supported(tensors: list[torch.Tensor]) -> bool:
    """torch's fused Adam(W) kernel applies to ``tensors``: a non-empty list of plain (not ``DTensor``)
    floating-point tensors, all on one device type that has the kernel (CPU included). The one check for the
    ``adamw``/``adam`` factories and the Muon family's internal AdamW; torch groups by device and dtype itself."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if not tensors:
        return False
    devices = set(_get_fused_kernels_supported_devices())
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_floating_point():
            return False
        if t.device.type not in devices:
            return False
    return len({t.device.type for t in tensors}) == 1


def _adam_kwargs(groups: list[dict[str, Any]], fused: bool | None, foreach: bool | None) -> dict[str, Any]:
    if fused is None and foreach is None:
        fused = fused_supported([p for g in groups for p in g["params"]])
    return {"fused": fused or None, "foreach": None if fused else foreach}


def adamw(params: list[dict[str, Any]], fused: bool | None = None, foreach: bool | None = None, **hp: Any):
    """``torch.optim.AdamW`` over ``params``, on the fused kernel where :func:`fused_supported` says so."""
    return torch.optim.AdamW(params, **hp, **_adam_kwargs(params, fused, foreach))


def adam(params: list[dict[str, Any]], fused: bool | None = None, foreach: bool | None = None, **hp: Any):
    """``torch.optim.Adam`` over ``params``, on the fused kernel where :func:`fused_supported` says so."""
    return torch.optim.Adam(params, **hp, **_adam_kwargs(params, fused, foreach))


def sgd(params: list[dict[str, Any]], **hp: Any):
    """``torch.optim.SGD``, refusing Nesterov without momentum or with dampening before building it."""
    if hp.get("nesterov") and (hp.get("momentum", 0) <= 0 or hp.get("dampening", 0) != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
    return torch.optim.SGD(params, **hp)

"""torch.optim's own optimizers, registered with published defaults: ``adamw``, ``adam``, ``sgd``, ``adafactor``.

AdamW (Loshchilov & Hutter 2019)::

    m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²;  p *= 1 - lr·wd;  p -= lr·(m/bc1)/(sqrt(v/bc2) + eps)

Defaults are the best 124M settings of Semenov et al. 2025 (arXiv 2509.01440): lr 1e-3, betas
(0.9, 0.999) — the paper finds 0.999 beats 0.95 — eps 1e-8, weight decay 0.1. ``fused=None`` picks
torch's fused kernel wherever every parameter is a plain tensor on a device that has one (CPU included)
and falls back to the foreach path otherwise (FSDP2 DTensor shards).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim.registry import StateLayout, register_optimizer

_TORCH = "https://github.com/pytorch/pytorch/tree/main/torch/optim"


def _all_params(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def fused_supported(groups: list[dict[str, Any]]) -> bool:
    """torch's fused Adam(W) kernel applies: plain floating tensors, all on one device type that has it."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    params = _all_params(groups)
    if not params:
        return False
    devices = set(_get_fused_kernels_supported_devices())
    for p in params:
        if type(p) not in (torch.Tensor, torch.nn.Parameter) or not p.is_floating_point():
            return False
        if p.device.type not in devices:
            return False
    return len({p.device.type for p in params}) == 1


def _adam_kwargs(groups: list[dict[str, Any]], fused: bool | None, foreach: bool | None) -> dict[str, Any]:
    if fused is None and foreach is None:
        fused = fused_supported(groups)
    return {"fused": fused or None, "foreach": None if fused else foreach}


_ADAM_DEFAULTS = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False,
    "foreach": None, "fused": None, "capturable": False, "differentiable": False,
}


@register_optimizer(
    "adamw",
    defaults={**_ADAM_DEFAULTS, "weight_decay": 0.1},
    state=StateLayout(2, names=("exp_avg", "exp_avg_sq")),
    paper="Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization (arXiv 1711.05101)",
    reference=f"torch.optim.AdamW ({_TORCH}/adamw.py)",
    description="Adam with decoupled weight decay; torch's fused kernel where supported",
    aliases=("adam-w",),
)
def adamw(params: list[dict[str, Any]], fused: bool | None = None, foreach: bool | None = None, **hp: Any):
    return torch.optim.AdamW(params, **hp, **_adam_kwargs(params, fused, foreach))


@register_optimizer(
    "adam",
    defaults={**_ADAM_DEFAULTS, "weight_decay": 0.0},
    state=StateLayout(2, names=("exp_avg", "exp_avg_sq")),
    paper="Kingma & Ba 2015, Adam: A Method for Stochastic Optimization (arXiv 1412.6980)",
    reference=f"torch.optim.Adam ({_TORCH}/adam.py)",
    description="Adam; weight_decay is L2 (added to the gradient), as in torch.optim.Adam",
)
def adam(params: list[dict[str, Any]], fused: bool | None = None, foreach: bool | None = None, **hp: Any):
    return torch.optim.Adam(params, **hp, **_adam_kwargs(params, fused, foreach))


@register_optimizer(
    "sgd",
    defaults={
        "lr": 1e-2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": True,
        "maximize": False, "foreach": None, "differentiable": False, "fused": None,
    },
    state=StateLayout(1, names=("momentum_buffer",)),
    paper="Sutskever et al. 2013, On the importance of initialization and momentum in deep learning",
    reference=f"torch.optim.SGD ({_TORCH}/sgd.py)",
    description="SGD with (Nesterov) momentum; weight_decay is L2, as in torch.optim.SGD",
)
def sgd(params: list[dict[str, Any]], **hp: Any):
    if hp.get("nesterov") and (hp.get("momentum", 0) <= 0 or hp.get("dampening", 0) != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
    return torch.optim.SGD(params, **hp)


def _adafactor_factors(shape: tuple[int, ...]) -> int:
    """row + column factors (≥2-D) or a full second moment (≤1-D)"""
    if len(shape) < 2:
        return math.prod(shape) if shape else 1
    lead = math.prod(shape[:-2])
    return lead * (shape[-2] + shape[-1])


@register_optimizer(
    "adafactor",
    defaults={
        "lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0,
        "foreach": None, "maximize": False,
    },
    state=StateLayout(0, extra=_adafactor_factors),
    paper="Shazeer & Stern 2018, Adafactor: Adaptive Learning Rates with Sublinear Memory Cost (arXiv 1804.04235)",
    reference=f"torch.optim.Adafactor ({_TORCH}/_adafactor.py)",
    description="factored second moment, relative step size capped by lr (lr is honoured)",
    supports_dtensor=False,
    dtensor_note=(
        "torch.optim.Adafactor's in-place row/column factor updates fail on row-sharded DTensors "
        "(aten.pow_ on a _NormPartial placement); use DDP, or adamw/lion/muon under FSDP2"
    ),
)
def adafactor(params: list[dict[str, Any]], **hp: Any):
    return torch.optim.Adafactor(params, **hp)

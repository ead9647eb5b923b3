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

``cautious=True`` (C-AdamW / C-Adam, Liang, Chen, Liu & Liu 2024, arXiv 2411.16085): torch's kernels have no
cautious mask, so the factories then build :class:`ElementwiseAdam`, this package's own Adam(W) on the shared
elementwise machinery (foreach eager path, compiled kernel, FSDP2 shards), which applies
``p -= lr/bc1 · (m ⊙ φ / max(mean(φ), 1e-3)) / (sqrt(v/bc2) + eps)``, ``φ = 1[m ⊙ g > 0]`` (the first moment masked
against the gradient, as the official C-AdamW code; the rule in :mod:`lightning_optim.optim._cautious`), with the
decoupled decay ``p *= 1 - lr·wd`` unmasked (``adam``: L2, ``g += wd·p`` before the moments, and ``g`` in the mask is
that gradient). ``cautious=False`` (the default) builds torch's class exactly as before. torch's switches that
kernel does not have (``amsgrad``, ``maximize``, ``capturable``, ``differentiable``, ``fused=True``) are refused
with ``cautious=True``, naming the switch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim.optim._cautious import cautious as cautious_copy, cautious_tensor, check_cautious
from lightning_optim.optim._elementwise import Bucket, ElementwiseOptimizer, check_betas, check_nonneg
from lightning_optim.optim._low_precision import store, up

__all__ = ["adamw", "adam", "sgd", "fused_supported", "ElementwiseAdam", "adam_foreach_"]


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


#: torch.optim.Adam(W) switches that :class:`ElementwiseAdam` does not implement, with the value that is a no-op
_TORCH_ONLY = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def _cautious_adam(name: str, params: Any, fused: bool | None, hp: dict[str, Any], decoupled: bool):
    """:class:`ElementwiseAdam` with ``cautious=True`` for the ``name`` factory, refusing torch-only switches."""
    if fused:
        raise ValueError(f"{name}: cautious=True runs lightning-optim's own Adam kernel; fused=True (torch's fused "
                         "kernel, which has no cautious mask) cannot be combined with it")
    for key, off in _TORCH_ONLY.items():
        if key in hp and hp.pop(key) != off:
            raise ValueError(f"{name}: cautious=True runs lightning-optim's own Adam kernel, which has no {key!r}; "
                             f"leave {key}={off!r}")
    if "decoupled_weight_decay" in hp:
        decoupled = bool(hp.pop("decoupled_weight_decay"))
    return ElementwiseAdam(params, decoupled_weight_decay=decoupled, cautious=True, **hp)


def adamw(params: list[dict[str, Any]], fused: bool | None = None, foreach: bool | None = None,
          cautious: bool = False, **hp: Any):
    """``torch.optim.AdamW`` over ``params``, on the fused kernel where :func:`fused_supported` says so;
    ``cautious=True``: C-AdamW (:class:`ElementwiseAdam`, see the module docstring)."""
    if check_cautious(cautious, "adamw"):
        return _cautious_adam("adamw", params, fused, hp, decoupled=True)
    return torch.optim.AdamW(params, **hp, **_adam_kwargs(params, fused, foreach))


def adam(params: list[dict[str, Any]], fused: bool | None = None, foreach: bool | None = None,
         cautious: bool = False, **hp: Any):
    """``torch.optim.Adam`` over ``params``, on the fused kernel where :func:`fused_supported` says so;
    ``cautious=True``: C-Adam (:class:`ElementwiseAdam` with L2 weight decay)."""
    if check_cautious(cautious, "adam"):
        return _cautious_adam("adam", params, fused, hp, decoupled=False)
    return torch.optim.Adam(params, **hp, **_adam_kwargs(params, fused, foreach))


def adam_foreach_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, decoupled: bool, cautious: bool, param_objs: list[Any] | None = None) -> None:
    """One Adam(W) step of tensors that have all taken ``step`` steps before this one (local tensors, in place)::

        g += wd·p (L2, not decoupled);  m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²
        p *= 1 - lr·wd (decoupled);     p -= (lr/bc1)·u / (sqrt(v)/sqrt(bc2) + eps)

    with ``u = m``, or with ``cautious`` ``u = m ⊙ φ / max(mean(φ), 1e-3)``, ``φ = 1[m ⊙ g > 0]`` (``param_objs``:
    the parameters, for the global mean of FSDP2 shards). The eager path of :class:`ElementwiseAdam` and of the
    Muon family's internal AdamW when cautious."""
    t = step + 1
    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
    if weight_decay != 0 and not decoupled:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    if weight_decay != 0 and decoupled:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    num = cautious_copy(exp_avgs, grads, param_objs) if cautious else exp_avgs
    torch._foreach_addcdiv_(params, num, denom, value=-lr / bc1)


def adam_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, l2: torch.Tensor,
                decay: torch.Tensor, w1: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor,
                inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor, neg_lr_bc1: torch.Tensor,
                seed: torch.Tensor | None = None, cautious: bool = False) -> None:
    """:func:`adam_foreach_` on one tensor, for the compiled path: ``l2 = wd`` (L2) or 0, ``decay = 1 - lr·wd``
    (decoupled) or 1, ``w1 = 1 - β1``, ``w2 = 1 - β2``; ``seed``: stochastic rounding of bf16 state."""
    x, m32, v32 = up(p), up(m), up(v)
    g = up(g) + l2 * x
    m_new = m32 + w1 * (g - m32)
    v_new = v32 * beta2 + w2 * g * g
    m_app = cautious_tensor(m_new, g) if cautious else m_new
    p.copy_(x * decay + neg_lr_bc1 * m_app / (torch.sqrt(v_new) * inv_sqrt_bc2 + eps))
    store(m, m_new, seed, 0)
    store(v, v_new, seed, 1)


def adam_cautious_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, l2: torch.Tensor,
                         decay: torch.Tensor, w1: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor,
                         inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor, neg_lr_bc1: torch.Tensor,
                         seed: torch.Tensor | None = None) -> None:
    """:func:`adam_kernel` with the cautious mask (C-AdamW)."""
    adam_kernel(p, g, m, v, l2, decay, w1, beta2, w2, inv_sqrt_bc2, eps, neg_lr_bc1, seed, cautious=True)


class ElementwiseAdam(ElementwiseOptimizer):
    """Adam / AdamW (``decoupled_weight_decay``) on this package's elementwise machinery, with the ``cautious``
    mask: what the ``adamw``/``adam`` factories build for ``cautious=True``. State as torch's (``step``,
    ``exp_avg``, ``exp_avg_sq``); with ``cautious=False`` it follows torch's AdamW/Adam to rounding (tested)."""

    state_names = ("exp_avg", "exp_avg_sq")
    kernel = staticmethod(adam_kernel)
    cautious_kernel = staticmethod(adam_cautious_kernel)

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.1, decoupled_weight_decay: bool = True, cautious: bool = False,
                 compiled: bool | str = "auto", state_dtype: str | None = None) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be > 0, got {eps!r}")
        super().__init__(params, dict(lr=lr, betas=check_betas(betas, 2), eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=bool(decoupled_weight_decay),
                                      cautious=check_cautious(cautious, "ElementwiseAdam")), compiled, state_dtype)

    def _kernel_scalars(self, group: dict[str, Any], b: Bucket) -> tuple:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        t = b.step + 1
        decoupled = group["decoupled_weight_decay"]
        return (0.0 if decoupled else wd, 1.0 - lr * wd if decoupled else 1.0, 1.0 - beta1, beta2, 1.0 - beta2,
                1.0 / math.sqrt(1.0 - beta2**t), group["eps"], -lr / (1.0 - beta1**t))

    def _update(self, group: dict[str, Any], b: Bucket) -> None:
        beta1, beta2 = group["betas"]
        adam_foreach_(b.params, b.grads, b.state["exp_avg"], b.state["exp_avg_sq"], step=b.step, lr=group["lr"],
                      beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                      decoupled=group["decoupled_weight_decay"], cautious=bool(group.get("cautious")),
                      param_objs=b.param_objs)


def sgd(params: list[dict[str, Any]], **hp: Any):
    """``torch.optim.SGD``, refusing Nesterov without momentum or with dampening before building it."""
    if hp.get("nesterov") and (hp.get("momentum", 0) <= 0 or hp.get("dampening", 0) != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
    return torch.optim.SGD(params, **hp)

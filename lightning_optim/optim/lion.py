"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675)::

    p *= 1 - lr·wd;   p -= lr·sign(β1·m + (1-β1)·g);   m = β2·m + (1-β2)·g

``cautious=True`` (C-Lion, Liang et al. 2024, arXiv 2411.16085): the sign update ``u`` is masked where it
disagrees with ``g`` and rescaled, ``u ⊙ 1[u ⊙ g > 0] / max(mean(1[u ⊙ g > 0]), 1e-3)``
(:mod:`lightning_optim.optim._cautious`); the weight decay is not masked.

State 1×P (``exp_avg``). Defaults are the best 124M settings of Semenov et al. 2025: lr 1e-3 (5e-4 at
210M, 2e-4 at 720M), betas (0.9, 0.99), weight decay 0.1. Reference: google/automl ``lion/lion_pytorch.py``
and lucidrains' ``lion-pytorch`` (the tests compare against the latter).

``state_dtype="bfloat16"`` keeps ``exp_avg`` in bfloat16, updated in float32 and written back with stochastic
rounding (``lightning_optim.optim._low_precision``); ``compiled="auto"`` (default) runs the update of each large
tensor as one compiled loop where a compiler is present (``False``: the eager foreach path).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_optim.optim._cautious import cautious_, cautious_tensor, check_cautious
from lightning_optim.optim._elementwise import Bucket, ElementwiseOptimizer, check_betas, check_nonneg
from lightning_optim.optim._low_precision import store, up

__all__ = ["Lion"]


def lion_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, decay: torch.Tensor, neg_lr: torch.Tensor,
                w1: torch.Tensor, w2: torch.Tensor, seed: torch.Tensor | None = None, cautious: bool = False) -> None:
    """One tensor, for the compiled path: ``decay = 1 - lr·wd``, ``w1 = 1 - β1``, ``w2 = 1 - β2``; ``seed``:
    stochastic rounding of a bf16 ``m``; ``cautious``: mask the sign update (C-Lion)."""
    x, g, m32 = up(p), up(g), up(m)
    u = torch.sign(m32 + w1 * (g - m32))
    if cautious:
        u = cautious_tensor(u, g)
    p.copy_(x * decay + neg_lr * u)
    store(m, m32 + w2 * (g - m32), seed)


def lion_cautious_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, decay: torch.Tensor,
                         neg_lr: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                         seed: torch.Tensor | None = None) -> None:
    """:func:`lion_kernel` with the cautious mask (C-Lion)."""
    lion_kernel(p, g, m, decay, neg_lr, w1, w2, seed, cautious=True)


class Lion(ElementwiseOptimizer):
    """Lion: sign of an interpolated momentum, decoupled weight decay. One foreach pass per op over a group
    (``compiled=True``: one fused loop per tensor)."""

    state_names = ("exp_avg",)
    counts_steps = False
    kernel = staticmethod(lion_kernel)
    cautious_kernel = staticmethod(lion_cautious_kernel)

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.1, compiled: bool | str = "auto", state_dtype: str | None = None,
                 cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=check_betas(betas, 2), weight_decay=weight_decay,
                                      cautious=check_cautious(cautious, "Lion")), compiled, state_dtype)

    def _kernel_scalars(self, group: dict[str, Any], b: Bucket) -> tuple:
        beta1, beta2 = group["betas"]
        return 1.0 - group["lr"] * group["weight_decay"], -group["lr"], 1.0 - beta1, 1.0 - beta2

    def _update(self, group: dict[str, Any], b: Bucket) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        m = b.state["exp_avg"]
        u = torch._foreach_lerp(m, b.grads, 1.0 - beta1)  # β1·m + (1-β1)·g
        torch._foreach_sign_(u)
        if group.get("cautious"):
            cautious_(u, b.grads, b.param_objs)
        if wd != 0:
            torch._foreach_mul_(b.params, 1.0 - lr * wd)
        torch._foreach_add_(b.params, u, alpha=-lr)
        torch._foreach_lerp_(m, b.grads, 1.0 - beta2)

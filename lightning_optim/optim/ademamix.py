"""AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer", arXiv 2409.03137)::

    m1 = β1·m1 + (1-β1)·g;   m2 = β3(t)·m2 + (1-β3(t))·g;   v = β2·v + (1-β2)·g²
    p -= lr·( (m1/bc1 + α(t)·m2) / (sqrt(v/bc2) + eps) + wd·p )

The slow EMA ``m2`` is not bias-corrected. Warmups (apple/ml-ademamix): ``α(t) = α·min(1, t/T_α)`` and
``β3(t)`` moves from β1 to β3 linearly in half-life space, ``f(β) = ln 0.5 / ln(β + 1e-8) - 1``,
``β3(t) = 0.5^(1 / ((1-s)·f(β1) + s·f(β3) + 1))``, ``s = t/T_β3`` (β3 itself once ``t >= T_β3``); the
``1e-8`` inside the log is the reference's.

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085): the numerator ``m1/bc1 + α(t)·m2`` is masked where it
disagrees with ``g`` and rescaled, ``u ⊙ 1[u ⊙ g > 0] / max(mean(1[u ⊙ g > 0]), 1e-3)``, as C-AdamW masks its
first moment (the positive denominator does not change signs); state and weight decay are not masked
(:mod:`lightning_optim.optim._cautious`).

State 3×P (``exp_avg``, ``exp_avg_slow``, ``exp_avg_sq``). Defaults (best 124M settings of Semenov et al.
2025): lr 1e-3, betas (0.9, 0.999), beta3 0.999 (0.9999 for runs >= 32k steps), alpha 8, weight decay 0.1.

``alpha_warmup`` / ``beta3_warmup`` default to ``None`` = no warmup (the reference's default, since an
optimizer does not know the run's length). The benchmark's best setting uses warmups equal to the total
number of steps: :class:`~lightning_optim.OptimizerMixin` fills both with the schedule's horizon when they
are left ``None`` (``horizon_hyperparameters`` in the spec); with :func:`create_optimizer` pass
``alpha_warmup=T, beta3_warmup=T`` yourself.

``state_dtype="bfloat16"`` keeps all three state tensors in bfloat16, updated in float32 and written back with stochastic
rounding (``lightning_optim.optim._low_precision``); ``compiled="auto"`` (default) runs the update of each large
tensor as one compiled loop where a compiler is present (``False``: the eager foreach path).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim.optim._cautious import cautious_, cautious_tensor, check_cautious
from lightning_optim.optim._elementwise import Bucket, ElementwiseOptimizer, check_betas, check_nonneg
from lightning_optim.optim._low_precision import store, up

__all__ = ["AdEMAMix", "alpha_schedule", "beta3_schedule"]


def alpha_schedule(step: int, alpha: float, warmup: int | None) -> float:
    """Linear warmup of α from 0 (apple's ``linear_warmup_scheduler``)."""
    if warmup and step < warmup:
        a = step / float(warmup)
        return a * alpha
    return alpha


def beta3_schedule(step: int, beta_start: float, beta_end: float, warmup: int | None) -> float:
    """β3 warmup linear in half-life space (apple's ``linear_hl_warmup_scheduler``)."""
    if warmup and step < warmup:
        def f(beta: float, eps: float = 1e-8) -> float:
            return math.log(0.5) / math.log(beta + eps) - 1

        a = step / float(warmup)
        return math.pow(0.5, 1 / ((1.0 - a) * f(beta_start) + a * f(beta_end) + 1))
    return beta_end


def ademamix_kernel(p: torch.Tensor, g: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, v: torch.Tensor,
                    w1: torch.Tensor, w3: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor,
                    inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, inv_bc1: torch.Tensor,
                    decay: torch.Tensor, neg_lr: torch.Tensor, seed: torch.Tensor | None = None,
                    cautious: bool = False) -> None:
    """One tensor, for the compiled path: ``w1 = 1 - β1``, ``w3 = 1 - β3(t)``, ``w2 = 1 - β2``,
    ``decay = 1 - lr·wd``; ``alpha`` is α(t); ``seed``: stochastic rounding of bf16 state; ``cautious``: mask the
    numerator."""
    g, a1, a2, av = up(g), up(m1), up(m2), up(v)
    m1_new = a1 + w1 * (g - a1)
    m2_new = a2 + w3 * (g - a2)
    v_new = av * beta2 + w2 * g * g
    denom = torch.sqrt(v_new) * inv_sqrt_bc2 + eps
    num = m2_new * alpha + m1_new * inv_bc1
    if cautious:
        num = cautious_tensor(num, g)
    p.copy_(up(p) * decay + neg_lr * num / denom)
    store(m1, m1_new, seed, 0)
    store(m2, m2_new, seed, 1)
    store(v, v_new, seed, 2)


def ademamix_cautious_kernel(p: torch.Tensor, g: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, v: torch.Tensor,
                             w1: torch.Tensor, w3: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor,
                             inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, inv_bc1: torch.Tensor,
                             decay: torch.Tensor, neg_lr: torch.Tensor, seed: torch.Tensor | None = None) -> None:
    """:func:`ademamix_kernel` with the cautious mask."""
    ademamix_kernel(p, g, m1, m2, v, w1, w3, beta2, w2, inv_sqrt_bc2, eps, alpha, inv_bc1, decay, neg_lr, seed,
                    cautious=True)


class AdEMAMix(ElementwiseOptimizer):
    """Adam with a second, slow and un-bias-corrected EMA of the gradient mixed in with weight α."""

    state_names = ("exp_avg", "exp_avg_slow", "exp_avg_sq")
    kernel = staticmethod(ademamix_kernel)
    cautious_kernel = staticmethod(ademamix_cautious_kernel)

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float = 0.999, alpha: float = 8.0, eps: float = 1e-8, weight_decay: float = 0.1,
                 alpha_warmup: int | None = None, beta3_warmup: int | None = None, compiled: bool | str = "auto",
                 state_dtype: str | None = None, cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay, alpha=alpha, alpha_warmup=alpha_warmup,
                     beta3_warmup=beta3_warmup)
        check_betas((beta3,), 1, "beta3")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=check_betas(betas, 2), beta3=beta3, alpha=alpha, eps=eps,
                                      weight_decay=weight_decay, alpha_warmup=alpha_warmup,
                                      beta3_warmup=beta3_warmup, cautious=check_cautious(cautious, "AdEMAMix")),
                         compiled, state_dtype)

    def _kernel_scalars(self, group: dict[str, Any], b: Bucket) -> tuple:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        t = b.step + 1
        alpha = alpha_schedule(t, group["alpha"], group["alpha_warmup"])
        beta3 = beta3_schedule(t, beta1, group["beta3"], group["beta3_warmup"])
        return (1.0 - beta1, 1.0 - beta3, beta2, 1.0 - beta2, 1.0 / math.sqrt(1.0 - beta2**t), group["eps"], alpha,
                1.0 / (1.0 - beta1**t), 1.0 - lr * wd, -lr)

    def _update(self, group: dict[str, Any], b: Bucket) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        t = b.step + 1
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        alpha = alpha_schedule(t, group["alpha"], group["alpha_warmup"])
        beta3 = beta3_schedule(t, beta1, group["beta3"], group["beta3_warmup"])
        m1, m2, v = b.state["exp_avg"], b.state["exp_avg_slow"], b.state["exp_avg_sq"]
        torch._foreach_lerp_(m1, b.grads, 1.0 - beta1)
        torch._foreach_lerp_(m2, b.grads, 1.0 - beta3)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, b.grads, b.grads, value=1.0 - beta2)
        # (m1/bc1 + α·m2) / (sqrt(v)/sqrt(bc2) + eps) = (sqrt(bc2)/bc1)·(m1 + α·bc1·m2) / (sqrt(v) + eps·sqrt(bc2)):
        # the same quotient in two fewer passes over memory
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps * math.sqrt(bc2))
        num = torch._foreach_add(m1, m2, alpha=alpha * bc1)
        if group.get("cautious"):
            cautious_(num, b.grads, b.param_objs)
        if wd != 0:
            torch._foreach_mul_(b.params, 1.0 - lr * wd)
        torch._foreach_addcdiv_(b.params, num, denom, value=-lr * math.sqrt(bc2) / bc1)

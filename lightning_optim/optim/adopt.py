"""ADOPT (Taniguchi et al. 2024, "ADOPT: Modified Adam Can Converge with Any β2", arXiv 2411.02853)::

    step 1:   v = g²                                   (no update)
    then:     p *= 1 - lr·wd                           (decoupled; L2 into g with decouple=False)
              n  = clamp(g / max(sqrt(v_prev), eps), -c_t, c_t),   c_t = t^clip_exponent
              m  = m + (1-β1)·(n - m);   p -= lr·m;   v = β2·v + (1-β2)·g²

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085): the update ``m`` (after its EMA) is masked where it
disagrees with the gradient ``g`` (with the L2 term under ``decouple=False``) and rescaled,
``m ⊙ 1[m ⊙ g > 0] / max(mean(1[m ⊙ g > 0]), 1e-3)``, as C-AdamW masks its first moment; the state ``m``
itself and the weight decay are not masked (:mod:`lightning_optim.optim._cautious`).

No bias correction. State 2×P (``exp_avg``, ``exp_avg_sq``). Defaults (best 124M settings of Semenov et
al. 2025): lr 1e-3, betas (0.9, 0.999), eps 1e-6 (eps >= 1e-5 is much worse), weight decay 0.1.

``t`` in the clamp is the number of steps taken *before* this one, as the official code reads the count
before incrementing it: the clamp at the first update is 1 (``1^0.25``), then ``2^0.25`` ...

Reference defect done right: iShohei220/adopt stores the clamp schedule as a lambda (``clip_lambda``), which
cannot be pickled with ``weights_only=True`` nor saved by ``torch.distributed.checkpoint``; here it is the
number ``clip_exponent`` (``None`` disables clamping). pytorch-optimizer's ADOPT differs from the official
algorithm (it decays the weights on the initialising step and clamps one step later), so the tests compare
against a transcription of the official algorithm, not against it.

``state_dtype="bfloat16"`` keeps ``exp_avg`` and ``exp_avg_sq`` in bfloat16, updated in float32 and written back with stochastic
rounding (``lightning_optim.optim._low_precision``); ``compiled="auto"`` (default) runs the update of each large
tensor as one compiled loop where a compiler is present (``False``: the eager foreach path).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim.optim._cautious import cautious, cautious_tensor, check_cautious
from lightning_optim.optim._elementwise import Bucket, ElementwiseOptimizer, check_betas, check_nonneg
from lightning_optim.optim._low_precision import store, up

__all__ = ["ADOPT"]


def adopt_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, l2: torch.Tensor,
                 decay: torch.Tensor, neg_lr: torch.Tensor, eps: torch.Tensor, clip: torch.Tensor,
                 w1: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor, seed: torch.Tensor | None = None,
                 cautious: bool = False) -> None:
    """One tensor after the first step, for the compiled path: ``l2 = wd`` (coupled) or 0, ``decay = 1 - lr·wd``
    (decoupled) or 1, ``clip = t^clip_exponent`` (inf: none), ``w1 = 1 - β1``, ``w2 = 1 - β2``; ``seed``:
    stochastic rounding of bf16 ``m``/``v``; ``cautious``: mask the applied ``m``."""
    x, m32, v32 = up(p), up(m), up(v)
    g = up(g) + l2 * x
    n = torch.clamp(g / torch.clamp_min(torch.sqrt(v32), eps), -clip, clip)
    m_new = m32 + w1 * (n - m32)
    p.copy_(x * decay + neg_lr * (cautious_tensor(m_new, g) if cautious else m_new))
    store(m, m_new, seed, 0)
    store(v, v32 * beta2 + w2 * g * g, seed, 1)


def adopt_cautious_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, l2: torch.Tensor,
                          decay: torch.Tensor, neg_lr: torch.Tensor, eps: torch.Tensor, clip: torch.Tensor,
                          w1: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor,
                          seed: torch.Tensor | None = None) -> None:
    """:func:`adopt_kernel` with the cautious mask."""
    adopt_kernel(p, g, m, v, l2, decay, neg_lr, eps, clip, w1, beta2, w2, seed, cautious=True)


class ADOPT(ElementwiseOptimizer):
    """ADOPT with decoupled weight decay and a clamp schedule stored as data."""

    state_names = ("exp_avg", "exp_avg_sq")
    kernel = staticmethod(adopt_kernel)
    cautious_kernel = staticmethod(adopt_cautious_kernel)

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.1, clip_exponent: float | None = 0.25,
                 decouple: bool = True, compiled: bool | str = "auto", state_dtype: str | None = None,
                 cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay, clip_exponent=clip_exponent)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=check_betas(betas, 2), eps=eps, weight_decay=weight_decay,
                                      clip_exponent=clip_exponent, decouple=bool(decouple),
                                      cautious=check_cautious(cautious, "ADOPT")), compiled, state_dtype)

    def _kernel_scalars(self, group: dict[str, Any], b: Bucket) -> tuple | None:
        if b.step == 0:
            return None  # the initialising step (v = g²) is one eager op
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        decouple = group["decouple"]
        exp = group["clip_exponent"]
        clip = math.inf if exp is None else float(b.step) ** exp
        return (0.0 if decouple else wd, 1.0 - lr * wd if decouple else 1.0, -lr, group["eps"], clip,
                1.0 - beta1, beta2, 1.0 - beta2)

    def _update(self, group: dict[str, Any], b: Bucket) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        m, v = b.state["exp_avg"], b.state["exp_avg_sq"]
        grads = b.grads
        if wd != 0 and not group["decouple"]:
            grads = torch._foreach_add(grads, b.params, alpha=wd)
        if b.step == 0:
            torch._foreach_addcmul_(v, grads, grads)
            return
        if wd != 0 and group["decouple"]:
            torch._foreach_mul_(b.params, 1.0 - lr * wd)
        n = torch._foreach_sqrt(v)
        torch._foreach_clamp_min_(n, eps)
        torch._foreach_div_(n, grads)
        torch._foreach_reciprocal_(n)  # g / max(sqrt(v), eps) in the one buffer (a new 1×P list costs more
        # on CPU than the extra pass: large allocations are fresh pages every step)
        if group["clip_exponent"] is not None:
            clip = float(b.step) ** group["clip_exponent"]
            torch._foreach_clamp_min_(n, -clip)
            torch._foreach_clamp_max_(n, clip)
        torch._foreach_lerp_(m, n, 1.0 - beta1)
        torch._foreach_add_(b.params, cautious(m, grads, b.param_objs) if group.get("cautious") else m, alpha=-lr)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)

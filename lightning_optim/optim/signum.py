"""Signum (Bernstein et al. 2018, "signSGD", Alg. 5/6 of Semenov et al. 2025)::

    buf = μ·buf + g            (buf starts at zeros)
    d   = g + μ·buf  (Nesterov)  else  buf
    p  *= 1 - lr·wd;   p -= lr·sign(d)

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085): the sign update ``sign(d)`` is masked where it
disagrees with ``g`` and rescaled, ``u ⊙ 1[u ⊙ g > 0] / max(mean(1[u ⊙ g > 0]), 1e-3)``
(:mod:`lightning_optim.optim._cautious`), as C-Lion masks its sign update; the weight decay is not masked.

State 1×P (``momentum_buffer``). Defaults (best 124M settings of Semenov et al. 2025): lr 1e-3, μ 0.95,
Nesterov on, weight decay 0.1.

Known reference defect, done right here: the benchmark's code (epfml/llm-optimizer-benchmark) starts the
momentum buffer as a copy of the *weights*; the paper's algorithm box starts it at zeros, as we do.

``state_dtype="bfloat16"`` keeps ``momentum_buffer`` in bfloat16, updated in float32 and written back with stochastic
rounding (``lightning_optim.optim._low_precision``); ``compiled="auto"`` (default) runs the update of each large
tensor as one compiled loop where a compiler is present (``False``: the eager foreach path).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_optim.optim._cautious import cautious_, cautious_tensor, check_cautious
from lightning_optim.optim._elementwise import Bucket, ElementwiseOptimizer, check_nonneg
from lightning_optim.optim._low_precision import store, up

__all__ = ["Signum"]


def signum_kernel(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, decay: torch.Tensor, neg_lr: torch.Tensor,
                  mu: torch.Tensor, nesterov: torch.Tensor, seed: torch.Tensor | None = None,
                  cautious: bool = False) -> None:
    """One tensor, for the compiled path: ``decay = 1 - lr·wd``; ``nesterov`` is 1.0 or 0.0; ``seed``:
    stochastic rounding of a bf16 ``buf``; ``cautious``: mask the sign update."""
    g = up(g)
    b = up(buf) * mu + g
    d = torch.sign(torch.where(nesterov > 0, g + mu * b, b))  # nesterov: sign(g + μ·b); otherwise sign(b)
    if cautious:
        d = cautious_tensor(d, g)
    store(buf, b, seed)
    p.copy_(up(p) * decay + neg_lr * d)


def signum_cautious_kernel(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, decay: torch.Tensor,
                           neg_lr: torch.Tensor, mu: torch.Tensor, nesterov: torch.Tensor,
                           seed: torch.Tensor | None = None) -> None:
    """:func:`signum_kernel` with the cautious mask."""
    signum_kernel(p, g, buf, decay, neg_lr, mu, nesterov, seed, cautious=True)


class Signum(ElementwiseOptimizer):
    """Sign of (Nesterov) momentum with decoupled weight decay; the buffer starts at zeros."""

    state_names = ("momentum_buffer",)
    counts_steps = False
    kernel = staticmethod(signum_kernel)
    cautious_kernel = staticmethod(signum_cautious_kernel)

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, compiled: bool | str = "auto", state_dtype: str | None = None,
                 cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=bool(nesterov), weight_decay=weight_decay,
                              cautious=check_cautious(cautious, "Signum")),
                         compiled, state_dtype)

    def _kernel_scalars(self, group: dict[str, Any], b: Bucket) -> tuple:
        return (1.0 - group["lr"] * group["weight_decay"], -group["lr"], group["momentum"],
                1.0 if group["nesterov"] else 0.0)

    def _update(self, group: dict[str, Any], b: Bucket) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        buf = b.state["momentum_buffer"]
        torch._foreach_mul_(buf, mu)
        torch._foreach_add_(buf, b.grads)
        if group["nesterov"]:
            d = torch._foreach_add(b.grads, buf, alpha=mu)
            torch._foreach_sign_(d)
        else:
            d = torch._foreach_sign(buf)
        if group.get("cautious"):
            cautious_(d, b.grads, b.param_objs)
        if wd != 0:
            torch._foreach_mul_(b.params, 1.0 - lr * wd)
        torch._foreach_add_(b.params, d, alpha=-lr)

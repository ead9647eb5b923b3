"""StableAdamW (Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi & Schmidt 2023, "Stable and low-precision
training for large-scale vision-language models", arXiv 2304.13013, Algorithm 2): AdamW with AdaFactor's
update clipping, per parameter tensor ``θ`` with gradient ``g`` at step ``t``::

    β̂1 = β1·(1 - β1^(t-1)) / (1 - β1^t);     β̂2 = β2·(1 - β2^(t-1)) / (1 - β2^t)
    m = β̂1·m + (1-β̂1)·g;                     v = β̂2·v + (1-β̂2)·g²          (bias correction folded in)
    RMS = sqrt(mean(g² / max(v, ε²)))                                         (over the whole tensor)
    η = lr / max(1, RMS)
    θ ← θ - η·λ·θ - η·m / (sqrt(v) + ε)

The folded betas make ``m`` and ``v`` the bias-corrected moments of Adam directly (``β̂ = 0`` at ``t = 1``).
The clipping lowers the step of a tensor whose second moment is out of date (a gradient much larger than
``sqrt(v)``), the loss-spike cause the paper identifies; decay uses the clipped ``η`` too, as in the box.
Under FSDP2 the mean is over the whole tensor: the shards' sums are all-reduced.

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085): the update ``u = m / (sqrt(v) + ε)`` is masked where it
disagrees with ``g`` and rescaled, ``u ⊙ 1[u ⊙ g > 0] / max(mean(1[u ⊙ g > 0]), 1e-3)`` (C-AdamW's rule; the mean
over the whole tensor, all-reduced under FSDP2), then stepped with the clipped ``η``; the RMS clipping, the state
and the weight decay are not masked (:mod:`lightning_optim.optim._cautious`).

Defaults: lr 1e-3 and weight decay 0.1 (the package's 124M AdamW settings), betas (0.9, 0.99) (the paper
recommends a lower β2 than 0.999 for stability; 0.99 is also pytorch-optimizer's default), eps 1e-6 (the
paper's runs). Reference: the paper's algorithm box; torch-optimi's ``StableAdamW`` (same defaults) and
pytorch-optimizer's ``StableAdamW`` implement the same box (their bf16 paths add Kahan summation, not part of
the paper); the tests compare against all three.

State per parameter: ``exp_avg``, ``exp_avg_sq`` (parameter-sized, the parameter's dtype), ``step``.
bf16 parameters are updated in float32 and written back.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_optim.optim._cautious import cautious_, check_cautious
from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._per_tensor import (check_betas, check_nonneg, check_positive, local, next_step,
                                               shard_sum, up, write_back)

__all__ = ["StableAdamW"]


def folded_beta(beta: float, t: int) -> float:
    """``β·(1 - β^(t-1)) / (1 - β^t)``: the EMA weight that makes the average bias-corrected at step ``t``."""
    return beta * (1.0 - beta ** (t - 1)) / (1.0 - beta ** t)


class StableAdamW(torch.optim.Optimizer):
    """AdamW whose per-tensor step is divided by max(1, RMS(g / sqrt(v)))."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-6, weight_decay: float = 0.1, cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        check_positive(eps=eps)
        super().__init__(params, dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                                      cautious=check_cautious(cautious, "StableAdamW")))
        for i, group in enumerate(self.param_groups):
            group["cautious"] = check_cautious(group["cautious"], f"StableAdamW param_groups[{i}]")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr, wd = group["eps"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                t = next_step(state)
                b1, b2 = folded_beta(beta1, t), folded_beta(beta2, t)
                x_store, m_store, v_store = local(p), local(state["exp_avg"]), local(state["exp_avg_sq"])
                x, g, m, v = up(x_store), up(local(p.grad)), up(m_store), up(v_store)
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                ratio_sum = shard_sum((g * g).div_(v.clamp_min(eps * eps)).sum(), p)
                rms = (ratio_sum / max(p.numel(), 1)).sqrt()  # p.numel(): the whole tensor's count, DTensor or not
                step_lr = lr / rms.clamp_min(1.0)
                if wd != 0:
                    x.mul_(1.0 - step_lr * wd)
                u = m / v.sqrt().add_(eps)
                if group.get("cautious"):
                    cautious_([u], [g], [p])
                x.sub_(u * step_lr)
                write_back(m_store, m)
                write_back(v_store, v)
                write_back(x_store, x)
        return loss

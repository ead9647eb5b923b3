"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682)::

    lr_t = lr·min(1, t/warmup_steps);   w_t = t^r · lr_max^weight_lr_power;   c = w_t / Σ w_i
    v = β2·v + (1-β2)·g²;   u = g/(sqrt(v/bc2) + eps) + wd·y
    z -= lr_t·u;   x = (1-c)·x + c·z;   y = (1-β1)·z + β1·x

The gradient is taken at ``y``. The parameter holds ``y`` in train mode and ``x`` in eval mode; only ``z``
and ``v`` are stored (state 2×P: ``z``, ``exp_avg_sq``), ``x`` is recovered from ``y`` and ``z``
(facebookresearch/schedule_free's layout). ``lr_max`` is the largest ``lr_t`` so far, as in the reference,
so with warmup and no external schedule ``c = lr_t²/Σ lr_i²``. No external LR schedule is needed
(use ``constant``).

The clock (``c``, warmup, ``lr_max``), the ``train()`` / ``eval()`` switch and the eager update are the
schedule-free core, :mod:`lightning_optim.optim._schedule_free`, shared with ``sf-normuon``; this module adds
the compiled kernel (the same update on one tensor) and the registration. Every group's clock ticks on a step
in which any parameter has a gradient, as in the reference; a step with no gradient at all changes nothing.

Modes: ``train()`` / ``eval()`` (no argument, return ``None``, as the reference's) switch the parameters
between ``y`` and ``x`` and are idempotent; every group carries a ``train_mode`` flag set at construction
(``True``: a fresh optimizer is in train mode, where ``x = y = z``). ``step()`` in eval mode raises. In
Lightning the :class:`~lightning_optim.callbacks.schedule_free.ScheduleFreeSwitch` callback (added by the
mixin) puts the optimizer in eval mode for validation and for every saved checkpoint, and back in train mode
before every gradient. Checkpoints saved in eval mode hold the weights ``x``; the optimizer state holds ``z``,
so a resume continues exactly.

Defaults (best 124M settings of Semenov et al. 2025): lr 1e-3, betas (0.9, 0.9999), warmup_steps 2000, eps
1e-8, weight decay 0.1, r 0, weight_lr_power 2 (use grad clipping 0.5: unclipped at lr 1e-3 is unstable).

``compiled="auto"`` (default) runs the update of each large tensor as one compiled loop where a compiler is
present (``False``: the eager foreach path). ``state_dtype="bfloat16"`` keeps ``exp_avg_sq`` in bfloat16
(computed in float32, stored with stochastic rounding); ``z`` stays in the parameter's dtype: it is the
base iterate the weights are interpolated from (``x = (1-c)·x + c·z``, ``y`` from ``z`` and ``x``), so
rounding it to bf16 would be training with bf16 weights, and the ``train()``/``eval()`` switch mixes it with
the parameters directly.

Difference from the reference: its ``step`` divides ``p.grad`` in place (the gradient is overwritten by the
normalised update); here the gradient is left as it was.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._elementwise import Bucket, ElementwiseOptimizer, check_betas, check_nonneg
from lightning_optim.optim._low_precision import store, up
from lightning_optim.optim._schedule_free import (ScheduleFreeModes, check_schedule_free, clock_defaults,
                                                  sf_adamw_update, tick)

__all__ = ["AdamWScheduleFree"]


def sf_adamw_kernel(y: torch.Tensor, g: torch.Tensor, z: torch.Tensor, v: torch.Tensor, beta2: torch.Tensor,
                    w2: torch.Tensor, inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor, wd: torch.Tensor,
                    ckp1: torch.Tensor, y_coef: torch.Tensor, neg_lr: torch.Tensor,
                    seed: torch.Tensor | None = None) -> None:
    """One tensor, for the compiled path: ``w2 = 1 - β2``, ``y_coef = lr·(β1·(1-c) - 1)``; ``seed``:
    stochastic rounding of a bf16 ``v``."""
    g, y32, z32 = up(g), up(y), up(z)
    v_new = up(v) * beta2 + w2 * g * g
    u = g / (torch.sqrt(v_new) * inv_sqrt_bc2 + eps) + wd * y32
    y.copy_(y32 + ckp1 * (z32 - y32) + y_coef * u)
    z.copy_(z32 + neg_lr * u)
    store(v, v_new, seed, 1)  # slot: index in state_names


class AdamWScheduleFree(ScheduleFreeModes, ElementwiseOptimizer):
    """Schedule-free AdamW; ``train()`` / ``eval()`` switch the parameters between y and x."""

    state_names = ("z", "exp_avg_sq")
    lowp_names = ("exp_avg_sq",)  # z stays in the parameter's dtype (module docstring)
    counts_steps = False
    kernel = staticmethod(sf_adamw_kernel)

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.9999),
                 eps: float = 1e-8, weight_decay: float = 0.1, warmup_steps: int = 2000, r: float = 0.0,
                 weight_lr_power: float = 2.0, compiled: bool | str = "auto", state_dtype: str | None = None) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        betas = check_betas(betas, 2)
        check_schedule_free(betas, warmup_steps, r, weight_lr_power)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      **clock_defaults(warmup_steps, r, weight_lr_power)), compiled, state_dtype)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"z": p.detach().clone(memory_format=torch.preserve_format),
                "exp_avg_sq": self._state_zeros(p, group, "exp_avg_sq")}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self._require_train_mode()
        loss = evaluate_closure(closure)
        if all(p.grad is None for group in self.param_groups for p in group["params"]):
            return loss  # no parameter takes a step: k, lr_max and weight_sum stay (a guard dropped the step)
        for group in self.param_groups:
            t = group["k"] + 1
            lr, c = tick(group)  # every group's clock runs, as in the reference
            buckets = self._buckets(group)
            for b in buckets:
                self._update_bucket(group, b, lr, c, t)
            if buckets:
                self._advance_sr(group)
        return loss

    def _update_bucket(self, group: dict[str, Any], b: Bucket, lr: float, c: float, t: int) -> None:
        beta1, beta2 = group["betas"]
        b = self._run_kernel(b, sf_adamw_kernel, (
            beta2, 1 - beta2, 1 / math.sqrt(1 - beta2 ** t), group["eps"], group["weight_decay"], c,
            lr * (beta1 * (1 - c) - 1), -lr), seeds=self._sr_seeds(group, b))
        if b.params:
            def eager(group: dict[str, Any], b: Bucket) -> None:
                sf_adamw_update(b.params, b.grads, b.state["z"], b.state["exp_avg_sq"], lr=lr, c=c, t=t,
                                betas=(beta1, beta2), eps=group["eps"], weight_decay=group["weight_decay"])

            self._update_eager(group, b, eager)

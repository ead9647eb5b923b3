"""SF-NorMuon: schedule-free iterates around NorMuon (no LR schedule; average ``x`` is the model to evaluate).

Apte et al. 2026, "Anytime Training with Schedule-Free Spectral Optimization" (arXiv 2605.23061). The parameter
holds ``y`` in train mode and ``x`` in eval mode (``optimizer.train()`` / ``optimizer.eval()``, switched in a
Lightning run by :class:`~lightning_optim.callbacks.schedule_free.ScheduleFreeSwitch`); ``z`` is the fast iterate::

    (gradient g evaluated at y = (1-β1)·z + β1·x)
    m  = μ·m + (1-μ)·g;           P = NS(m)                       (no Nesterov look-ahead)
    v  = β2·v + (1-β2)·mean(P², -1);   P̂ = P / (sqrt(v) + eps)    (per row, as NorMuon)
    lr_t = lr·min(1, t/warmup_steps)
    z -= lr_t·wd·z + lr_t·0.2·sqrt(rows·cols)/‖P̂‖_F · P̂           (weight decay at z)
    c = w_t / Σ w_i,  w_t = t^r · lr_max^weight_lr_power  (lr_max = max lr_t so far; r 0, power 2)
    x = (1-c)·x + c·z

``x`` is not stored: like facebookresearch/schedule_free, the step updates ``y`` directly
(``y ← lerp(y, z, c) + lr_t·(β1(1-c)-1)·u``, ``z ← z - lr_t·u``) and ``eval()`` maps ``y → x``. Non-matrix
parameters use SF-AdamW with the weight decay at ``z`` (``u = g/(sqrt(v/bc2)+eps) + wd·z``) and their own
``adamw_lr``/``adamw_betas``/``adamw_eps``/``adamw_weight_decay``. The clock, the y-form step, the
``train()``/``eval()`` switch and that SF-AdamW update are the schedule-free core
(:mod:`lightning_optim.optim._schedule_free`), shared with ``sf-adamw``; each group's clock ticks when one of
its parameters has a gradient. State: z and m per matrix (2×P) plus the
rows of v; z and v for the rest.

Defaults (reported for the paper; confirm on your runs): β1 0.9, β2 0.95, μ 0.8, weight decay 0.05; lr 1e-3
and warmup 2000 steps (the SF-AdamW benchmark setting); AdamW part betas (0.9, 0.9999) as SF-AdamW's bench.
The per-group step count, ``lr_max``, ``weight_sum`` and ``train_mode`` are group keys present from construction,
so checkpoints (torch.save and torch.distributed.checkpoint) restore them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lightning_optim.optim._hybrid import HybridMatrixOptimizer, state_like_rows
from lightning_optim.optim._matrix_dist import MatrixMeta, local
from lightning_optim.optim._schedule_free import (ScheduleFreeModes, apply_direction, check_schedule_free,
                                                  clock_defaults, sf_adamw_update, tick)
from lightning_optim.optim.normuon import normuon_scales, row_normalize

__all__ = ["SFNorMuon"]


class SFNorMuon(ScheduleFreeModes, HybridMatrixOptimizer):
    """SF-NorMuon (see the module docstring). Call ``train()`` before steps and ``eval()`` before evaluating
    or saving; ``step()`` in eval mode raises."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 momentum: float = 0.8, weight_decay: float = 0.05, eps: float = 1e-10, warmup_steps: int = 2000,
                 r: float = 0.0, weight_lr_power: float = 2.0, ns_steps: int = 5, ns_coefficients: Any = "jordan",
                 adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.9999),
                 adamw_eps: float = 1e-8, adamw_weight_decay: float | None = None,
                 distributed: bool | None = None) -> None:
        check_schedule_free(tuple(betas), warmup_steps, r, weight_lr_power)
        check_schedule_free(tuple(adamw_betas), warmup_steps, r, weight_lr_power, betas_name="adamw_betas")
        defaults = dict(lr=lr, betas=tuple(betas), momentum=momentum, weight_decay=weight_decay, eps=eps,
                        ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        **clock_defaults(warmup_steps, r, weight_lr_power))
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, distributed=distributed)

    column_shards = True  # rows and norms completed across column blocks, as NorMuon

    def _check_mode(self) -> None:
        self._require_train_mode()

    # -- matrices ------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for group in self.param_groups[-1:]:
            for p, t in zip(group["params"], group.get("transposed") or []):
                if t and group["matrix"] and self._meta(p).kind == "sharded":
                    raise ValueError(f"SF-NorMuon: a transposed (in, out) weight of shape {tuple(p.shape)} in group "
                                     f"{group.get('name')!r} is an FSDP2 shard; its per-neuron rows would be split "
                                     "across ranks. Convert the Conv1D to nn.Linear or route it to AdamW.")

    def _init_matrix_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        state["z"] = p.detach().clone(memory_format=torch.preserve_format)
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.transposed_flags(group, [p])[0]:  # one moment per output neuron: the columns of an (in, out) weight
            state["v"] = torch.zeros(p.shape[1], 1, dtype=torch.float32, device=p.device)
        else:
            state["v"] = state_like_rows(p)

    def _ns_inputs(self, group: dict[str, Any], ps: list[Tensor]) -> list[Tensor]:
        grads = [local(p.grad) for p in ps]
        bufs = [local(self.state[p]["momentum_buffer"]) for p in ps]
        torch._foreach_lerp_(bufs, grads, 1.0 - group["momentum"])
        return bufs

    def _apply_matrix_update(self, group: dict[str, Any], ps: list[Tensor], ortho: list[Tensor],
                             metas: list[MatrixMeta]) -> None:
        lr_t, c = tick(group)
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        y = [local(p) for p in ps]
        z = [local(self.state[p]["z"]) for p in ps]
        v = [local(self.state[p]["v"]) for p in ps]
        flip = self.transposed_flags(group, ps)
        # rows are output neurons on the (out, in) view, for nn.Linear and HF Conv1D (stored (in, out)) alike
        P = [o.float().t() if f else o.float() for o, f in zip(ortho, flip)]
        metas = [dataclasses.replace(m, rows=m.cols, cols=m.rows) if f else m for m, f in zip(metas, flip)]
        Ph = row_normalize(P, v, beta2, group["eps"], metas)
        Ph = [o.t() if f else o for o, f in zip(Ph, flip)]
        P = [o.t() if f else o for o, f in zip(P, flip)]
        scales = normuon_scales(P, Ph, metas, "paper")
        u = [(o * s).view(x.shape).to(x.dtype) for o, s, x in zip(Ph, scales, y)]
        if wd:
            torch._foreach_add_(u, z, alpha=wd)
        apply_direction(y, z, u, lr_t, c, beta1)

    # -- the rest: SF-AdamW with decay at z ---------------------------------------------------------------

    def _step_other(self, group: dict[str, Any]) -> None:
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        for p in ps:
            state = self.state[p]
            if not state:
                state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        t = group["k"] + 1
        lr_t, c = tick(group)
        sf_adamw_update([local(p) for p in ps], [local(p.grad) for p in ps],
                        [local(self.state[p]["z"]) for p in ps], [local(self.state[p]["exp_avg_sq"]) for p in ps],
                        lr=lr_t, c=c, t=t, betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"], decay_at_z=True)

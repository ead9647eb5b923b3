"""LAMB (You et al. 2019/2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv 1904.00962, Algorithm 2), per parameter tensor ``x`` with gradient ``g`` at step ``t``::

    m = β1·m + (1-β1)·g;        v = β2·v + (1-β2)·g²
    m̂ = m / (1-β1^t);           v̂ = v / (1-β2^t)              (bias_correction=False: m̂ = m, v̂ = v)
    r = m̂ / (sqrt(v̂) + ε) + λ·x
    trust = φ(‖x‖) / ‖r‖        (1 when ‖x‖ = 0 or ‖r‖ = 0, as the reference implementation does)
    x ← x - η·trust·r

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085; no published cautious LAMB, so C-AdamW's rule on LAMB's
Adam part): the ratio ``m̂ / (sqrt(v̂) + ε)`` is masked where it disagrees with ``g`` and rescaled,
``u ⊙ 1[u ⊙ g > 0] / max(mean(1[u ⊙ g > 0]), 1e-3)`` (mean over the whole tensor, all-reduced under FSDP2), before
``λ·x`` is added (the weight decay is not masked); the trust ratio is then that of the resulting ``r``
(:mod:`lightning_optim.optim._cautious`).

``φ(z) = min(z, weight_norm_clip)`` (``None``: ``φ(z) = z``, the paper's experiments). The norms are of the
whole tensor ("layer"); under FSDP2 the squared norms of the shards are all-reduced, so a sharded run takes
the same step as an unsharded one. A group with ``layer_adaptation=False`` uses ``trust = 1`` (plain AdamW with
L2-in-the-update): Google's BERT LAMB excludes biases and LayerNorm gains this way.

Defaults: betas (0.9, 0.999), eps 1e-6 and weight decay 0.01 of the paper's BERT runs; lr 1e-3 (the paper's
lr grows with the batch size; tune it). Reference: google-research/bert ``optimization.py`` (LAMB variant in
tensorflow/addons ``lamb.py``). pytorch-optimizer's ``Lamb`` corrects the bias of ``m`` but not of ``v`` by
default (``adam_debias=False``), clips ``φ`` at 10 and divides by ``‖r‖ + ε``; with ``adam_debias=True`` (no
correction) it matches ``bias_correction=False, weight_norm_clip=10`` up to that ε (tested).

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

__all__ = ["LAMB"]


class LAMB(torch.optim.Optimizer):
    """Layer-wise adaptive AdamW: each tensor's update rescaled to the tensor's norm (trust ratio)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 weight_norm_clip: float | None = None, layer_adaptation: bool = True, cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        check_positive(eps=eps)
        if weight_norm_clip is not None:
            check_positive(weight_norm_clip=weight_norm_clip)
        super().__init__(params, dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bool(bias_correction), weight_norm_clip=weight_norm_clip,
                                      layer_adaptation=bool(layer_adaptation),
                                      cautious=check_cautious(cautious, "LAMB")))
        for i, group in enumerate(self.param_groups):
            group["cautious"] = check_cautious(group["cautious"], f"LAMB param_groups[{i}]")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                t = next_step(state)
                self._update(group, p, t, beta1, beta2)
        return loss

    def _update(self, group: dict[str, Any], p: torch.Tensor, t: int, beta1: float, beta2: float) -> None:
        state = self.state[p]
        x_store, m_store, v_store = local(p), local(state["exp_avg"]), local(state["exp_avg_sq"])
        x, g, m, v = up(x_store), up(local(p.grad)), up(m_store), up(v_store)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bc1, bc2 = (1.0 - beta1 ** t, 1.0 - beta2 ** t) if group["bias_correction"] else (1.0, 1.0)
        r = (m / bc1).div_((v / bc2).sqrt_().add_(group["eps"]))
        if group.get("cautious"):
            cautious_([r], [g], [p])
        if group["weight_decay"] != 0:
            r.add_(x, alpha=group["weight_decay"])
        if group["layer_adaptation"]:
            sq = shard_sum(torch.stack([x.square().sum(), r.square().sum()]), p)
            w_norm, r_norm = sq.sqrt().unbind()
            if group["weight_norm_clip"] is not None:
                w_norm = w_norm.clamp(max=group["weight_norm_clip"])
            r.mul_(torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm)))
        x.sub_(r, alpha=group["lr"])
        write_back(m_store, m)
        write_back(v_store, v)
        write_back(x_store, x)

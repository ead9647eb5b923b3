"""MARS-AdamW (Yuan et al. 2024, "MARS: Unleashing the Power of Variance Reduction for Training Large
Models", arXiv 2411.10438), for matrices; AdamW for everything else::

    matrices:  c = g + γ·(β1/(1-β1))·(g - g_prev);   if ‖c‖₂ > 1: c /= ‖c‖₂
               m = β1·m + (1-β1)·c;   v = β2·v + (1-β2)·c²
               p -= lr·(wd·p + (m/bc1)/(sqrt(v/bc2) + eps))
    others:    the same AdamW step on g, with ``adamw_lr`` and ``adamw_betas``

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085; C-AdamW's rule on both parts): the applied first moment
``m`` is masked where it disagrees with the raw gradient ``g`` (the gradient at the current weights, not the
corrected ``c``) and rescaled, ``m ⊙ 1[m ⊙ g > 0] / max(mean(1[m ⊙ g > 0]), 1e-3)``; state and weight decay are
not masked (:mod:`lightning_optim.optim._cautious`).

``g_prev`` starts at zeros (as in AGI-Arena/MARS). State 3×P for matrices (``exp_avg``, ``exp_avg_sq``,
``last_grad``), 2×P for the rest.

Routing: a group's ``"matrix"`` flag (``param_groups(module, split_matrices=True)`` sets it; the spec is a
hybrid, so ``create_optimizer("mars", module)`` splits) decides; a group without the flag is split at
construction by shape (``param_groups.split_by_shape``: >= 2-D with fewer than 10000 rows → MARS, so an
embedding/head-sized matrix gets AdamW; a warning names the shapes when the list has no names). Non-matrix groups get ``lr = adamw_lr`` and
``betas = adamw_betas`` unless the group sets its own ``lr`` / ``betas``; ``adamw_lr`` is an absolute lr,
not a multiple of ``lr`` (schedules then scale both parts alike).

Defaults (best 124M settings of Semenov et al. 2025): lr 3e-3, betas (0.95, 0.99), gamma 0.025 for
matrices; adamw_lr 1e-3, adamw_betas (0.9, 0.999) for the others (the benchmark reports 0.8 or 0.9 for β1);
eps 1e-8; weight decay 0.1.

Reference defect done right: AGI-Arena/MARS keeps ``state["last_grad"] = grad``, a *reference* to the live
``p.grad``; when gradients are zeroed in place (``zero_grad(set_to_none=False)``, or accumulated into the same
buffer) ``g - g_prev`` is always 0 and MARS silently becomes AdamW. Here ``last_grad`` is a copy.

Speed: the per-tensor norms come from one ``torch._foreach_norm`` and the ``> 1`` test is a device-side
``clamp_min(1)`` — no host sync. Under FSDP2 the norm of a sharded matrix is reduced across its shards
(one all-reduce of the stacked squared norms per bucket).

``state_dtype="bfloat16"`` keeps every state tensor (``last_grad`` too: ``g - g_prev`` enters scaled by
γ·β1/(1-β1) ≈ 0.5, so its bf16 rounding is gradient-sized noise of 2^-9 relative) in bfloat16, updated in
float32 and written back with stochastic rounding; ``compiled="auto"`` (default) compiles where a compiler is
present (``False``: the eager foreach path).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim._dtensor import is_sharded
from lightning_optim.optim._cautious import cautious, cautious_tensor, check_cautious
from lightning_optim.optim._elementwise import (
    Bucket,
    ElementwiseOptimizer,
    check_betas,
    check_nonneg,
    local,
)
from lightning_optim.optim._low_precision import store, up
from lightning_optim.param_groups import split_by_shape

__all__ = ["MARS"]


def _adamw_tail(p: torch.Tensor, c: torch.Tensor, m: torch.Tensor, v: torch.Tensor, w1: torch.Tensor,
                beta2: torch.Tensor, w2: torch.Tensor, inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor,
                decay: torch.Tensor, neg_lr_bc1: torch.Tensor, seed: torch.Tensor | None,
                mask_grad: torch.Tensor | None = None) -> None:
    """AdamW on the (corrected) gradient ``c``; ``mask_grad``: apply the cautious mask of ``m`` against it."""
    m32, v32 = up(m), up(v)
    m_new = m32 + w1 * (c - m32)
    v_new = v32 * beta2 + w2 * c * c
    m_app = m_new if mask_grad is None else cautious_tensor(m_new, mask_grad)
    p.copy_(up(p) * decay + neg_lr_bc1 * m_app / (torch.sqrt(v_new) * inv_sqrt_bc2 + eps))
    store(m, m_new, seed, 0)
    store(v, v_new, seed, 1)


def mars_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                vr: torch.Tensor, w1: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor,
                inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor, decay: torch.Tensor,
                neg_lr_bc1: torch.Tensor, seed: torch.Tensor | None = None, cautious: bool = False) -> None:
    """One matrix, for the compiled path: ``vr = γ·β1/(1-β1)``, ``w1 = 1 - β1``, ``w2 = 1 - β2``,
    ``decay = 1 - lr·wd``, ``neg_lr_bc1 = -lr/bc1``; ``seed``: stochastic rounding of bf16 state; ``cautious``:
    mask the applied ``m`` against ``g``."""
    g = up(g)
    c = g + vr * (g - up(last))
    c = c / torch.clamp_min(torch.linalg.vector_norm(c), 1.0)
    store(last, g, seed, 2)
    _adamw_tail(p, c, m, v, w1, beta2, w2, inv_sqrt_bc2, eps, decay, neg_lr_bc1, seed, g if cautious else None)


def mars_cautious_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                         vr: torch.Tensor, w1: torch.Tensor, beta2: torch.Tensor, w2: torch.Tensor,
                         inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor, decay: torch.Tensor,
                         neg_lr_bc1: torch.Tensor, seed: torch.Tensor | None = None) -> None:
    """:func:`mars_kernel` with the cautious mask."""
    mars_kernel(p, g, m, v, last, vr, w1, beta2, w2, inv_sqrt_bc2, eps, decay, neg_lr_bc1, seed, cautious=True)


def adamw_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, w1: torch.Tensor,
                 beta2: torch.Tensor, w2: torch.Tensor, inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor,
                 decay: torch.Tensor, neg_lr_bc1: torch.Tensor, seed: torch.Tensor | None = None,
                 cautious: bool = False) -> None:
    """The AdamW step of MARS's non-matrix parameters on one tensor, for the compiled path."""
    g = up(g)
    _adamw_tail(p, g, m, v, w1, beta2, w2, inv_sqrt_bc2, eps, decay, neg_lr_bc1, seed, g if cautious else None)


def adamw_cautious_kernel(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, w1: torch.Tensor,
                          beta2: torch.Tensor, w2: torch.Tensor, inv_sqrt_bc2: torch.Tensor, eps: torch.Tensor,
                          decay: torch.Tensor, neg_lr_bc1: torch.Tensor, seed: torch.Tensor | None = None) -> None:
    """:func:`adamw_kernel` with the cautious mask (C-AdamW)."""
    adamw_kernel(p, g, m, v, w1, beta2, w2, inv_sqrt_bc2, eps, decay, neg_lr_bc1, seed, cautious=True)


class MARS(ElementwiseOptimizer):
    """MARS-AdamW on matrices (variance-reduced, norm-clipped gradient), AdamW on the rest."""

    state_names = ("exp_avg", "exp_avg_sq")  # + last_grad for matrices
    extra_state_names = ("last_grad",)

    def __init__(self, params: Any, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 gamma: float = 0.025, eps: float = 1e-8, weight_decay: float = 0.1, adamw_lr: float = 1e-3,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), compiled: bool | str = "auto",
                 state_dtype: str | None = None, cautious: bool = False) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay, gamma=gamma, adamw_lr=adamw_lr)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        betas, adamw_betas = check_betas(betas, 2), check_betas(adamw_betas, 2, "adamw_betas")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        split: list[dict[str, Any]] = []
        for g in groups:
            g = dict(g)
            ps = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
            if "matrix" in g:
                split.append({**g, "params": ps})
                continue
            names = g.get("param_names")
            mat_idx, other_idx = split_by_shape(ps, names, owner="MARS")
            for idx, is_matrix in ((mat_idx, True), (other_idx, False)):
                if idx:
                    part = {**g, "params": [ps[i] for i in idx], "matrix": is_matrix}
                    if names is not None:
                        part["param_names"] = [names[i] for i in idx]
                    split.append(part)
        for g in split:
            if not g["matrix"]:
                g.setdefault("lr", adamw_lr)
                g.setdefault("betas", adamw_betas)
        super().__init__(split, dict(lr=lr, betas=betas, gamma=gamma, eps=eps, weight_decay=weight_decay,
                                     adamw_lr=adamw_lr, adamw_betas=adamw_betas, matrix=True,
                                     cautious=check_cautious(cautious, "MARS")), compiled,
                         state_dtype)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        names = self.state_names + (self.extra_state_names if group["matrix"] else ())
        return {n: self._state_zeros(p, group, n) for n in names}

    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        buckets = super()._buckets(group)
        if group["matrix"]:
            for b in buckets:
                b.state["last_grad"] = [local(self.state[p]["last_grad"]) for p in b.param_objs]
        return buckets

    def _step_bucket(self, group: dict[str, Any], b: Bucket) -> None:
        seeds = self._sr_seeds(group, b)
        # a sharded matrix's norm needs an all-reduce, which the compiled kernel does not do
        if self.use_compiled(b.params[0].device) and not any(is_sharded(p) for p in b.param_objs):
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            t = b.step + 1
            tail = (1.0 - beta1, beta2, 1.0 - beta2, 1.0 / math.sqrt(1.0 - beta2**t), group["eps"], 1.0 - lr * wd,
                    -lr / (1.0 - beta1**t))
            if group["matrix"]:
                b = self._run_kernel(b, self._kernel_for(group, b, mars_kernel, mars_cautious_kernel),
                                     (group["gamma"] * beta1 / (1.0 - beta1), *tail),
                                     ("exp_avg", "exp_avg_sq", "last_grad"), seeds=seeds)
            else:
                b = self._run_kernel(b, self._kernel_for(group, b, adamw_kernel, adamw_cautious_kernel), tail,
                                     seeds=seeds)
        if b.params:
            self._update_eager(group, b, self._update)

    def _update(self, group: dict[str, Any], b: Bucket) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        t = b.step + 1
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        m, v = b.state["exp_avg"], b.state["exp_avg_sq"]
        if group["matrix"]:
            last = b.state["last_grad"]
            c = torch._foreach_sub(b.grads, last)
            torch._foreach_mul_(c, group["gamma"] * beta1 / (1.0 - beta1))
            torch._foreach_add_(c, b.grads)
            torch._foreach_copy_(last, b.grads)  # a copy, not a reference to the live gradient
            norms = self._norms(c, b)
            torch._foreach_clamp_min_(norms, 1.0)
            torch._foreach_div_(c, norms)
        else:
            c = b.grads
        torch._foreach_lerp_(m, c, 1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, c, c, value=1.0 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, eps)
        if wd != 0:
            torch._foreach_mul_(b.params, 1.0 - lr * wd)
        torch._foreach_addcdiv_(b.params, cautious(m, b.grads, b.param_objs) if group.get("cautious") else m, denom,
                                value=-lr / bc1)

    @staticmethod
    def _norms(c: list[torch.Tensor], b: Bucket) -> list[torch.Tensor]:
        norms = list(torch._foreach_norm(c))
        sharded = [i for i, p in enumerate(b.param_objs) if is_sharded(p)]
        if sharded:
            import torch.distributed as dist

            sq = torch.stack([norms[i].float() ** 2 for i in sharded])
            p0 = b.param_objs[sharded[0]]
            for dim, pl in enumerate(p0.placements):
                if pl.is_shard():
                    dist.all_reduce(sq, group=p0.device_mesh.get_group(dim))
            for j, i in enumerate(sharded):
                norms[i] = sq[j].sqrt().to(norms[i].dtype)
        return norms

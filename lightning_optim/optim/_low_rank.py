"""Shared pieces of the low-rank projected optimizers (GaLore, APOLLO).

Both keep Adam moments of a projected gradient ``R`` (``r × n`` or ``m × r`` for an ``m × n`` matrix, ``r`` the
rank) and refresh the projection every ``update_proj_gap`` steps (at steps 1, 1 + gap, ...). The side follows
the shape, as both reference projectors do ("std" type): ``m >= n`` projects from the right
(``R = G·Pᵀ``, ``P`` is ``r × n``), ``m < n`` from the left (``R = Pᵀ·G``, ``P`` is ``m × r``), so the state is
``r × max(m, n)`` and the projector ``r × min(m, n)``. Tensors with more than two dimensions are viewed as
``shape[0] × prod(shape[1:])``. The rank is capped at ``min(m, n)``.

The Adam step is the one of both reference repositories (Hugging Face's AdamW, "correct_bias")::

    M = β1·M + (1-β1)·R;   V = β2·V + (1-β2)·R²
    N = M / (sqrt(V) + ε);  step size η·sqrt(1-β2^t) / (1-β1^t)
    (update applied)       then x ← x - η·λ·x       (decay after the update, on the updated weights)

Parameters that are not matrices (group ``matrix`` flag False, or fewer than two dimensions) take exactly this
AdamW step on the full gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._per_tensor import (check_betas, check_count, check_nonneg, check_positive,
                                               is_dtensor, is_matrix_param, next_step, up, write_back)

__all__ = ["LowRankAdam", "as_matrix", "project", "project_back", "adam_direction", "low_rank_shape",
           "projector_shape", "effective_rank", "apply_update", "check_low_rank", "refuse_dtensors"]


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def effective_rank(rank: int, shape: tuple[int, ...]) -> int:
    m, n = shape[0], math.prod(shape[1:])
    return max(1, min(rank, m, n))


def right_side(shape: tuple[int, ...]) -> bool:
    """Project from the right (``R = G·Pᵀ``) when the matrix has at least as many rows as columns."""
    return shape[0] >= math.prod(shape[1:])


def projector_shape(rank: int, shape: tuple[int, ...]) -> tuple[int, int]:
    m, n, r = shape[0], math.prod(shape[1:]), effective_rank(rank, shape)
    return (r, n) if right_side(shape) else (m, r)


def low_rank_shape(rank: int, shape: tuple[int, ...]) -> tuple[int, int]:
    m, n, r = shape[0], math.prod(shape[1:]), effective_rank(rank, shape)
    return (m, r) if right_side(shape) else (r, n)


def project(g: torch.Tensor, proj: torch.Tensor, right: bool) -> torch.Tensor:
    return g @ proj.T if right else proj.T @ g


def project_back(r: torch.Tensor, proj: torch.Tensor, right: bool) -> torch.Tensor:
    return r @ proj if right else proj @ r


def adam_direction(state: dict[str, Any], r: torch.Tensor, beta1: float, beta2: float, eps: float
                   ) -> torch.Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` with ``r`` (float32) and return ``M / (sqrt(V) + ε)``."""
    m_store, v_store = state["exp_avg"], state["exp_avg_sq"]
    m, v = up(m_store), up(v_store)
    m.lerp_(r, 1.0 - beta1)
    v.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    write_back(m_store, m)
    write_back(v_store, v)
    return m / v.sqrt().add_(eps)


def apply_update(p: torch.Tensor, direction: torch.Tensor, group: dict[str, Any], t: int) -> None:
    """``x ← x - η·sqrt(1-β2^t)/(1-β1^t)·direction``, then ``x ← x - η·λ·x`` (the reference order)."""
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    x = up(p)
    x.sub_(direction.reshape(p.shape), alpha=lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t))
    if wd != 0:
        x.mul_(1.0 - lr * wd)
    write_back(p, x)


def init_dense_state(state: dict[str, Any], p: torch.Tensor) -> None:
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def init_low_rank_state(state: dict[str, Any], p: torch.Tensor, rank: int) -> None:
    shape = tuple(p.shape)
    kw = dict(dtype=p.dtype, device=p.device)
    state["exp_avg"] = torch.zeros(low_rank_shape(rank, shape), **kw)
    state["exp_avg_sq"] = torch.zeros(low_rank_shape(rank, shape), **kw)
    state["projector"] = torch.zeros(projector_shape(rank, shape), **kw)


def check_low_rank(lr: Any, betas: Any, eps: Any, weight_decay: Any, rank: Any, update_proj_gap: Any,
                   scale: Any) -> tuple[float, float]:
    """Validate the hyperparameters both optimizers share (each error names the field); returns ``betas``."""
    check_nonneg(lr=lr, weight_decay=weight_decay)
    check_positive(eps=eps, scale=scale)
    check_count("rank", rank)
    check_count("update_proj_gap", update_proj_gap)
    return check_betas(betas)


def refuse_dtensors(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Refuse FSDP2 DTensor parameters at construction, naming the first: the projection needs whole matrices.
    (The registry refuses them too, from the spec; this covers direct construction.)"""
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if is_dtensor(p):
                label = repr(names[i]) if names and i < len(names) else f"(group {gi} item {i})"
                raise ValueError(f"{name}: parameter {label} is a DTensor (FSDP2 shard); the projection needs whole "
                                 "matrices, so use DDP, or an elementwise optimizer under FSDP2")


def uses_projection(group: dict[str, Any], p: torch.Tensor) -> bool:
    return p.ndim >= 2 and is_matrix_param(group, p) and p.numel() > 0


class LowRankAdam(torch.optim.Optimizer):
    """The loop both optimizers share: matrices take the subclass's projected step, the rest plain AdamW.

    Subclasses define ``refresh(group, g, right, rank, position, refresh_index)`` (the new float32 projector of
    the rank ``rank`` and side ``right`` for the float32 matrix gradient ``g``; ``position`` is the parameter's
    place in the optimizer, ``refresh_index`` counts the refreshes) and
    ``direction(group, state, g, r, right, t)`` (the full-size float32 step
    direction from the gradient ``g``, its projection ``r`` and the state)."""

    def refresh(self, group: dict[str, Any], g: torch.Tensor, right: bool, rank: int, position: int,
                refresh_index: int) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, group: dict[str, Any], state: dict[str, Any], g: torch.Tensor, r: torch.Tensor,
                  right: bool, t: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        position = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                position += 1  # the parameter's place in the optimizer: seeds random projections reproducibly
                if p.grad is None:
                    continue
                state = self.state[p]
                projected = uses_projection(group, p)
                if "exp_avg" not in state:
                    if projected:
                        init_low_rank_state(state, p, group["rank"])
                    else:
                        init_dense_state(state, p)
                t = next_step(state)
                g = up(p.grad)
                if not projected:
                    apply_update(p, adam_direction(state, g, beta1, beta2, group["eps"]), group, t)
                    continue
                g = as_matrix(g)
                shape = tuple(p.shape)
                right = right_side(shape)
                if (t - 1) % group["update_proj_gap"] == 0:
                    new = self.refresh(group, g, right, effective_rank(group["rank"], shape), position,
                                       (t - 1) // group["update_proj_gap"])
                    state["projector"].copy_(new)
                proj = up(state["projector"])
                r = project(g, proj, right)
                apply_update(p, self.direction(group, state, g, r, right, t), group, t)
        return loss

"""APOLLO (Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang & Lee 2024, "APOLLO: SGD-like Memory,
AdamW-level Performance", MLSys 2025, arXiv 2412.05270, Algorithm 1): Adam moments of a *random* low-rank
projection are used only to estimate how much Adam would rescale the gradient, channel by channel or for the
whole tensor; the raw gradient, rescaled, is the update. For an ``m × n`` matrix with gradient ``G`` at step
``t`` (``r`` = ``rank``, ``T`` = ``update_proj_gap``)::

    every T steps (t = 1, 1+T, ...):  P ~ N(0, 1/r), seeded
        m >= n:  P is r × n,  R = G·Pᵀ;        m < n:  P is m × r,  R = Pᵀ·G
    M = β1·M + (1-β1)·R;   V = β2·V + (1-β2)·R²;   N = M / (sqrt(V) + ε)
    channel-wise:  s_j = ‖N_:,j‖ / (‖R_:,j‖ + 1e-8) for each of the max(m, n) channels (columns of R when
                   m < n, rows when m >= n);   tensor-wise:  s = ‖N‖ / (‖R‖ + 1e-8)
    G̃ = G·s                                                       (the raw gradient, scaled per channel)
    norm-growth limiter (Fira; γ = norm_growth_limit, from step 2):
        if ‖G̃‖ > γ·‖G̃_prev‖:  G̃ ← G̃·γ‖G̃_prev‖/‖G̃‖;   then remember ‖G̃‖ (after limiting)
    W ← W - η·sqrt(1-β2^t)/(1-β1^t) · sqrt(scale)·G̃;      W ← W - η·λ·W

``scale`` has the reference code's meaning: the update is multiplied by ``sqrt(scale)`` (the paper's α; APOLLO-
Mini's α = sqrt(128) is ``scale=128``). The projection is drawn from a CPU generator seeded with
``(seed, the parameter's place in the optimizer, the refresh count)``, so runs and resumes are reproducible
on any device; it is kept in the state. Parameters that are not matrices (biases, norms, and — under the
default grouping — embeddings and the output head) take the reference's AdamW step on the full gradient.

Defaults (paper, LLaMA pretraining): lr 0.01, rank 256, channel-wise scaling, update_proj_gap 200, scale 1,
norm-growth limit 1.01, betas (0.9, 0.999), eps 1e-6, weight decay 0. APOLLO-Mini (registry ``apollo-mini``):
rank 1, tensor-wise, scale 128. Reference: zhuhanqing/APOLLO ``apollo_torch/apollo.py`` and
``random_projector.py``. Reference defect done right: pytorch-optimizer's ``APOLLO`` multiplies the *projected*
gradient by the scaling factor and projects it back (``Pᵀ·(s·R)``), which is not the paper's ``G·s`` (a rank-r
update instead of a rescaled full-rank gradient); the tests compare against the box above written plainly.

State per matrix: ``exp_avg``, ``exp_avg_sq`` (``r × max(m, n)``), ``projector`` (``r × min(m, n)``),
``scaled_norm`` (0-d), ``step``; per other parameter AdamW's ``exp_avg``, ``exp_avg_sq``. FSDP2 DTensor
parameters are refused at construction, by the class and by the registry (``supports_dtensor=False``): the
projection and the channel norms need the whole matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim.optim._low_rank import LowRankAdam, adam_direction, check_low_rank, refuse_dtensors
from lightning_optim.optim._per_tensor import check_positive

__all__ = ["APOLLO", "projection_seed"]

SCALE_TYPES = ("channel", "tensor")


def projection_seed(seed: int, position: int, refresh_index: int) -> int:
    """The generator seed of one refresh of one parameter's projection (a fixed mix of the three numbers)."""
    return ((seed * 1_000_003 + position) * 1_000_003 + refresh_index) % (2 ** 63)


class APOLLO(LowRankAdam):
    """Gradient scaling estimated from random-projected Adam moments (channel- or tensor-wise)."""

    def __init__(self, params: Any, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 256, update_proj_gap: int = 200,
                 scale: float = 1.0, scale_type: str = "channel", norm_growth_limit: float | None = 1.01,
                 seed: int = 0) -> None:
        betas = check_low_rank(lr, betas, eps, weight_decay, rank, update_proj_gap, scale)
        if scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {', '.join(SCALE_TYPES)}, got {scale_type!r}")
        if norm_growth_limit is not None:
            check_positive(norm_growth_limit=norm_growth_limit)
            if norm_growth_limit < 1:
                raise ValueError(f"norm_growth_limit must be >= 1 (or None to disable), got {norm_growth_limit!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type,
                                      norm_growth_limit=norm_growth_limit, seed=seed))
        refuse_dtensors(self, "apollo")

    def refresh(self, group: dict[str, Any], g: torch.Tensor, right: bool, rank: int, position: int,
                refresh_index: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(projection_seed(group["seed"], position, refresh_index))
        shape = (rank, g.shape[1]) if right else (g.shape[0], rank)
        return (torch.randn(shape, generator=gen, dtype=torch.float32) / math.sqrt(rank)).to(g.device)

    def direction(self, group: dict[str, Any], state: dict[str, Any], g: torch.Tensor, r: torch.Tensor,
                  right: bool, t: int) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        n = adam_direction(state, r, beta1, beta2, group["eps"])
        if group["scale_type"] == "channel":
            dim = 1 if right else 0  # the rank dimension of R: one factor per row (right) or column (left)
            s = n.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        else:
            s = n.norm() / (r.norm() + 1e-8)
        scaled = g * s
        limit = group["norm_growth_limit"]
        if limit is not None:
            norm = scaled.norm()
            if "scaled_norm" in state and t > 1:
                limiter = torch.clamp_min(norm / (state["scaled_norm"] + 1e-8), limit) / limit
                scaled.div_(limiter)
                norm = norm / limiter
            state["scaled_norm"] = norm.to(torch.float32)
        return scaled.mul_(math.sqrt(group["scale"]))

"""GaLore (Zhao, Zhang, Chen, Wang, Anandkumar & Tian 2024, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection", ICML 2024, arXiv 2403.03507, Algorithm 2): Adam on a low-rank projection of each
weight matrix's gradient, the projection refreshed from the gradient's SVD. For an ``m × n`` matrix with
gradient ``G`` at step ``t`` (``r`` = ``rank``, ``T`` = ``update_proj_gap``, ``α`` = ``scale``)::

    every T steps (t = 1, 1+T, ...):  U, S, Vᵀ = svd(G)
        m >= n:  P = Vᵀ[:r, :]   (r × n),   R = G·Pᵀ  (m × r),   back(N) = N·P
        m <  n:  P = U[:, :r]    (m × r),   R = Pᵀ·G  (r × n),   back(N) = P·N
    M = β1·M + (1-β1)·R;   V = β2·V + (1-β2)·R²;   N = M / (sqrt(V) + ε)
    W ← W - η·sqrt(1-β2^t)/(1-β1^t) · α·back(N);    W ← W - η·λ·W

The moments are kept across refreshes, as the reference does. The SVD runs in float32. Parameters that are not
matrices (biases, norms, and — under the default grouping — embeddings and the output head, which the paper
leaves to AdamW) take the same AdamW step on the full gradient. Tensors with more than two dimensions are
projected as ``shape[0] × prod(shape[1:])``; the rank is capped at ``min(m, n)``.

Defaults (paper, LLaMA pretraining): lr 0.01, rank 256 (the 130M/350M runs; 128 for 60M, 512 for 1B),
update_proj_gap 200, scale 0.25, betas (0.9, 0.999), eps 1e-6, weight decay 0. Reference:
jiaweizzhao/GaLore ``galore_torch/adamw.py`` and ``galore_projector.py``; pytorch-optimizer's ``GaLore`` follows
the same algorithm (the tests compare against it and against the box above written plainly).

State per matrix: ``exp_avg``, ``exp_avg_sq`` (``r × max(m, n)``), ``projector`` (``r × min(m, n)``), ``step``;
per other parameter AdamW's ``exp_avg``, ``exp_avg_sq``. All in the parameter's dtype, computed in float32.
FSDP2 DTensor parameters are refused at construction, by the class and by the registry
(``supports_dtensor=False``): the SVD needs the whole matrix.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_optim.optim._low_rank import LowRankAdam, adam_direction, check_low_rank, project_back, refuse_dtensors

__all__ = ["GaLore"]


class GaLore(LowRankAdam):
    """Adam with SVD-projected low-rank moments for matrices, AdamW for the rest."""

    def __init__(self, params: Any, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 256, update_proj_gap: int = 200,
                 scale: float = 0.25) -> None:
        betas = check_low_rank(lr, betas, eps, weight_decay, rank, update_proj_gap, scale)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale))
        refuse_dtensors(self, "galore")

    def refresh(self, group: dict[str, Any], g: torch.Tensor, right: bool, rank: int, position: int,
                refresh_index: int) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return vh[:rank, :] if right else u[:, :rank]

    def direction(self, group: dict[str, Any], state: dict[str, Any], g: torch.Tensor, r: torch.Tensor,
                  right: bool, t: int) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        n = adam_direction(state, r, beta1, beta2, group["eps"])
        return project_back(n, state["projector"].float(), right).mul_(group["scale"])

"""Muon and D-Muon: momentum orthogonalised by Newton–Schulz for hidden matrices, AdamW for the rest.

Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon; torch.optim.Muon)::

    buf = μ·buf + (1-μ)·g
    u   = (1-μ)·g + μ·buf          (nesterov)   else   buf
    O   = NS(u)                    (bf16, batched over same-shape matrices, once across ranks)
    p  *= 1 - lr·wd
    p  -= lr·s·O,   s = sqrt(max(1, rows/cols))        adjust_lr="original"
                    s = 0.2·sqrt(max(rows, cols))      adjust_lr="match_rms_adamw" (Moonlight)
                    s = 1                              adjust_lr="none"

rows × cols is the ``(out, in)`` view: a weight stored ``(in, out)`` (Hugging Face ``Conv1D``, flagged
``transposed`` by the default grouping) gets the factor of the equivalent ``nn.Linear``.

D-Muon (Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982) is Muon with decoupled
weight decay on the matrices and the ``match_rms_adamw`` scale, so one lr and one weight decay serve both
the matrices and the AdamW part.

Defaults are the best 124M settings of Semenov et al. 2025 (arXiv 2509.01440): Muon — matrices lr 0.01 without
weight decay, AdamW part lr 1e-3, betas (0.8, 0.999), weight decay 0.1 (applied to the decayable non-matrix
parameters, i.e. an untied output head); D-Muon — lr 1e-3 and weight decay 0.1 for both parts, betas (0.8, 0.999).
Both: momentum 0.95, Nesterov, 5 Newton–Schulz steps with Keller Jordan's coefficients
(``ns_coefficients="polar_express"`` for Amsel et al.'s per-iteration table).

``state_dtype="bfloat16"`` stores the matrices' momentum in bfloat16 with stochastic rounding (the EMA is
computed in float32); the internal AdamW keeps its state in the parameter's dtype.

Usage::

    opt = create_optimizer("muon", model)                       # routing by the default grouping rules
    opt = create_optimizer("d-muon", model, lr=2e-3, weight_decay=0.1)
    opt.routing_table()                                          # which parameter went where
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_optim.optim._cautious import cautious_, check_cautious
from lightning_optim.optim._hybrid import HybridMatrixOptimizer
from lightning_optim.optim._matrix_dist import MatrixMeta, local

__all__ = ["Muon", "muon_scale"]

_ADJUST = ("original", "match_rms_adamw", "none")


def muon_scale(adjust_lr: str | None, rows: int, cols: int) -> float:
    """The lr multiplier ``s`` for a ``rows × cols`` matrix under ``adjust_lr``."""
    if adjust_lr in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr == "none":
        return 1.0
    raise ValueError(f"adjust_lr must be one of {_ADJUST}, got {adjust_lr!r}")


class Muon(HybridMatrixOptimizer):
    """Muon / D-Muon in one optimizer object (see the module docstring for the math and defaults).

    Args:
        params: parameters or groups; groups with ``"matrix": False`` (or 1-D parameters of unflagged groups)
            use the internal AdamW.
        lr, weight_decay: matrix rule (decoupled weight decay ``p *= 1 - lr·wd``).
        momentum, nesterov: momentum μ (EMA form) and Nesterov look-ahead.
        ns_steps, ns_coefficients: Newton–Schulz iterations and coefficients (``"jordan"``, ``"polar_express"``,
            a triple or a list of triples).
        adjust_lr: ``"original"`` | ``"match_rms_adamw"`` | ``"none"``.
        eps: Newton–Schulz normalisation epsilon (1e-7).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part (``None``: the matrix value).
        distributed: ``None`` auto, ``False`` disables sharing Newton–Schulz work between DDP replicas.
        state_dtype: ``None`` (the parameter's dtype) or ``"bfloat16"`` for the momentum buffer.
        cautious: C-Muon (Liang et al. 2024): the orthogonalised update ``O`` is masked where it disagrees with
            ``p.grad`` and rescaled, ``O ⊙ φ / max(mean(φ), 1e-3)``, ``φ = 1[O ⊙ g > 0]``, before the lr scale;
            the internal AdamW becomes C-AdamW; weight decay is not masked (see ``_hybrid``).
    """

    column_shards = True  # the update reads only the global (rows, cols): column blocks (TP Shard(1)) step as they are

    def __init__(self, params: Any, lr: float = 0.01, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_coefficients: Any = "jordan",
                 adjust_lr: str | None = "original", eps: float = 1e-7, adamw_lr: float | None = 1e-3,
                 adamw_betas: tuple[float, float] = (0.8, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float | None = 0.1, distributed: bool | None = None,
                 state_dtype: str | None = None, cautious: bool = False) -> None:
        if adjust_lr is not None and adjust_lr not in _ADJUST:
            raise ValueError(f"adjust_lr must be one of {_ADJUST}, got {adjust_lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, adjust_lr=adjust_lr or "original", ns_eps=eps, eps=eps,
                        state_dtype=state_dtype, cautious=check_cautious(cautious, "Muon"))
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, distributed=distributed)

    def _apply_matrix_update(self, group: dict[str, Any], ps: list[Tensor], ortho: list[Tensor],
                             metas: list[MatrixMeta]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        pl = [local(p) for p in ps]
        upd = self._to_param(ortho, pl)
        if group.get("cautious"):
            cautious_(upd, [local(p.grad) for p in ps], ps)
        if wd:
            torch._foreach_mul_(pl, 1.0 - lr * wd)
        dims = self.lr_dims(group, ps, metas)
        torch._foreach_mul_(upd, [-lr * muon_scale(group["adjust_lr"], r, c) for r, c in dims])
        torch._foreach_add_(pl, upd)

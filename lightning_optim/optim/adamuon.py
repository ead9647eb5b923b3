"""AdaMuon: Muon with an element-wise second moment on the orthogonalised update and an RMS-aligned scale.

Si, Zhang & Shen 2025, "AdaMuon: Adaptive Muon Optimizer" (arXiv 2507.11005, v2/v3 algorithm box;
github.com/Chongjie-Si/AdaMuon). For a matrix ``W`` viewed ``m × n`` with gradient ``G``::

    M   = μ·M + (1-μ)·G;   U = (1-μ)·G + μ·M (nesterov) else M
    O   = NS(sign(U))                                   (sign=True: the paper's sign-stabilised direction)
    V   = β2·V + (1-β2)·O⊙O                            (element-wise; no bias correction, as the paper)
    Ô   = O ⊘ (sqrt(V) + eps)
    W  *= 1 - lr·wd
    W  -= lr · 0.2·sqrt(m·n) / ‖Ô‖_F · Ô              (update RMS 0.2, Adam's: Adam's lr and schedule carry over)

The momentum is kept in this package's EMA form (as Muon's); with ``sign=True`` the paper's sum form
``M = μ·M + G`` gives the same direction, since sign(U) does not depend on a positive factor. Bias correction of
``V`` would divide ``V`` by ``1 - β2^t``; the RMS rescale cancels it except through ``eps`` (the first official
code applied it, the paper does not), so it is left out. ``sign=False`` is the paper's first version (and
pytorch-optimizer's): ``O = NS(U)``.

Element-wise work on ``V`` and ``Ô`` is the same on ``(out, in)`` and ``(in, out)`` storage, and ``0.2·sqrt(m·n)``
is symmetric, so a Hugging Face ``Conv1D`` weight flagged ``transposed`` needs nothing special, also as an
FSDP2 shard. Under FSDP2 ``V`` is a DTensor shard laid out like the parameter (each rank updates its own rows),
and ``‖Ô‖_F`` is completed over the ranks with one all-reduce per step for all sharded matrices; the
orthogonalisation is the Muon family's (each matrix once across ranks, DDP/FSDP2/HSDP).

Defaults are the paper's GPT-2 setting (the official code's ``gpt2/models/train.py``: Adam's lr 6e-4 and weight
decay 0.1 for the matrices and for the AdamW part, whose betas are (0.9, 0.95)); μ 0.95 with Nesterov, and one
β for both moments as in the paper's algorithm (β2 = μ = 0.95), eps 1e-8, 5 Newton–Schulz steps with Keller
Jordan's coefficients. These are not a tuning from the 124M benchmark of Semenov et al., which has no AdaMuon.

``state_dtype="bfloat16"`` stores the momentum buffer in bfloat16 with stochastic rounding; ``V`` keeps the
parameter's dtype (its EMA is computed in float32), as does the internal AdamW's state.

``cautious=True`` (Liang et al. 2024, arXiv 2411.16085; :mod:`lightning_optim.optim._cautious`): the applied
update ``γ·Ô`` is masked where it disagrees with the gradient and rescaled by the mask's mean over the whole
matrix (C-Muon's rule on AdaMuon's final update; ``γ = 0.2·sqrt(mn)/‖Ô‖_F`` is computed from the unmasked
``Ô``), weight decay unmasked; the internal AdamW becomes C-AdamW, as for the rest of the Muon family.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_optim.optim._cautious import cautious_, check_cautious
from lightning_optim.optim._hybrid import HybridMatrixOptimizer
from lightning_optim.optim._matrix_dist import MatrixMeta, global_sq_norms, local

__all__ = ["AdaMuon", "adamuon_direction"]


def adamuon_direction(O: list[Tensor], v: list[Tensor], beta2: float, eps: float) -> list[Tensor]:
    """``V ← β2·V + (1-β2)·O⊙O`` in place (in float32, written back in ``V``'s dtype); returns
    ``O ⊘ (sqrt(V) + eps)`` in float32. ``O`` are float32 tensors shaped like the matching ``V``."""
    vf = [x.float() for x in v]  # the same tensor when V is float32
    torch._foreach_mul_(vf, beta2)
    torch._foreach_addcmul_(vf, O, O, value=1.0 - beta2)
    for dst, src in zip(v, vf):
        if dst is not src:
            dst.copy_(src)
    den = torch._foreach_sqrt(vf)
    torch._foreach_add_(den, eps)
    return torch._foreach_div(O, den)


class AdaMuon(HybridMatrixOptimizer):
    """AdaMuon (see the module docstring for the math, the source and the defaults).

    Args:
        params: parameters or groups; groups with ``"matrix": False`` (or 1-D parameters of unflagged groups)
            use the internal AdamW.
        lr, weight_decay: matrix rule (decoupled weight decay ``W *= 1 - lr·wd``).
        momentum, nesterov: momentum μ (EMA form) and Nesterov look-ahead.
        beta2: decay of the element-wise second moment ``V`` of ``NS(·)``'s output.
        eps: added to ``sqrt(V)``.
        sign: orthogonalise ``sign(U)`` (the paper's v2 algorithm) instead of ``U``.
        ns_steps, ns_coefficients: Newton–Schulz iterations and coefficients.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part (``None``: the matrix value).
        distributed: ``None`` auto, ``False`` disables sharing Newton–Schulz work between DDP replicas.
        state_dtype: ``None`` (the parameter's dtype) or ``"bfloat16"`` for the momentum buffer.
        cautious: mask the update where it disagrees with the gradient (C-AdaMuon; C-AdamW for the rest).
    """

    def __init__(self, params: Any, lr: float = 6e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, beta2: float = 0.95, eps: float = 1e-8, sign: bool = True,
                 ns_steps: int = 5, ns_coefficients: Any = "jordan", adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float | None = None, distributed: bool | None = None,
                 state_dtype: str | None = None, cautious: bool = False) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"AdaMuon: momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"AdaMuon: beta2 must be in [0, 1), got {beta2!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"AdaMuon: eps must be a finite number > 0, got {eps!r}")
        if not isinstance(sign, bool):
            raise ValueError(f"AdaMuon: sign must be True or False, got {sign!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, beta2=beta2,
                        eps=eps, sign=sign, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        state_dtype=state_dtype, cautious=check_cautious(cautious, "AdaMuon"))
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, distributed=distributed)

    def _init_matrix_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        super()._init_matrix_state(p, state, group)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # a shard like p

    def _ns_inputs(self, group: dict[str, Any], ps: list[Tensor]) -> list[Tensor]:
        u = super()._ns_inputs(group, ps)
        return torch._foreach_sign(u) if group["sign"] and u else u  # new tensors: the buffers are untouched

    def _apply_matrix_update(self, group: dict[str, Any], ps: list[Tensor], ortho: list[Tensor],
                             metas: list[MatrixMeta]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        pl = [local(p) for p in ps]
        v = [local(self.state[p]["exp_avg_sq"]) for p in ps]
        O = [o.float().reshape(x.shape) for o, x in zip(ortho, v)]
        Oh = adamuon_direction(O, v, group["beta2"], group["eps"])
        sq = global_sq_norms(Oh, metas)
        scales = [0.2 * math.sqrt(m.rows * m.cols) / s.sqrt().clamp_min(1e-30) for s, m in zip(sq, metas)]
        if group.get("cautious"):  # γ > 0: masking Ô is masking γ·Ô; the mask's mean is over the whole matrix
            Oh = cautious_(Oh, [local(p.grad).reshape(o.shape) for p, o in zip(ps, Oh)], ps)
        if wd:
            torch._foreach_mul_(pl, 1.0 - lr * wd)
        for x, o, s in zip(pl, Oh, scales):
            x.add_((o * (s * -lr)).to(x.dtype))

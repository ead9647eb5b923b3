"""NorMuon: Muon followed by a per-row (neuron-wise) second-moment normalisation.

Li et al. 2025, "NorMuon: Making Muon more efficient and scalable" (arXiv 2510.05491;
github.com/zichongli5/NorMuon)::

    buf = μ·buf + (1-μ)·g;   u = (1-μ)·g + μ·buf (nesterov) else buf
    O   = NS(u)                                      (rows × cols view, bf16 kernel, fp32 afterwards)
    v   = β2·v + (1-β2)·mean(O², dim=-1)             (state: rows × 1)
    Ô   = O / (sqrt(v) + eps)
    adjust_lr="paper":    Ô ← Ô · 0.2·sqrt(rows·cols) / ‖Ô‖_F                    (update RMS 0.2, AdamW-like)
    adjust_lr="official": Ô ← Ô · ‖O‖_F / ‖Ô‖_F · sqrt(max(1, rows/cols))        (the official code)
    p  *= 1 - lr·wd;   p -= lr·Ô

Rows are output neurons: a weight stored ``(in, out)`` (Hugging Face ``Conv1D``, flagged ``transposed`` by the
default grouping) is normalised on its ``(out, in)`` view, its ``v`` is ``out × 1``, and the "official" factor
uses ``rows/cols`` of that view, so it steps exactly as the equivalent ``nn.Linear``. Transposed weights must be
plain tensors (not FSDP2 shards: their row shards would split input features, not neurons).

Under FSDP2 the row moment lives with the row shard (a ``rows × 1`` DTensor sharded like the parameter) and the
two Frobenius norms are completed with one all-reduce per step for all sharded matrices together.

Defaults: μ 0.95 (Nesterov), β2 0.95, eps 1e-10, 5 Newton–Schulz steps; lr 1e-3 and weight decay 0.1 for both
parts, since the "paper" scale gives the update AdamW's RMS (as D-Muon does); AdamW part betas (0.8, 0.999).
These lr/wd values are our choice, not a published 124M tuning.

``state_dtype="bfloat16"`` stores the momentum buffer in bfloat16 with stochastic rounding; the row moment
``v`` (rows × 1) and the internal AdamW's state stay in float32 / the parameter's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from lightning_optim.optim._cautious import cautious_, check_cautious
from lightning_optim.optim._hybrid import HybridMatrixOptimizer, state_like_rows
from lightning_optim.optim._matrix_dist import MatrixMeta, global_sq_norms, local, row_mean_sq

__all__ = ["NorMuon", "row_normalize"]

_ADJUST = ("paper", "official")


def row_normalize(O: list[Tensor], v: list[Tensor], beta2: float, eps: float,
                  metas: list[MatrixMeta] | None = None) -> list[Tensor]:
    """``v ← β2·v + (1-β2)·mean(O², -1)`` in place; returns ``O / (sqrt(v)+eps)`` (O are fp32 ``rows × cols``).

    With ``metas``, the mean is over each whole row (``row_mean_sq``: column blocks of a tensor-parallel
    ``Shard(1)`` matrix are summed across their ranks)."""
    if metas is not None:
        mean_sq = row_mean_sq(O, metas)
    else:
        mean_sq = [o.square().mean(dim=-1, keepdim=True) if o.shape[0] else torch.zeros_like(vv)
                   for o, vv in zip(O, v)]
    torch._foreach_lerp_(v, mean_sq, 1.0 - beta2)
    den = torch._foreach_sqrt(v)
    torch._foreach_add_(den, eps)
    return [o / d for o, d in zip(O, den)]


def normuon_scales(O: list[Tensor], Oh: list[Tensor], metas: list[MatrixMeta], adjust_lr: str) -> list[Tensor]:
    """The per-matrix factor multiplying Ô (0-d tensors; no host sync). Global norms under sharding."""
    if adjust_lr == "paper":
        sq = global_sq_norms(Oh, metas)
        return [0.2 * math.sqrt(m.rows * m.cols) / s.sqrt().clamp_min(1e-30) for s, m in zip(sq, metas)]
    if adjust_lr == "official":
        sq = global_sq_norms(list(O) + list(Oh), list(metas) + list(metas))
        n = len(O)
        return [(sq[i].sqrt() / sq[n + i].sqrt().clamp_min(1e-10)) * math.sqrt(max(1.0, m.rows / m.cols))
                for i, m in enumerate(metas)]
    raise ValueError(f"adjust_lr must be one of {_ADJUST}, got {adjust_lr!r}")


class NorMuon(HybridMatrixOptimizer):
    """NorMuon (see the module docstring). Arguments as :class:`~lightning_optim.optim.muon.Muon`, plus
    ``beta2`` (row second moment), ``eps`` (added to sqrt(v)) and ``adjust_lr`` = ``"paper"`` | ``"official"``.
    ``cautious=True``: the applied update ``s·Ô`` (row-normalised, scaled) is masked where it disagrees with
    ``p.grad`` and rescaled by the mask's mean (C-Muon's rule on NorMuon's final update; ``s`` is computed from the
    unmasked ``Ô``); the internal AdamW becomes C-AdamW (see ``_hybrid``)."""

    column_shards = True  # per-row moments and norms are completed across column blocks (row_mean_sq, global_sq_norms)

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, beta2: float = 0.95, eps: float = 1e-10, ns_steps: int = 5,
                 ns_coefficients: Any = "jordan", adjust_lr: str = "paper", adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.8, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float | None = None, distributed: bool | None = None,
                 state_dtype: str | None = None, cautious: bool = False) -> None:
        if adjust_lr not in _ADJUST:
            raise ValueError(f"adjust_lr must be one of {_ADJUST}, got {adjust_lr!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, beta2=beta2,
                        eps=eps, ns_steps=ns_steps, ns_coefficients=ns_coefficients, adjust_lr=adjust_lr,
                        state_dtype=state_dtype, cautious=check_cautious(cautious, "NorMuon"))
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, distributed=distributed)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for group in self.param_groups[-1:]:
            for p, t in zip(group["params"], group.get("transposed") or []):
                if t and group["matrix"] and self._meta(p).kind == "sharded":
                    raise ValueError(f"NorMuon: a transposed (in, out) weight of shape {tuple(p.shape)} in group "
                                     f"{group.get('name')!r} is an FSDP2 shard; its per-neuron rows would be split "
                                     "across ranks. Convert the Conv1D to nn.Linear or route it to AdamW.")

    def _init_matrix_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        super()._init_matrix_state(p, state, group)
        if self.transposed_flags(group, [p])[0]:  # one moment per output neuron: the columns of an (in, out) weight
            state["v"] = torch.zeros(p.shape[1], 1, dtype=torch.float32, device=p.device)
        else:
            state["v"] = state_like_rows(p)

    def _apply_matrix_update(self, group: dict[str, Any], ps: list[Tensor], ortho: list[Tensor],
                             metas: list[MatrixMeta]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        pl = [local(p) for p in ps]
        flip = self.transposed_flags(group, ps)
        # work on the (out, in) view: rows are output neurons for nn.Linear and HF Conv1D alike
        O = [o.float().t() if f else o.float() for o, f in zip(ortho, flip)]
        metas = [dataclasses.replace(m, rows=m.cols, cols=m.rows) if f else m for m, f in zip(metas, flip)]
        v = [local(self.state[p]["v"]) for p in ps]
        Oh = row_normalize(O, v, group["beta2"], group["eps"], metas)
        Oh = [o.t() if f else o for o, f in zip(Oh, flip)]
        O = [o.t() if f else o for o, f in zip(O, flip)]
        scales = normuon_scales(O, Oh, metas, group["adjust_lr"])
        if group.get("cautious"):  # s > 0: masking Ô is masking s·Ô; the mask's mean is over the whole matrix
            Oh = cautious_(Oh, [local(p.grad).reshape(o.shape) for p, o in zip(ps, Oh)], ps)
        if wd:
            torch._foreach_mul_(pl, 1.0 - lr * wd)
        for x, o, s in zip(pl, Oh, scales):
            x.add_((o * (s * -lr)).view(x.shape).to(x.dtype))

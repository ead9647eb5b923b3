"""Scion (Pethick, Xie, Antonakopoulos, Zhu, Silveti-Falls & Cevher 2025, "Training Deep Learning Models with
Norm-Constrained LMOs", arXiv 2502.07529, Algorithms 1-2): momentum followed by a linear minimisation oracle
(LMO) over a norm ball chosen per layer type, per parameter tensor ``x`` with gradient ``g``::

    d ← μ·d + (1-μ)·g                                   (the paper's d = (1-α)·d + α·g with α = 1-μ)
    lmo(d) = argmin_{‖s‖ ≤ ρ} ⟨d, s⟩ = -ρ·D(d)          (D(d) below, per norm)
    x ← x - γ·ρ·D(d)                                    unconstrained=True   (uSCG, "unconstrained Scion")
    x ← (1-γ)·x - γ·ρ·D(d)                              unconstrained=False  (SCG, "Scion"; the default)

The constrained step is a convex combination of ``x`` and a point of the radius-ρ ball, so the iterates stay
in the ball: the ``(1-γ)`` factor is Scion's weight decay (coupled to the learning rate γ, the paper's
Section 3). Directions ``D`` (the paper's Table 2, with the reference code's scalings):

* ``"spectral"`` — hidden matrices (RMS→RMS operator norm): ``D(d) = sqrt(d_out/d_in)·U·Vᵀ`` for
  ``d = U·S·Vᵀ``, the polar factor approximated by 5 Newton–Schulz steps with Keller Jordan's coefficients
  (:func:`lightning_optim.optim.newton_schulz.newton_schulz`, bf16, as the reference). A parameter with more
  than two dimensions is viewed as ``shape[0] × prod(shape[1:])``.
* ``"sign"`` — the output head / a tied embedding (RMS→ℓ∞, or ℓ1→ℓ∞ for the input side):
  ``D(d) = sign(d) / d_in`` (the reference ``Sign(normalized=True)``).
* ``"rms_rows"`` — an untied embedding table stored ``(vocab, d)`` like ``nn.Embedding`` (ℓ1→RMS, the
  reference ``ColNorm(transpose=True)``): each token's row to RMS 1, ``D(d)_i = d_i / (‖d_i‖/sqrt(d) + ε)``.
* ``"bias_rms"`` — vectors (biases, norm gains; the reference ``BiasRMS`` of its ``Auto`` norm):
  ``D(d) = d / (RMS(d) + ε)``.

Routing: a group may set ``"norm"`` (one of the four) and ``"radius"``; otherwise each parameter is routed by
the default grouping's ``matrix`` flag (``create_optimizer`` / the mixin split matrices from the rest):
hidden matrices → ``"spectral"`` with ``radius``; other parameters with ≥ 2 dimensions (embeddings, the output
head) → ``"sign"`` with ``head_radius``; parameters with < 2 dimensions → ``"bias_rms"`` with
``vector_radius``. A plain parameter list has no flag: every tensor with ≥ 2 dimensions is a hidden matrix.

Defaults are the reference code's nanoGPT (modded-nanogpt, tied embeddings) run of the paper: lr (γ)
3.6e-4, α = 0.1 (``momentum=0.9`` here: the reference's ``momentum`` argument is α, ours is μ = 1-α, as in
every other optimizer of this package), hidden radius 50, head (Sign) radius 3000 = 50·60, constrained.
That run has no vector parameters; ``vector_radius=1.0`` (unit-RMS gains stay inside the ball) is ours.
Scion has no ``weight_decay``: a group's ``weight_decay`` entry (the default grouping writes 0 for no-decay
groups) is ignored, the constraint acts on every group unless the group sets ``unconstrained``.

Reference: https://github.com/LIONS-EPFL/scion (``scion.py``: ``Scion``, ``Spectral``, ``Sign``, ``ColNorm``,
``BiasRMS``). State per parameter: ``momentum_buffer`` (parameter-sized, the parameter's dtype); bf16
parameters are updated in float32 and written back. FSDP2 ``DTensor`` parameters are refused when the
optimizer is built, naming the parameter: the spectral LMO needs whole matrices.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._per_tensor import (check_finite_number, check_nonneg, check_positive, is_dtensor,
                                               is_matrix_param, local, up, write_back)
from lightning_optim.optim.newton_schulz import newton_schulz, resolve_coefficients

__all__ = ["Scion", "NORMS", "lmo_direction"]

NORMS = ("spectral", "sign", "rms_rows", "bias_rms")


def lmo_direction(norm: str, d: Tensor, eps: float, ns_steps: int = 5, ns_coefficients: Any = "jordan") -> Tensor:
    """``D(d)`` of the module docstring (float32, ``d``'s shape): ``lmo(d) = -radius·D(d)``."""
    if norm == "spectral":
        rows = d.shape[0]
        mat = d.reshape(rows, -1)
        cols = mat.shape[1]
        return newton_schulz(mat, ns_steps, ns_coefficients).float().mul_(math.sqrt(rows / cols)).view(d.shape)
    if norm == "sign":
        d_in = d.reshape(d.shape[0], -1).shape[1] if d.ndim >= 2 else 1
        return torch.sign(d).div_(d_in)
    if norm == "rms_rows":
        mat = d.reshape(d.shape[0], -1) if d.ndim >= 2 else d.reshape(1, -1)
        rms = mat.norm(dim=1, keepdim=True).div_(math.sqrt(mat.shape[1]))
        return (mat / rms.add_(eps)).view(d.shape)
    if norm == "bias_rms":
        rms = d.square().mean().sqrt()
        return d / rms.add_(eps)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _check_norm(norm: Any, where: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"{where} norm must be one of {NORMS}, got {norm!r}")
    return norm


def _check_lr(lr: Any, unconstrained: bool, where: str = "lr") -> None:
    check_nonneg(**{where: lr})
    if not unconstrained and lr > 1:
        raise ValueError(f"{where} must be <= 1 for the constrained variant (x ← (1-lr)·x + ...), got {lr!r}")


class Scion(torch.optim.Optimizer):
    """Momentum + a per-layer norm-ball LMO (see the module docstring for the math, routing and defaults).

    Args:
        params: parameters or groups; a group may set ``norm`` (``"spectral"``, ``"sign"``, ``"rms_rows"``,
            ``"bias_rms"``) and ``radius`` to override the routing.
        lr: γ, the step size (and, constrained, the shrink ``1-γ``; must be <= 1 then).
        momentum: μ in ``d ← μ·d + (1-μ)·g`` (the paper's α is ``1 - momentum``).
        radius, head_radius, vector_radius: ρ of hidden matrices (spectral), of embeddings / the head (sign),
            of vectors (bias_rms).
        unconstrained: ``False`` (Scion, iterates kept in the ball) or ``True`` (unconstrained Scion).
        ns_steps, ns_coefficients: the Newton–Schulz iteration of the spectral LMO.
        eps: added to the RMS in the ``rms_rows`` and ``bias_rms`` directions.
    """

    def __init__(self, params: Any, lr: float = 3.6e-4, momentum: float = 0.9, radius: float = 50.0,
                 head_radius: float = 3000.0, vector_radius: float = 1.0, unconstrained: bool = False,
                 ns_steps: int = 5, ns_coefficients: Any = "jordan", eps: float = 1e-8) -> None:
        _check_lr(lr, bool(unconstrained))
        if not 0.0 <= check_finite_number("momentum", momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        check_positive(radius=radius, head_radius=head_radius, vector_radius=vector_radius, eps=eps)
        resolve_coefficients(ns_coefficients, ns_steps)
        super().__init__(params, dict(lr=lr, momentum=momentum, radius=radius, head_radius=head_radius,
                                      vector_radius=vector_radius, unconstrained=bool(unconstrained),
                                      ns_steps=ns_steps, ns_coefficients=ns_coefficients, eps=eps))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        gi = len(self.param_groups)
        where = f"param group {param_group.get('name', gi)!r}"
        if "norm" in param_group and param_group["norm"] is not None:
            _check_norm(param_group["norm"], f"{where}:")
        ps = param_group.get("params")
        ps = [ps] if isinstance(ps, Tensor) else list(ps) if ps is not None else []
        names = param_group.get("param_names") or [None] * len(ps)
        for i, p in enumerate(ps):
            p = p[1] if isinstance(p, tuple) else p
            label = repr(names[i]) if i < len(names) and names[i] else f"{where} item {i} shape {tuple(p.shape)}"
            if param_group.get("norm") == "spectral" and p.ndim < 2:
                raise ValueError(f"scion: {where} sets norm 'spectral' but parameter {label} has {p.ndim} "
                                 "dimension(s); the spectral LMO needs a matrix (use 'bias_rms' or 'sign')")
            if is_dtensor(p):
                raise ValueError(f"scion: parameter {label} is a DTensor (FSDP2 shard); the spectral LMO needs "
                                 "whole matrices: use DDP, or an elementwise optimizer under FSDP2")
        param_group = {**param_group, "params": ps}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "radius" in param_group:
            check_positive(**{f"{where} radius": group["radius"]})
        _check_lr(group["lr"], group["unconstrained"], f"{where} lr")

    def _rule(self, group: dict[str, Any], p: Tensor) -> tuple[str, float]:
        """``(norm, radius)`` of parameter ``p`` in ``group``."""
        if group.get("norm") is not None:
            return group["norm"], group["radius"]
        if p.ndim < 2:
            return "bias_rms", group["vector_radius"]
        if is_matrix_param(group, p):
            return "spectral", group["radius"]
        return "sign", group["head_radius"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            # HF Conv1D weights are stored (in, out): the LMO (its shape factors and sign scaling) acts on the
            # (out, in) view, as for nn.Linear. The default grouping marks them in ``group["transposed"]``.
            flipped = {id(q) for q, t in zip(group["params"], group.get("transposed") or []) if t}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Scion does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                norm, radius = self._rule(group, p)
                x_store, d_store = local(p), local(state["momentum_buffer"])
                x, d = up(x_store), up(d_store)
                d.lerp_(up(local(p.grad)), 1.0 - mu)
                if id(p) in flipped and d.ndim == 2:
                    direction = lmo_direction(norm, d.t(), group["eps"], group["ns_steps"],
                                              group["ns_coefficients"]).t()
                else:
                    direction = lmo_direction(norm, d, group["eps"], group["ns_steps"], group["ns_coefficients"])
                if not group["unconstrained"]:
                    x.mul_(1.0 - lr)
                x.sub_(direction, alpha=lr * radius)
                write_back(d_store, d)
                write_back(x_store, x)
        return loss

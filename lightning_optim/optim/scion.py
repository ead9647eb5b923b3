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

d_out/d_in are those of the ``(out, in)`` view: a weight stored ``(in, out)`` (Hugging Face ``Conv1D``, flagged
``transposed`` by the default grouping) gets the LMO of the equivalent ``nn.Linear`` (its rows for ``rms_rows``
are the stored columns).

Routing: a group may set ``"norm"`` (one of the four) and ``"radius"``; otherwise each parameter is routed by
the default grouping's ``matrix`` flag (``create_optimizer`` / the mixin split matrices from the rest):
hidden matrices → ``"spectral"`` with ``radius``; other parameters with ≥ 2 dimensions (embeddings, the output
head) → ``"sign"`` with ``head_radius``; parameters with < 2 dimensions → ``"bias_rms"`` with
``vector_radius``. A plain parameter list has no flag: a tensor with ≥ 2 dimensions and fewer than 10000 rows
is a hidden matrix, a larger one (embedding- or head-sized) takes ``"sign"``.

Machinery. Scion is a :class:`~lightning_optim.optim._hybrid.HybridMatrixOptimizer`: parameters taking the
spectral LMO form its matrix groups (``"matrix": True``; a group mixing them with others is split into
``<name>_matrix`` and ``<name>_other``, ``param_names``/``transposed`` kept aligned), and their
orthogonalisation is the Muon family's (``_matrix_dist.orthogonalize``): batched per shape, shared among DDP
replicas (each matrix orthogonalised by one owner rank, ``distributed=None``), and computed once per matrix on
an owner for FSDP2 / HSDP / tensor-parallel DTensor shards. The other LMOs are elementwise up to a sum of
squares: ``sign`` needs only the global ``d_in``; ``rms_rows`` sums each row locally (rows are whole on a
``Shard(0)`` shard) and ``bias_rms`` the whole tensor, and a DTensor's partial sums are all-reduced over the
mesh dimensions that split the summed dimensions (one all-reduce per process group per step). Scion has no
internal AdamW.

Defaults are the reference code's nanoGPT (modded-nanogpt, tied embeddings) run of the paper: lr (γ)
3.6e-4, α = 0.1 (``momentum=0.9`` here: the reference's ``momentum`` argument is α, ours is μ = 1-α, as in
every other optimizer of this package), hidden radius 50, head (Sign) radius 3000 = 50·60, constrained.
That run has no vector parameters; ``vector_radius=1.0`` (unit-RMS gains stay inside the ball) is ours.
Scion has no ``weight_decay``: a group's ``weight_decay`` entry (the default grouping writes 0 for no-decay
groups) is ignored, the constraint acts on every group unless the group sets ``unconstrained``.

Reference: https://github.com/LIONS-EPFL/scion (``scion.py``: ``Scion``, ``Spectral``, ``Sign``, ``ColNorm``,
``BiasRMS``). State per parameter: ``momentum_buffer`` (parameter-sized, the parameter's dtype; a DTensor laid
out like the parameter under FSDP2); bf16 parameters are updated in float32 and written back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_optim._dtensor import DTensor, Replicate, shard_dim
from lightning_optim.optim._hybrid import HybridMatrixOptimizer
from lightning_optim.optim._matrix_dist import MatrixMeta, packed_all_reduce
from lightning_optim.optim._per_tensor import (check_finite_number, check_nonneg, check_positive, is_matrix_param,
                                               local, up, write_back)
from lightning_optim.optim.newton_schulz import newton_schulz, resolve_coefficients

__all__ = ["Scion", "NORMS", "lmo_direction"]

NORMS = ("spectral", "sign", "rms_rows", "bias_rms")


def summed_dims(norm: str, ndim: int, transposed: bool = False) -> tuple[int, ...]:
    """The tensor dimensions ``norm``'s direction sums squares over (``()`` for ``sign``: elementwise)."""
    if norm == "bias_rms" or (norm == "rms_rows" and ndim < 2):
        return tuple(range(ndim))
    if norm == "rms_rows":
        return (0,) if transposed else tuple(range(1, ndim))
    return ()


def partial_sq_sums(norm: str, d: Tensor, transposed: bool = False) -> Tensor | None:
    """Σ d² over :func:`summed_dims` of the data held (float32): a 0-d tensor for ``bias_rms``, one entry per
    row of the ``(out, in)`` view for ``rms_rows``, ``None`` for ``sign``."""
    if norm == "bias_rms":
        return d.float().square().sum()
    if norm == "rms_rows":
        if d.ndim < 2:
            return d.float().square().sum().reshape(1)
        return d.float().square().sum(0) if transposed else d.float().flatten(1).square().sum(1)
    return None


def _global_counts(norm: str, shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """``(d_in, count)`` from a parameter's *global* shape: sign's divisor and the number of squares summed."""
    if len(shape) >= 2:
        d_in = int(shape[0]) if transposed else math.prod(shape[1:])
    else:
        d_in = 1
    if norm == "bias_rms" or len(shape) < 2:
        return d_in, math.prod(shape)
    return d_in, (int(shape[0]) if transposed else math.prod(shape[1:]))


def elementwise_direction(norm: str, d: Tensor, sq: Tensor | None, shape: tuple[int, ...], eps: float,
                          transposed: bool = False) -> Tensor:
    """``D(d)`` of ``sign``, ``rms_rows`` or ``bias_rms`` (float32) from the held data ``d``, its *completed* sums
    of squares ``sq`` (:func:`partial_sq_sums` summed over the ranks) and the parameter's global ``shape``."""
    d_in, count = _global_counts(norm, tuple(shape), transposed)
    if norm == "sign":
        return torch.sign(d.float()).div_(d_in)
    rms = sq.div(count).sqrt_().add_(eps)
    if norm == "bias_rms" or d.ndim < 2:
        return d.float() / rms
    if transposed:
        return d.float() / rms.view(1, -1)
    return d.float() / rms.view(-1, *([1] * (d.ndim - 1)))


def lmo_direction(norm: str, d: Tensor, eps: float, ns_steps: int = 5, ns_coefficients: Any = "jordan") -> Tensor:
    """``D(d)`` of the module docstring for one whole tensor (float32, ``d``'s shape): ``lmo(d) = -radius·D(d)``."""
    if norm == "spectral":
        rows = d.shape[0]
        mat = d.reshape(rows, -1)
        cols = mat.shape[1]
        return newton_schulz(mat, ns_steps, ns_coefficients).float().mul_(math.sqrt(rows / cols)).view(d.shape)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return elementwise_direction(norm, d, partial_sq_sums(norm, d), tuple(d.shape), eps)


def complete_sq_sums(sums: list[Tensor | None], ps: list[Tensor], dims: list[tuple[int, ...]]) -> list[Tensor | None]:
    """Partial sums of squares of DTensor parameters summed over the ranks that split the summed dimensions:
    for each mesh dimension whose placement shards one of ``dims[i]``, an all-reduce over that dimension's
    process group (all the parameters sharing a group packed into one all-reduce). Plain tensors: unchanged."""
    jobs: dict[Any, tuple[Any, list[int]]] = {}
    for i, (s, p, ds) in enumerate(zip(sums, ps, dims)):
        if s is None or not isinstance(p, DTensor):
            continue
        for md, pl in enumerate(p.placements):
            if shard_dim(pl) in ds:
                pg = p.device_mesh.get_group(md)
                key = getattr(pg, "group_name", id(pg))
                jobs.setdefault(key, (pg, []))[1].append(i)
    out = list(sums)
    for pg, idx in jobs.values():
        for i, total in zip(idx, packed_all_reduce([out[i] for i in idx], pg)):
            out[i] = total
    return out


def _check_norm(norm: Any, where: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"{where} norm must be one of {NORMS}, got {norm!r}")
    return norm


def _check_lr(lr: Any, unconstrained: bool, where: str = "lr") -> None:
    check_nonneg(**{where: lr})
    if not unconstrained and lr > 1:
        raise ValueError(f"{where} must be <= 1 for the constrained variant (x ← (1-lr)·x + ...), got {lr!r}")


class Scion(HybridMatrixOptimizer):
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
        distributed: ``None`` (auto: DDP replicas share the Newton–Schulz work) or ``False`` (every rank
            orthogonalises all its plain matrices itself).
    """

    column_shards = True  # the spectral update reads only the global (rows, cols): column blocks step as they are

    def __init__(self, params: Any, lr: float = 3.6e-4, momentum: float = 0.9, radius: float = 50.0,
                 head_radius: float = 3000.0, vector_radius: float = 1.0, unconstrained: bool = False,
                 ns_steps: int = 5, ns_coefficients: Any = "jordan", eps: float = 1e-8,
                 distributed: bool | None = None) -> None:
        _check_lr(lr, bool(unconstrained))
        if not 0.0 <= check_finite_number("momentum", momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        check_positive(radius=radius, head_radius=head_radius, vector_radius=vector_radius, eps=eps)
        resolve_coefficients(ns_coefficients, ns_steps)
        defaults = dict(lr=lr, momentum=momentum, radius=radius, head_radius=head_radius,
                        vector_radius=vector_radius, unconstrained=bool(unconstrained), ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, eps=eps)
        # no internal AdamW: the adamw_* settings are never read (Scion routes its own groups, _step_other below)
        super().__init__(params, defaults, adamw_lr=None, adamw_betas=(), adamw_eps=eps, adamw_weight_decay=None,
                         distributed=distributed)

    # -- routing --------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"param group {param_group.get('name', len(self.param_groups))!r}"
        norm = param_group.get("norm")
        if norm is not None:
            _check_norm(norm, f"{where}:")
        group = dict(param_group)
        ps = group.get("params")
        ps = [ps] if isinstance(ps, Tensor) else list(ps) if ps is not None else []
        if ps and isinstance(ps[0], tuple):  # named parameters
            group["param_names"] = [n for n, _ in ps]
            ps = [p for _, p in ps]
        group["params"] = ps
        names = group.get("param_names") or [None] * len(ps)
        for i, p in enumerate(ps):
            label = repr(names[i]) if i < len(names) and names[i] else f"{where} item {i} shape {tuple(p.shape)}"
            if norm == "spectral" and p.ndim < 2:
                raise ValueError(f"scion: {where} sets norm 'spectral' but parameter {label} has {p.ndim} "
                                 "dimension(s); the spectral LMO needs a matrix (use 'bias_rms' or 'sign')")
        flags = self._check_transposed(group)
        if norm is not None:
            spectral = [norm == "spectral"] * len(ps)
        else:
            spectral = [p.ndim >= 2 and is_matrix_param(group, p) for p in ps]
        if len(set(spectral)) <= 1:
            self._add_routed(group, spectral[0] if spectral else bool(group.get("matrix", False)), where)
            return
        base = group.get("name")
        for flag, suffix in ((True, "matrix"), (False, "other")):
            idx = [i for i, s in enumerate(spectral) if s is flag]
            part = {**group, "params": [ps[i] for i in idx], "name": f"{base}_{suffix}" if base else suffix}
            if group.get("param_names") is not None:
                part["param_names"] = [names[i] for i in idx]
            if flags is not None:
                part["transposed"] = [flags[i] for i in idx]
            self._add_routed(part, flag, f"param group {part['name']!r}")

    def _add_routed(self, group: dict[str, Any], spectral: bool, where: str) -> None:
        """Add ``group`` as a matrix group (the hybrid's orthogonalisation) or as an elementwise-LMO group."""
        group["matrix"] = spectral
        if spectral:
            super().add_param_group(group)
        else:
            names = group.get("param_names") or [None] * len(group["params"])
            for n, p in zip(names, group["params"]):
                if isinstance(p, DTensor) and any(shard_dim(pl) is None and not isinstance(pl, Replicate)
                                                  for pl in p.placements):
                    raise ValueError(f"scion: parameter {n or tuple(p.shape)!r} is a DTensor with placements "
                                     f"{tuple(p.placements)}; Scion supports Shard and Replicate placements")
            torch.optim.Optimizer.add_param_group(self, group)
        added = self.param_groups[-1]
        if "radius" in group:
            check_positive(**{f"{where} radius": added["radius"]})
        _check_lr(added["lr"], added["unconstrained"], f"{where} lr")

    def _rule(self, group: dict[str, Any], p: Tensor) -> tuple[str, float]:
        """``(norm, radius)`` of parameter ``p`` in ``group``."""
        if group.get("norm") is not None:
            return group["norm"], group["radius"]
        if group["matrix"]:
            return "spectral", group["radius"]
        if p.ndim < 2:
            return "bias_rms", group["vector_radius"]
        return "sign", group["head_radius"]

    def routing_table(self) -> list[dict[str, Any]]:
        """One row per parameter: name, shape, rule (the LMO: ``spectral``/``sign``/``rms_rows``/``bias_rms``),
        radius, group name, lr, whether it is stored transposed and the group's muP ``lr_multiplier``. Scion has
        no weight decay (``weight_decay`` 0; the constrained variant's ``1-lr`` shrink is its decay)."""
        rows = []
        for gi, g in enumerate(self.param_groups):
            names = g.get("param_names") or [f"{g.get('name', gi)}[{i}]" for i in range(len(g["params"]))]
            flags = g.get("transposed") or [False] * len(g["params"])
            for n, p, t in zip(names, g["params"], flags):
                norm, radius = self._rule(g, p)
                rows.append({"name": n, "shape": tuple(p.shape), "rule": norm, "radius": radius,
                             "group": g.get("name", str(gi)), "lr": g["lr"], "weight_decay": 0.0,
                             "transposed": bool(t), "lr_multiplier": g.get("lr_multiplier", 1.0)})
        return rows

    # -- the step: hidden matrices (spectral) ----------------------------------------------------------------

    def _ns_inputs(self, group: dict[str, Any], ps: list[Tensor]) -> list[Tensor]:
        """``d ← lerp(d, g, 1-μ)`` in float32 (written back to the stored buffer); the ``d`` to orthogonalise."""
        return [self._momentum(group, p) for p in ps]

    def _momentum(self, group: dict[str, Any], p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        d_store = local(state["momentum_buffer"])
        d = up(d_store)
        d.lerp_(up(local(p.grad)), 1.0 - group["momentum"])
        write_back(d_store, d)
        return d

    def _apply_matrix_update(self, group: dict[str, Any], ps: list[Tensor], ortho: list[Tensor],
                             metas: list[MatrixMeta]) -> None:
        """``x ← (1-γ)·x - γ·ρ·sqrt(d_out/d_in)·O`` (or without the shrink), ``O`` = NS(d) of the held rows."""
        lr, radius = group["lr"], group["radius"]
        for p, o, (rows, cols) in zip(ps, ortho, self.lr_dims(group, ps, metas)):
            x_store = local(p)
            x = up(x_store)
            direction = o.to(torch.float32, copy=True).view(x.shape).mul_(math.sqrt(rows / cols))
            if not group["unconstrained"]:
                x.mul_(1.0 - lr)
            x.sub_(direction, alpha=lr * radius)
            write_back(x_store, x)

    # -- the step: sign / rms_rows / bias_rms ----------------------------------------------------------------

    def _step_other(self, group: dict[str, Any]) -> None:
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        for p in ps:
            if p.grad.is_sparse:
                raise RuntimeError("Scion does not support sparse gradients")
        lr = group["lr"]
        flips = self.transposed_flags(group, ps)
        rules = [self._rule(group, p) for p in ps]
        ds = [self._momentum(group, p) for p in ps]
        sums = [partial_sq_sums(n, d, f) for (n, _), d, f in zip(rules, ds, flips)]
        sums = complete_sq_sums(sums, ps, [summed_dims(n, p.ndim, f) for (n, _), p, f in zip(rules, ps, flips)])
        for p, d, (norm, radius), f, sq in zip(ps, ds, rules, flips, sums):
            direction = elementwise_direction(norm, d, sq, tuple(p.shape), group["eps"], f)
            x_store = local(p)
            x = up(x_store)
            if not group["unconstrained"]:
                x.mul_(1.0 - lr)
            x.sub_(direction, alpha=lr * radius)
            write_back(x_store, x)

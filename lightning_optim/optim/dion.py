"""Dion: a low-rank orthonormal update from one step of power iteration, with error feedback.

Ahn, Xu, Abreu, Fan, Magakyan, Sharma, Zhan & Langford 2025, "Dion: Distributed Orthonormalized Updates"
(arXiv 2504.05295), Algorithm 1. For a matrix parameter ``X`` (``m × n``, the ``(out, in)`` view; a weight
of more than two dimensions is viewed ``shape[0] × prod(shape[1:])``) with gradient ``G``, error-feedback
buffer ``M`` (``m × n``, zeros at first) and right factor ``Q`` (``n × r``)::

    B = M + G
    P = B·Q                          (m × r)
    P = orth(P)                      (QR: orthonormal columns, positive diagonal of R)
    R = Bᵀ·P                         (n × r)
    M ← B − (1 − μ)·P·Rᵀ             (error feedback: what the rank-r step left out stays in M)
    Q ← column_normalise(R)          (Q_j = R_j / (‖R_j‖ + ε))
    X ← (1 − lr·wd)·X − lr·sqrt(m/n)·P·Qᵀ

``r = min(m, n, ceil(rank_fraction · min(m, n)))``; ``rank_fraction=1`` is a full-rank (Muon-like) update.
With ``power_iters > 1`` the three middle lines repeat with ``Q = R`` before the error feedback, as
microsoft/dion's reference does. Everything else (embeddings, the output head, vectors) follows the internal
AdamW (:class:`~lightning_optim.optim._hybrid.HybridMatrixOptimizer`'s routing), with Dion's lr and weight
decay unless ``adamw_lr`` / ``adamw_weight_decay`` are set, as microsoft/dion's scalar AdamW does.

Choices, checked against microsoft/dion (``dion/dion_reference.py``, ``dion/dion.py``) and written anew:

* **Orientation.** The algorithm always runs on the ``(out, in)`` view, ``P`` on the rows (``m``), ``Q`` on the
  columns (``n``), whatever the shape or the sharding, so one process and any FSDP2 / HSDP layout compute the
  same step. (The reference transposes wide matrices, and transposes every FSDP-sharded one, so its step
  depends on the layout.) A Hugging Face ``Conv1D`` weight (stored ``(in, out)``, flagged ``transposed``) is
  stepped on its transposed view, so it steps as the equivalent ``nn.Linear``; FSDP2-sharded ``Conv1D``
  weights are refused (their row shards would be column shards of the view).
* **orth.** ``qr_method="rcqr"`` (the default, the reference's): randomised Cholesky QR. A Gaussian sketch
  ``S`` (``k × m``, ``k = ceil(1.25·r)``, entries ``N(0, 1/k)``, seeded by ``(seed, step, parameter)``, so
  every rank draws the same one) gives ``R₁`` from the QR of ``S·P`` (``k × r``); ``P₁ = P·R₁⁻¹`` is well
  conditioned, and one Cholesky QR pass (``R₂ = chol(P₁ᵀP₁)``, ``P ← P₁·R₂⁻¹``) makes it orthonormal. Both
  triangular factors have a positive diagonal, so the result is *the* QR factor of ``P`` (the Gram–Schmidt
  basis), the same as Householder's up to rounding. ``qr_method="qr"``: Householder QR of the whole ``P``
  (``torch.linalg.qr``, signs fixed the same way); plain tensors only. A column of ``P`` that depends on the
  earlier ones (``|R_jj| ≤ 100·ε_dtype·max|R_ii|``, e.g. all of them when ``B = 0``) is dropped: ``P_j = 0``,
  and ``Q_j`` keeps its previous value (the reference's all-zero guard, per column).
* **Initial Q.** ``N(0, 1)`` from a generator seeded by ``(seed, group, position)``: identical on every rank,
  in one process and under any sharding; ``Q`` lives in the state dict, so a resumed run is exact.
* **Precision.** ``M`` and ``Q`` are stored in the parameter's dtype (the reference's default). The step is
  computed in float32 (float64 for float64 parameters), QR and Cholesky included.

**Distributed.** DDP replicas (plain tensors, ``world > 1``): the gradients are already averaged, so every
rank computes the same step with no communication (the Dion step is three rank-``r`` products, cheap next to
Newton–Schulz, so it is not split between ranks). FSDP2 (``Shard(0)`` on a 1-D mesh) and HSDP
(``(Replicate(), Shard(0))``): ``M`` is row-sharded like the parameter, ``Q`` (``n × r``) is replicated.
``P = B·Q`` needs no communication (each rank its rows); ``S·P``, ``P₁ᵀP₁`` and ``Y = Bᵀ·P₁`` are sums over
the row shards, and ``R = Bᵀ·P = Y·R₂⁻¹`` follows locally; everything else is local. Per step and shard group,
for all its sharded matrices together (packed, one collective each, float32)::

    all_reduce  Σ k_i·r_i          (the sketches S·P)                    ×power_iters
    all_reduce  Σ (r_i + n_i)·r_i  (the Gram matrices and Y = Bᵀ·P₁)     ×power_iters

so 2 all-reduces per step (``power_iters = 1``), whatever the number of matrices, carrying
``Σ (1.25·r_i + r_i + n_i)·r_i`` elements; no full matrix is ever assembled on a rank. Under HSDP they run in
the shard group; the replicas hold the same rows and compute the same step (FSDP2 has already averaged the
gradients across them). The payload does not shrink with the number of ranks: at full rank it is up to
3.25·n·r float32 per matrix, far more bytes than Muon's owner all-to-alls (bf16, ``1/W`` of the matrices per
rank); Dion's bytes fall with ``rank_fraction`` (the sketch and Gram terms as its square). Row blocks that
span several mesh dimensions (FSDP2 over ``ColwiseParallel`` tensor parallelism) are summed over their holder
group the same way (not tested here); column shards (``RowwiseParallel``) are refused by name.

Defaults are microsoft/dion's ``Dion``: lr 0.01, μ 0.95, weight decay 0.01, rank_fraction 1.0, ε 1e-8,
power_iters 1, qr_method "rcqr"; AdamW part betas (0.9, 0.95), eps 1e-8, Dion's lr and weight decay.

Usage::

    opt = create_optimizer("dion", model, lr=0.02, rank_fraction=0.25)
    opt.routing_table()
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_optim.optim._hybrid import HybridMatrixOptimizer
from lightning_optim.optim._low_precision import mix_seed
from lightning_optim.optim._matrix_dist import MatrixMeta, local, packed_all_reduce

__all__ = ["Dion", "dion_rank", "initial_q", "SKETCH_OVERSAMPLE"]

SKETCH_OVERSAMPLE = 1.25  # rows of the randomised-QR sketch per column of P (the reference's rcqr_oversample)
_QR_METHODS = ("rcqr", "qr")
_DEAD_TOL = 100.0  # a column is dependent when |R_jj| <= _DEAD_TOL * eps(dtype) * max |R_ii|


def dion_rank(rows: int, cols: int, rank_fraction: float) -> int:
    """``r = min(rows, cols, ceil(rank_fraction · min(rows, cols)))``, at least 1."""
    d = min(int(rows), int(cols))
    return max(1, min(d, math.ceil(rank_fraction * d - 1e-9)))


def initial_q(cols: int, r: int, seed: int, group_index: int, position: int) -> Tensor:
    """The initial right factor of the parameter at ``position`` in param group ``group_index``: ``N(0, 1)``,
    ``cols × r``, float32 on the CPU, from a generator seeded by ``(seed, group_index, position)``, so every
    rank (and every layout) starts from the same ``Q``."""
    gen = torch.Generator().manual_seed(mix_seed(seed, group_index, position, 0x51))
    return torch.randn(cols, r, generator=gen, dtype=torch.float32)


def sketch_rows(r: int) -> int:
    """Rows ``k`` of the randomised-QR sketch for ``r`` columns."""
    return math.ceil(SKETCH_OVERSAMPLE * r)


def _check_hp(where: str, rank_fraction: Any, mu: Any, power_iters: Any, qr_method: Any, epsilon: Any,
              seed: Any) -> None:
    def real(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not real(rank_fraction) or not 0.0 < rank_fraction <= 1.0:
        raise ValueError(f"{where}rank_fraction must be a number in (0, 1], got {rank_fraction!r}")
    if not real(mu) or not 0.0 <= mu < 1.0:
        raise ValueError(f"{where}mu must be a number in [0, 1), got {mu!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
        raise ValueError(f"{where}power_iters must be an integer >= 1, got {power_iters!r}")
    if qr_method not in _QR_METHODS:
        raise ValueError(f"{where}qr_method must be one of {_QR_METHODS}, got {qr_method!r}")
    if not real(epsilon) or epsilon <= 0:
        raise ValueError(f"{where}epsilon must be a positive number, got {epsilon!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{where}seed must be an integer, got {seed!r}")


@dataclass
class _Work:
    """One matrix in this step: its local 2-D view of ``B`` and everything the step needs about it."""

    p: Tensor
    group: dict[str, Any]
    meta: MatrixMeta
    flip: bool  # stored (in, out): the algorithm runs on the transposed view
    rows: int  # m of the (out, in) view
    cols: int  # n
    B: Tensor  # local rows of B (m_local × n), compute dtype
    Q: Tensor  # n × r, compute dtype
    seed: int
    P: Tensor | None = None
    live: Tensor | None = None  # bool (r,): columns of P kept by orth
    R: Tensor | None = None

    def sharded(self) -> bool:
        return self.meta.kind == "sharded"

    def row_range(self) -> tuple[int, int]:
        """The rows of the stored matrix this rank holds (its block: FSDP2's ``torch.chunk`` rows, or under
        FSDP2 over tensor parallelism a block whose place need not follow the rank order)."""
        if not self.sharded():
            return 0, self.rows
        start, n, _, _ = self.meta.block(self.meta.rank)
        return start, start + n


def _all_reduce_sum(tensors: list[Tensor], works: list[_Work]) -> list[Tensor]:
    """Each tensor summed over the row shards of its matrix (sharded matrices only): one packed all-reduce per
    (process group, dtype). Every rank of a shard group passes the same matrices in the same order."""
    out = list(tensors)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(works):
        if w.sharded():
            buckets[(w.meta.bucket_key(), tensors[i].dtype)].append(i)
    for idx in buckets.values():
        for i, total in zip(idx, packed_all_reduce([tensors[i] for i in idx], works[idx[0]].meta.group)):
            out[i] = total
    return out


def _positive_diagonal(R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(D·R, d, live)``: rows of an upper-triangular ``R`` scaled by the signs ``D`` of its diagonal (so the
    diagonal is non-negative), the signs, and which columns are independent (``|R_jj|`` above the tolerance)."""
    diag = R.diagonal()
    sign = torch.where(diag < 0, -1.0, 1.0).to(R.dtype)
    mag = diag.abs()
    live = mag > _DEAD_TOL * torch.finfo(R.dtype).eps * mag.max()
    return R * sign.unsqueeze(1), sign, live


def _solve_right(R: Tensor, live: Tensor, P: Tensor) -> Tensor:
    """``P·R⁻¹`` for upper-triangular ``R``, dependent columns dropped (their row of ``R`` cleared, diagonal 1;
    their column of the result set to 0)."""
    keep = live.to(R.dtype)
    R = R * keep.unsqueeze(1) + torch.diag(1.0 - keep)
    return torch.linalg.solve_triangular(R, P, upper=True, left=False) * keep


def _householder(P: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR of a whole ``m × r`` matrix (``m >= r``): the Q factor with the signs that make R's
    diagonal positive, dependent columns zeroed; and the live mask."""
    Qf, R = torch.linalg.qr(P, mode="reduced")
    _, sign, live = _positive_diagonal(R)
    return Qf * sign * live.to(P.dtype), live


def _power_step(works: list[_Work]) -> None:
    """One power-iteration step for every matrix: ``w.P ← orth(w.B·w.Q)``, ``w.R ← w.Bᵀ·w.P`` and ``w.live``.

    ``"qr"``: Householder on the whole ``P``, then ``R`` (plain tensors: nothing to sum). ``"rcqr"``: the
    sketch ``S·P`` is summed over the row shards (all-reduce 1); then ``P₁ᵀP₁`` and ``Y = Bᵀ·P₁`` travel together
    (all-reduce 2), and with ``R₂ = chol(P₁ᵀP₁)``: ``P = P₁·R₂⁻¹`` and ``R = Bᵀ·P = Y·R₂⁻¹``, so ``R`` needs no
    collective of its own. Both all-reduces are packed over all sharded matrices of a shard group."""
    for w in works:
        w.P = w.B @ w.Q
    rc = [w for w in works if w.group["qr_method"] == "rcqr"]
    for w in works:
        if w.group["qr_method"] == "qr":
            w.P, w.live = _householder(w.P)
            w.R = w.B.T @ w.P
    if not rc:
        return
    sketched = []
    for w in rc:
        r = w.P.shape[1]
        k = sketch_rows(r)
        gen = torch.Generator(device=w.P.device).manual_seed(w.seed)
        S = torch.randn(k, w.rows, generator=gen, device=w.P.device, dtype=w.P.dtype) / math.sqrt(k)
        lo, hi = w.row_range()
        sketched.append(S[:, lo:hi] @ w.P)
    sketched = _all_reduce_sum(sketched, rc)
    for w, SP in zip(rc, sketched):
        R1 = torch.linalg.qr(SP, mode="r").R
        R1, _, w.live = _positive_diagonal(R1)
        w.P = _solve_right(R1, w.live, w.P)
    summed = _all_reduce_sum([torch.cat([w.P.T @ w.P, w.B.T @ w.P]) for w in rc], rc)
    for w, GY in zip(rc, summed):
        r = w.P.shape[1]
        Gm, Y = GY[:r], GY[r:]
        dead = (~w.live).to(Gm.dtype)
        R2, _ = torch.linalg.cholesky_ex(Gm + torch.diag(dead), upper=True)
        w.P = _solve_right(R2, w.live, w.P)
        w.R = _solve_right(R2, w.live, Y)


class Dion(HybridMatrixOptimizer):
    """Dion (see the module docstring for the math, the distributed layout and the defaults).

    Args:
        params: parameters or groups; groups with ``"matrix": False`` (or 1-D parameters of unflagged groups)
            use the internal AdamW.
        lr: base learning rate; a matrix's step is scaled by ``sqrt(m/n)`` of its ``(out, in)`` view.
        mu: error-feedback momentum μ in [0, 1).
        weight_decay: decoupled, ``X *= 1 - lr·wd``.
        rank_fraction: ``r / min(m, n)`` in (0, 1]; per group.
        epsilon: column-normalisation ε.
        power_iters: power-iteration steps per optimizer step (>= 1).
        qr_method: ``"rcqr"`` (randomised Cholesky QR, works on row shards) or ``"qr"`` (Householder, plain
            tensors only).
        seed: seeds the initial ``Q`` and the sketches (the same on every rank).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW part (``None``: Dion's value).
    """

    def __init__(self, params: Any, lr: float = 0.01, mu: float = 0.95, weight_decay: float = 0.01,
                 rank_fraction: float = 1.0, epsilon: float = 1e-8, power_iters: int = 1, qr_method: str = "rcqr",
                 seed: int = 0, adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, adamw_weight_decay: float | None = None) -> None:
        _check_hp("", rank_fraction, mu, power_iters, qr_method, epsilon, seed)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if (not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool)
                or not math.isfinite(weight_decay) or weight_decay < 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        defaults = dict(lr=lr, mu=mu, weight_decay=weight_decay, rank_fraction=rank_fraction, epsilon=epsilon,
                        power_iters=power_iters, qr_method=qr_method, seed=seed)
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        for group in self.param_groups[n_before:]:
            if not group["matrix"]:
                continue
            where = f"Dion param group {group.get('name', '')!r}: "
            _check_hp(where, group["rank_fraction"], group["mu"], group["power_iters"], group["qr_method"],
                      group["epsilon"], group["seed"])
            names = group.get("param_names") or [None] * len(group["params"])
            for p, flip, name in zip(group["params"], self.transposed_flags(group, group["params"]), names):
                kind = self._meta(p).kind
                label = name or f"shape {tuple(p.shape)}"
                if kind == "sharded" and flip:
                    raise ValueError(f"{where}the transposed (in, out) weight {label!r} is an FSDP2 shard: Dion "
                                     "steps its (out, in) view, whose columns those row shards would split. "
                                     "Convert the Conv1D to nn.Linear or route it to AdamW.")
                if kind == "sharded" and group["qr_method"] == "qr":
                    raise ValueError(f"{where}qr_method='qr' needs the whole P of {label!r}, an FSDP2 shard; "
                                     "use qr_method='rcqr' (randomised Cholesky QR over the row shards)")

    # -- state ------------------------------------------------------------------------------------------------

    def _positions(self) -> dict[int, tuple[int, int]]:
        """``id(p) → (group index, index in the group)``: what seeds a parameter's Q and sketches."""
        return {id(q): (gi, j) for gi, g in enumerate(self.param_groups) for j, q in enumerate(g["params"])}

    def _view_dims(self, group: dict[str, Any], p: Tensor) -> tuple[int, int, bool]:
        meta = self._meta(p)
        flip = self.transposed_flags(group, [p])[0]
        return (meta.cols, meta.rows, True) if flip else (meta.rows, meta.cols, False)

    def _init_matrix_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        rows, cols, _ = self._view_dims(group, p)
        r = dion_rank(rows, cols, group["rank_fraction"])
        gi, j = self._positions()[id(p)]
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["Q"] = initial_q(cols, r, group["seed"], gi, j).to(device=local(p).device, dtype=p.dtype)

    # -- the step ---------------------------------------------------------------------------------------------

    def _step_matrices(self, groups: list[dict[str, Any]]) -> None:
        works: list[_Work] = []
        positions = self._positions()
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Dion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_matrix_state(p, state, group)
                rows, cols, flip = self._view_dims(group, p)
                meta = self._meta(p)
                cd = torch.float64 if p.dtype == torch.float64 else torch.float32
                M, G = local(state["momentum"]), local(p.grad)
                B = M.to(cd) + G.to(cd)
                B = B.reshape(B.shape[0], meta.cols)
                if flip:
                    B = B.t()
                gi, j = positions[id(p)]
                step = int(state["step"].item())
                works.append(_Work(p, group, meta, flip, rows, cols, B, state["Q"].to(cd),
                                   mix_seed(group["seed"], gi, j, step)))
        if not works:
            return
        for it in range(max(w.group["power_iters"] for w in works)):
            active = [w for w in works if it < w.group["power_iters"]]
            for w in active:
                if it:
                    w.Q, w.seed = w.R, mix_seed(w.seed, it)
            _power_step(active)
        for w in works:
            self._finish(w)

    def _finish(self, w: _Work) -> None:
        """Error feedback, the new Q, weight decay and the update, on this rank's rows."""
        group, state = w.group, self.state[w.p]
        lr, wd, mu = group["lr"], group["weight_decay"], group["mu"]
        M_new = w.B - (1.0 - mu) * (w.P @ w.R.T)
        norms = w.R.norm(dim=0, keepdim=True)
        Q_old = state["Q"].to(w.R.dtype)
        Q_new = torch.where(w.live.unsqueeze(0), w.R / (norms + group["epsilon"]), Q_old)
        update = w.P @ Q_new.T
        if w.flip:
            M_new, update = M_new.t(), update.t()
        M = local(state["momentum"])
        M.copy_(M_new.reshape(M.shape))
        state["Q"].copy_(Q_new)
        X = local(w.p)
        if wd:
            X.mul_(1.0 - lr * wd)
        X.add_(update.reshape(X.shape).to(X.dtype), alpha=-lr * math.sqrt(w.rows / w.cols))
        state["step"] += 1

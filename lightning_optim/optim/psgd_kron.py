"""PSGD-Kron: momentum preconditioned by a Kronecker-factored whitening preconditioner (``psgd-kron``).

Xi-Lin Li 2018, "Preconditioner on Matrix Lie Group for SGD" (arXiv 1809.10232; ICLR 2019), and Li 2015,
"Preconditioned Stochastic Gradient Descent" (arXiv 1512.04202): the preconditioner ``P = QᵀQ`` with
``Q = Q_1 ⊗ ... ⊗ Q_k`` (one upper-triangular or diagonal factor per dimension) is fitted online by gradient
descent on the Lie group of such ``Q``, so that ``P`` whitens the gradient, ``E[(Ph)(Ph)ᵀ] ≈ P``
("whitening"; the pair is (v, h + damping·v) with a random probe v). The Kron variant here — its defaults,
its schedule and the RMS clip — is Evan Walters' and Omead Pooladzandi's kron_torch (github.com/
evanatyourservice/kron_torch, ``kron_torch/kron.py``, PyPI ``kron-torch`` 0.3.3), which heavyball's
``PSGDKron`` also derives from; Li's own code is github.com/lixilinx/psgd_torch.

For a gradient ``g`` reshaped to its work shape (``merge_dims``: a tensor with more than two dimensions is
viewed as the matrix ``[∏ shape[:-1], shape[-1]]``, as kron_torch does; a 0-d tensor as ``(1,)``), with
``x ×_i M`` the product of ``x`` with ``M`` along dimension i (``Q_L·x·Q_Rᵀ`` for a matrix ``x`` and
``M = Q_L``, then ``Q_R``), one step of parameter ``x``::

    m  = β·m + (1-β)·g;            m̂ = m / (1 - β^t)                       (momentum, debiased)
    if this step updates the preconditioner (see "update schedule"):
        h  = m̂ (momentum_into_precond_update) or g;   v ~ N(0, I) (same shape)
        A  = (h + sqrt(ε₃₂)·mean|h|·v) ×_1 Q_1 ... ×_k Q_k                 (ε₃₂ = float32 machine epsilon)
        B  = v ×_1 Q_1⁻ᵀ ... ×_k Q_k⁻ᵀ                                      (triangular solves)
        for every factor i (from the same A, B):
            triangular Q_i (d×d):  S₋ = A_(i)A_(i)ᵀ - B_(i)B_(i)ᵀ,  S₊ = A_(i)A_(i)ᵀ + B_(i)B_(i)ᵀ
                Q_i ← Q_i - precond_lr · triu(S₋) · Q_i / max(‖S₊‖₂⁻, tiny)
            diagonal Q_i (d):       s₋, s₊ = the diagonals of S₋, S₊ (sums of squares over the other dims)
                Q_i ← Q_i - precond_lr · s₋ ⊙ Q_i / max(max|s₊|, tiny)
    u  = m̂ ×_1 Q_1ᵀQ_1 ... ×_k Q_kᵀQ_k                                      (= P·m̂)
    u ← u · min(1, update_clip_rms / (RMS(u) + 1e-12))                      (kron_torch: 1.1)
    x ← x - lr · (u + weight_decay · x)

``A_(i)`` is A with dimension i first and the rest flattened; ``‖S‖₂⁻`` is kron_torch's cheap lower bound of
the spectral norm (the column c of largest norm; ``‖S·(Sᵀc/‖Sᵀc‖)‖``); ``tiny`` the dtype's smallest normal
number. A dimension gets a triangular factor (initialised ``precond_init_scale^(1/k)·I``) unless its size is 1
or above ``max_size_triangular``, the work shape has fewer than ``min_ndim_triangular`` dimensions (vectors,
by default), or ``memory_save_mode`` makes it diagonal (``"one_diag"``: the largest dimension, ties to the last;
``"smart_one_diag"``: the largest only if strictly larger than the second largest; ``"all_diag"``: every one);
a diagonal factor starts at ``precond_init_scale^(1/k)·1``. After every ``BALANCE_EVERY`` preconditioner updates
of a tensor with at least two dimensions (before the next one) the factors are rescaled to the geometric mean
of their largest entries (``Q_i ← Q_i · (∏_j max|Q_j|)^(1/k) / max|Q_i|``), which leaves ``P`` unchanged and
keeps the factors' scales from drifting apart (kron_torch does this on a random 1% of its updates).

Update schedule (kron_torch's ``precond_update_prob_schedule``, deterministic): the probability at the
group's step n (0, 1, 2, ...) is ``p(n) = clamp(prob_max·exp(-prob_decay·(n - prob_flat_start)), prob_min,
prob_max)`` — 1.0 for the first 500 steps, then down to 0.03 by about step 4000 — or the fixed
``preconditioner_update_probability``; a counter advances every step and the preconditioner is updated, and
the counter reset, when ``counter ≥ 1/p(n)`` (both in float32, as kron_torch), so an update comes every
⌈1/p⌉ steps, not at random.

Randomness and resume. The probe ``v`` is the only random draw: ``torch.randn`` of the work shape, in the
state's dtype, on the parameter's device, from a ``torch.Generator`` seeded with :func:`probe_seed` ``(seed,
group index, position in the group, t)`` (``seed`` is a hyperparameter, 0 by default; ``t`` the tensor's
step). The group's counters (``prob_step``, ``update_counter``) are kept in its ``param_groups`` entry and the
rest in the per-tensor state, so ``state_dict`` holds everything and a resumed run equals an uninterrupted one
bit for bit; the draws do not touch torch's global generator.

Where this differs from kron_torch 0.3.3: (1) kron_torch adds the damping term ``sqrt(ε₃₂)·mean|h|·v`` to the
debiased momentum in place, so its parameter update carries the probe noise too; here the noise enters only
the preconditioner fit and the update is ``P·m̂`` itself, as in psgd_torch (``G + damping*V`` is a new tensor
there). (2) kron_torch applies weight decay to tensors with ≥ 2 dimensions only; here every tensor of a group
with ``weight_decay`` > 0 (the default grouping already gives biases and norms 0). (3) Its update counter
and schedule step live outside ``state_dict`` (a resumed run restarts the schedule) and it rebalances on a
random 1% of updates from an unsaved ``random.Random(42)``; here the counters are saved and rebalancing is
every ``BALANCE_EVERY`` updates. (4) Its preconditioner is float32 (also for float64 parameters) and its
momentum the parameter's dtype (bf16 for bf16 parameters); here both are float32 for bf16/fp16 parameters and
the parameter's dtype otherwise, and they are put back in that dtype on ``load_state_dict`` (torch would cast
them to the parameter's).

State per parameter (tensors only: ``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``
work): ``step`` and ``precond_updates`` (0-d CPU counters), ``momentum_buffer`` (the work shape: P elements)
and ``Q{i}`` per work dimension (d_i² for a triangular factor, d_i for a diagonal one); per group,
``prob_step`` and ``update_counter`` (plain integers in ``param_groups``). :func:`factor_numel` counts the
factors for the memory estimator.
FSDP2 ``DTensor`` parameters: the gradient is gathered once per step (``full_tensor``, one all-gather per
parameter), every rank keeps the full (replicated) state and computes the full update, of which it applies its
own shard — identical on every rank, but the state is not sharded and the work is not split (as SOAP).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lightning_optim._dtensor import is_dtensor, local_slice
from lightning_optim.optim._closure import evaluate_closure

__all__ = [
    "PSGDKron",
    "BALANCE_EVERY",
    "MEMORY_SAVE_MODES",
    "kron_work_shape",
    "triangular_dims",
    "factor_numel",
    "update_probability",
    "probe_seed",
]

BALANCE_EVERY = 100
"""A tensor's factors are rebalanced after every ``BALANCE_EVERY`` preconditioner updates (before the next)."""
MEMORY_SAVE_MODES = (None, "smart_one_diag", "one_diag", "all_diag")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_DAMPING = math.sqrt(torch.finfo(torch.float32).eps)
_MASK64 = (1 << 64) - 1
_CPU_COUNTERS = ("step", "precond_updates")


# ---------------------------------------------------------------------------------------------------------
# Layout: work shape and factor kinds (shared with the memory estimator through the registry record)


def kron_work_shape(shape: Iterable[int], merge_dims: bool = True) -> tuple[int, ...]:
    """The shape the preconditioner sees: ``(1,)`` for a 0-d tensor; with ``merge_dims`` a tensor of more than
    two dimensions is viewed as the matrix ``[∏ shape[:-1], shape[-1]]``. (kron_torch picks between that and
    ``[shape[0], ∏ shape[1:]]`` by comparing ``shape[-1] - ∏ shape[:-1]`` with ``∏ shape[1:] - shape[0]``; the
    first is never larger, since the middle dimensions' product is at least 1, so it always takes the first.)"""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return (1,)
    if len(shape) > 2 and merge_dims:
        return (math.prod(shape[:-1]), shape[-1])
    return shape


def triangular_dims(work_shape: Iterable[int], max_size_triangular: int = 8192, min_ndim_triangular: int = 2,
                    memory_save_mode: str | None = None) -> tuple[bool, ...]:
    """For each dimension of ``work_shape``: ``True`` if it gets a triangular factor, ``False`` for diagonal."""
    shape = tuple(int(s) for s in work_shape)
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {memory_save_mode!r}")
    forced = [False] * len(shape)
    if memory_save_mode == "all_diag":
        forced = [True] * len(shape)
    elif memory_save_mode in ("one_diag", "smart_one_diag") and shape:
        largest = max(shape)
        last_largest = max(i for i, s in enumerate(shape) if s == largest)
        ordered = sorted(shape)
        if memory_save_mode == "one_diag" or (len(shape) > 1 and ordered[-1] > ordered[-2]):
            forced[last_largest] = True
    return tuple(
        not (s == 1 or s > max_size_triangular or len(shape) < min_ndim_triangular or forced[i])
        for i, s in enumerate(shape)
    )


def factor_numel(shape: Iterable[int], max_size_triangular: int = 8192, min_ndim_triangular: int = 2,
                 memory_save_mode: str | None = None, merge_dims: bool = True) -> int:
    """Elements of the factors ``Q{i}`` of a parameter of ``shape``: d² per triangular, d per diagonal one."""
    work = kron_work_shape(shape, merge_dims)
    tri = triangular_dims(work, max_size_triangular, min_ndim_triangular, memory_save_mode)
    return sum(d * d if t else d for d, t in zip(work, tri))


# ---------------------------------------------------------------------------------------------------------
# The update schedule and the probe's seed


def update_probability(n: int, prob_max: float = 1.0, prob_min: float = 0.03, prob_decay: float = 0.001,
                       prob_flat_start: float = 500) -> Tensor:
    """``clamp(prob_max·exp(-prob_decay·(n - prob_flat_start)), prob_min, prob_max)`` in float32 (a CPU scalar)."""
    f32 = torch.float32
    hi = torch.tensor(prob_max, dtype=f32)
    p = hi * torch.exp(-torch.tensor(prob_decay, dtype=f32) * (torch.tensor(float(n), dtype=f32)
                                                                 - torch.tensor(prob_flat_start, dtype=f32)))
    return p.clamp(min=torch.tensor(prob_min, dtype=f32), max=hi)


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijection of 64-bit integers that mixes bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def probe_seed(seed: int, group_index: int, position: int, step: int) -> int:
    """The seed of the generator that draws the probe ``v`` of one tensor at its step ``step`` (1, 2, ...):
    SplitMix64 applied in turn to ``seed``, the group index, the tensor's position in the group, the step."""
    x = _splitmix64(int(seed) & _MASK64)
    for part in (group_index, position, step):
        x = _splitmix64(x ^ (int(part) & _MASK64))
    return x


# ---------------------------------------------------------------------------------------------------------
# Kernels on one work-shaped tensor


def _along(vec: Tensor, dim: int, ndim: int) -> Tensor:
    """A vector viewed to broadcast along dimension ``dim`` of an ``ndim``-dimensional tensor."""
    return vec.view([-1 if j == dim else 1 for j in range(ndim)])


def _mode_product(x: Tensor, dim: int, mat: Tensor) -> Tensor:
    """``x ×_dim mat``: ``out[..., a, ...] = Σ_b mat[a, b] · x[..., b, ...]``."""
    return torch.movedim(torch.tensordot(mat, x, dims=([1], [dim])), 0, dim)


def _mode_solve_t(x: Tensor, dim: int, q: Tensor) -> Tensor:
    """``x ×_dim Q⁻ᵀ`` for an upper-triangular ``Q``: along ``dim``, the row vectors ``y`` become ``y·Q⁻¹``."""
    y = torch.movedim(x, dim, -1)
    shape = y.shape
    out = torch.linalg.solve_triangular(q, y.reshape(-1, shape[-1]), upper=True, left=False)
    return torch.movedim(out.reshape(shape), -1, dim)


def _unfold_gram(x: Tensor, dim: int, triangular: bool) -> Tensor:
    """``x_(dim)·x_(dim)ᵀ`` (triangular) or its diagonal (diagonal factor)."""
    if not triangular:
        other = [j for j in range(x.dim()) if j != dim]
        return x.square().sum(dim=other) if other else x.square()
    a = torch.movedim(x, dim, 0).reshape(x.shape[dim], -1)
    return a @ a.T


def _spectral_norm_lower_bound(s: Tensor, scale: Tensor) -> Tensor:
    """A cheap lower bound of ‖S‖₂ for a symmetric ``S`` with largest entry ``scale`` > 0 (kron_torch's ``_lb``):
    with a = S/scale and c its column of largest norm, ``scale·‖a·w‖`` for ``w = aᵀc / ‖aᵀc‖``."""
    a = s / scale
    col = a[:, torch.argmax(a.square().sum(dim=0))]
    w = col @ a
    w = w / w.norm()
    return (a @ w).norm() * scale


def precondition(qs: list[Tensor], x: Tensor) -> Tensor:
    """``P·x = x ×_1 Q_1ᵀQ_1 ... ×_k Q_kᵀQ_k`` (a diagonal factor q: elementwise q² along its dimension)."""
    for i, q in enumerate(qs):
        if q.dim() < 2:
            x = x * _along(q * q, i, x.dim())
        else:
            x = _mode_product(_mode_product(x, i, q), i, q.T)
    return x


def update_factors(qs: list[Tensor], h: Tensor, v: Tensor, precond_lr: float) -> None:
    """One whitening step of every factor ``Q_i`` in place, from the fitted pair (v, h) (see the module
    docstring; ``h`` already carries the damping term)."""
    a, b = h, v
    for i, q in enumerate(qs):
        if q.dim() < 2:
            a = a * _along(q, i, a.dim())
            b = b / _along(q, i, b.dim())
        else:
            a = _mode_product(a, i, q)
            b = _mode_solve_t(b, i, q)
    tiny = torch.finfo(h.dtype).tiny
    for i, q in enumerate(qs):
        tri = q.dim() == 2
        aa, bb = _unfold_gram(a, i, tri), _unfold_gram(b, i, tri)
        diff, total = aa - bb, aa + bb
        biggest = total.abs().max()
        if tri:
            bound = torch.where(biggest > 0, _spectral_norm_lower_bound(total, biggest), biggest).clamp(min=tiny)
            q.sub_(torch.triu(diff).mul_(precond_lr / bound) @ q)
        else:
            q.sub_(diff.mul_(precond_lr).mul_(q / biggest.clamp(min=tiny)))


def balance_factors(qs: list[Tensor]) -> None:
    """``Q_i ← Q_i · (∏_j max|Q_j|)^(1/k) / max|Q_i|`` in place: the Kronecker product is unchanged."""
    norms = torch.stack([q.abs().max() for q in qs])
    mean = norms.log().mean().exp()
    for q, n in zip(qs, norms):
        q.mul_(mean / n)


# ---------------------------------------------------------------------------------------------------------


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_number(name: str, value: Any, low: float, low_open: bool, high: float | None = None,
                  high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
    if not ok:
        lo_b, hi_b = "(" if low_open else "[", ")" if high_open else "]"
        hi = "inf)" if high is None else f"{high}{hi_b}"
        raise ValueError(f"{name} must be a finite number in {lo_b}{low}, {hi}, got {value!r}")
    return float(value)


class PSGDKron(torch.optim.Optimizer):
    """PSGD with a Kronecker-factored whitening preconditioner (see the module docstring for the math).

    Defaults are kron_torch's (``kron_torch.Kron``, PyPI ``kron-torch`` 0.3.3).

    Args:
        lr: step size (kron_torch 3e-4).
        momentum: β of the momentum (kron_torch's ``b1``, 0.9); the momentum is debiased by ``1 - β^t``.
        weight_decay: decoupled, ``x ← x - lr·wd·x`` (kron_torch 0).
        preconditioner_update_probability: a fixed probability in (0, 1]; ``None`` (default) follows the
            schedule ``prob_max``, ``prob_min``, ``prob_decay``, ``prob_flat_start`` (1.0, 0.03, 0.001, 500).
        max_size_triangular: dimensions larger than this get a diagonal factor (8192).
        min_ndim_triangular: work shapes with fewer dimensions get diagonal factors only (2: vectors).
        memory_save_mode: ``None``, ``"smart_one_diag"``, ``"one_diag"`` or ``"all_diag"``.
        momentum_into_precond_update: fit the preconditioner to the debiased momentum (True) or the gradient.
        precond_lr: step of the preconditioner fit (0.1).
        precond_init_scale: initial ``Q = scale^(1/k)·I`` per factor (1.0).
        merge_dims: view tensors of more than two dimensions as matrices (True).
        update_clip_rms: the preconditioned update is scaled down to this RMS when above it (1.1);
            ``None`` turns the clip off.
        seed: seeds the random probe vectors (with the group, position and step; see :func:`probe_seed`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: float | None = None,
        prob_max: float = 1.0,
        prob_min: float = 0.03,
        prob_decay: float = 0.001,
        prob_flat_start: int = 500,
        max_size_triangular: int = 8192,
        min_ndim_triangular: int = 2,
        memory_save_mode: str | None = None,
        momentum_into_precond_update: bool = True,
        precond_lr: float = 0.1,
        precond_init_scale: float = 1.0,
        merge_dims: bool = True,
        update_clip_rms: float | None = 1.1,
        seed: int = 0,
    ) -> None:
        _check_number("lr", lr, 0.0, False)
        _check_number("momentum", momentum, 0.0, False, 1.0, True)
        _check_number("weight_decay", weight_decay, 0.0, False)
        if preconditioner_update_probability is not None:
            _check_number("preconditioner_update_probability", preconditioner_update_probability, 0.0, True, 1.0)
        _check_number("prob_max", prob_max, 0.0, True, 1.0)
        _check_number("prob_min", prob_min, 0.0, True, prob_max)
        _check_number("prob_decay", prob_decay, 0.0, False)
        _check_number("prob_flat_start", prob_flat_start, 0.0, False)
        max_size_triangular = _check_count("max_size_triangular", max_size_triangular, 1)
        min_ndim_triangular = _check_count("min_ndim_triangular", min_ndim_triangular, 0)
        if memory_save_mode not in MEMORY_SAVE_MODES:
            raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {memory_save_mode!r}")
        for name, flag in (("momentum_into_precond_update", momentum_into_precond_update),
                           ("merge_dims", merge_dims)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        _check_number("precond_lr", precond_lr, 0.0, False)
        _check_number("precond_init_scale", precond_init_scale, 0.0, True)
        if update_clip_rms is not None:
            _check_number("update_clip_rms", update_clip_rms, 0.0, True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            prob_max=prob_max, prob_min=prob_min, prob_decay=prob_decay, prob_flat_start=prob_flat_start,
            max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode, momentum_into_precond_update=momentum_into_precond_update,
            precond_lr=precond_lr, precond_init_scale=precond_init_scale, merge_dims=merge_dims,
            update_clip_rms=update_clip_rms, seed=seed,
        )
        super().__init__(params, defaults)

    # -- the schedule (group-level counters, saved in param_groups) -----------------------------------------

    @staticmethod
    def _schedule_decision(group: dict[str, Any]) -> bool:
        """Advance the group's counters; whether this step updates the preconditioners."""
        n = int(group.get("prob_step", 0))
        fixed = group["preconditioner_update_probability"]
        if fixed is None:
            prob = update_probability(n, group["prob_max"], group["prob_min"], group["prob_decay"],
                                      group["prob_flat_start"])
        else:
            prob = torch.tensor(fixed, dtype=torch.float32)
        counter = int(group.get("update_counter", 0)) + 1
        do_update = bool(torch.tensor(counter, dtype=torch.float32) >= 1 / prob)
        group["update_counter"] = 0 if do_update else counter
        group["prob_step"] = n + 1
        return do_update

    # -- state ---------------------------------------------------------------------------------------------

    def _init_state(self, state: dict[str, Any], work: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device, group: dict[str, Any]) -> None:
        tri = triangular_dims(work, group["max_size_triangular"], group["min_ndim_triangular"],
                              group["memory_save_mode"])
        scale = group["precond_init_scale"] ** (1.0 / len(work))
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["momentum_buffer"] = torch.zeros(work, dtype=dtype, device=device)
        for i, (d, t) in enumerate(zip(work, tri)):
            q = torch.eye(d, dtype=dtype, device=device) if t else torch.ones(d, dtype=dtype, device=device)
            state[f"Q{i}"] = q.mul_(scale)
        state["precond_updates"] = torch.tensor(0.0, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        for gi, group in enumerate(self.param_groups):
            if any(p.grad is not None for p in group["params"]):
                self._step_group(gi, group)
        return loss

    def _step_group(self, gi: int, group: dict[str, Any]) -> None:
        do_update = self._schedule_decision(group)
        beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        clip = group["update_clip_rms"]
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("PSGDKron does not support sparse gradients")
            grad = p.grad.full_tensor() if is_dtensor(p.grad) else p.grad
            work = kron_work_shape(p.shape, group["merge_dims"])
            dtype = torch.float32 if grad.dtype in _LOW_PRECISION else grad.dtype
            g = grad.to(dtype).reshape(work)
            state = self.state[p]
            if "momentum_buffer" not in state:
                self._init_state(state, work, dtype, g.device, group)
            qs = [state[f"Q{i}"] for i in range(len(work))]
            state["step"] += 1
            t = int(state["step"].item())  # a CPU scalar: no device synchronisation
            m = state["momentum_buffer"]
            m.mul_(beta).add_(g, alpha=1 - beta)
            m_hat = m / (1 - beta ** t)
            if do_update:
                done = int(state["precond_updates"].item())
                if len(work) > 1 and done > 0 and done % BALANCE_EVERY == 0:
                    balance_factors(qs)
                h = m_hat if group["momentum_into_precond_update"] else g
                gen = torch.Generator(device=g.device).manual_seed(probe_seed(group["seed"], gi, pi, t))
                v = torch.randn(work, generator=gen, dtype=dtype, device=g.device)
                update_factors(qs, h + (_DAMPING * h.abs().mean()) * v, v, group["precond_lr"])
                state["precond_updates"] += 1
            u = precondition(qs, m_hat)
            if clip is not None:
                rms = u.square().mean().sqrt()
                u.mul_(torch.clamp(clip / (rms + 1e-12), max=1.0))
            self._apply(p, u.reshape(p.shape), lr, wd)

    @staticmethod
    def _apply(p: Tensor, u: Tensor, lr: float, wd: float) -> None:
        """``x ← x - lr·(u + wd·x)`` on the parameter (its local shard for a DTensor; in float32 for bf16)."""
        if is_dtensor(p):
            u = local_slice(u, p)
            target = p.to_local()
        else:
            target = p
        x = target.float() if target.dtype in _LOW_PRECISION else target
        step = u.to(x.dtype)
        if wd != 0:
            step = step + wd * x
        x.sub_(step, alpha=lr)
        if x is not target:
            target.copy_(x)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded floating state to the parameter's dtype; the state is put back in the dtype it
        was saved in (float32 for bf16/fp16 parameters), so a low-precision run resumes exactly."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in saved.get(i, {}).items():
                live = self.state[p].get(key)
                if not (isinstance(value, Tensor) and isinstance(live, Tensor)):
                    continue
                if key in _CPU_COUNTERS:  # read with .item() every step: kept on the CPU
                    self.state[p][key] = value.detach().to(device="cpu", dtype=torch.float32, copy=True)
                elif live.dtype != value.dtype:
                    self.state[p][key] = value.to(device=live.device, dtype=value.dtype, copy=True)

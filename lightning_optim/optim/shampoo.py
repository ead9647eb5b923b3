"""Shampoo with blocked preconditioners and AdamW grafting, as Distributed Shampoo (``shampoo``).

Gupta, Koren & Singer 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization" (arXiv 1802.09568);
Shi, Lee, Iwasaki, Gallego-Posada, Li, Rangadurai, Mudigere & Rabbat 2023, "A Distributed Data-Parallel
PyTorch Implementation of the Distributed Shampoo Optimizer for Training Neural Networks At-Scale"
(arXiv 2309.06497), Algorithm 1 with the conventions of its reference code facebookresearch/optimizers
(``distributed_shampoo``: the default ``RootInvShampooPreconditionerConfig`` with an eigendecomposition root,
``AdamPreconditionerConfig`` grafting, decoupled weight decay). Written here from the paper's algorithm.

**Blocks.** A gradient ``G`` is first reshaped to its work shape: dimensions of size 1 are dropped (a 0-d or
all-ones tensor becomes ``(1,)``) and, with ``merge_dims`` (default, as the reference), neighbouring
dimensions are merged from the last one backwards while their product stays ``<= max_preconditioner_dim``
(a (6, 4) matrix becomes (24,) when the limit is 1024; a (768, 768) matrix stays as it is). Every dimension
of the work shape is then cut into pieces of ``max_preconditioner_dim`` (the last piece shorter), and each
block ``B`` of the resulting grid, of order ``k`` (the number of work dimensions) and sides ``d_1 … d_k``,
gets one factor ``L_i`` (``d_i × d_i``) per side. 1-D blocks therefore get a full ``d × d`` factor (full-matrix
AdaGrad on that block, as the reference); ``precondition_1d=False`` instead gives order-1 blocks no factor
and steps them with the grafting method alone.

**Step** ``t = 1, 2, …`` for one parameter ``W`` with gradient ``G`` (``B`` a block, ``G_B`` its part,
``G_B(i)`` that part with dimension ``i`` first and the others flattened)::

    L_i ← β2·L_i + w·G_B(i)·G_B(i)ᵀ                 w = 1-β2 (w = 1 when β2 = 1: AdaGrad sums)
    V   ← βg·V + wg·G²                               grafting second moment (Adam grafting), wg likewise
    if t == s, or t > s and t % f == 0:              s = start_preconditioning_step, f = precondition_frequency
        R_i ← (L_i / c2 + ε·I)^(-1/(2k))             c2 = 1-β2^t (1 with β2 = 1 or use_bias_correction off)
    M   ← β1·M + (1-β1)·G;   D = M / (1-β1^t)        (D = G when β1 = 0; no division without bias correction)
    per block:   A_B = D_B / (sqrt(V_B / (1-βg^t)) + εg)             the grafting (Adam) direction, always
                                                                     bias-corrected (use_bias_correction
                                                                     covers M and the factors only)
                 S_B = D_B ×_1 R_1 ×_2 … ×_k R_k                     (R_1·D_B·R_2 for a matrix block)
                 P_B = A_B                                 while t < s (grafting method only)
                 P_B = ‖A_B‖_F / (‖S_B‖_F + 1e-16) · S_B    afterwards (the grafting norm rule)
    W   ← W - lr·(P + λ·W)                           decoupled weight decay λ, added to the direction
                                                     after grafting, as the reference

Until the first root computation the roots are identity matrices (as the reference), so without grafting
(``grafting=None``) the steps before ``s`` are momentum SGD with ``D``. ``grafting="sgd"`` takes ``A_B = D_B``
(the update keeps the norm of the filtered gradient). The epsilon is the published regularisation
("damping"; not momentum dampening, which this class does not have): with ``root_method="eigh"`` (default)
``(A + ε·I) = Q·diag(λ)·Qᵀ`` by ``torch.linalg.eigh`` and, should round-off leave ``min λ < ε``, the
eigenvalues are shifted to ``λ - min λ + ε`` before ``R = Q·diag(λ^(-1/p))·Qᵀ`` (``p = 2k``; the reference's
``perturb_before_computation``). ``root_method="newton"`` is the coupled Newton iteration for the inverse
``p``-th root of ``A_ε = A + ε·I`` (Guo & Higham 2006; the reference's ``CoupledNewtonConfig``)::

    z = (p+1) / (2·‖A_ε‖_F);   X = z^(1/p)·I;   M = z·A_ε
    repeat while max|M - I| > 1e-6 and fewer than 100 iterations:
        T = (1 + 1/p)·I - M/p;   X ← X·T;   M ← T^p·M
    R = X

The roots are computed in ``root_dtype`` (float32 by default, "float64" optional) and stored in the state's
dtype (float32; float64 for float64 parameters). An
eigendecomposition that fails in float32 is retried in float64 (as the reference); a root that still fails or
comes out non-finite keeps the previous root, with a warning naming the parameter and the factor.

Defaults: the reference's AdamW recipe (its README "Example 4": lr, betas, weight decay and grafting epsilon
carried over from AdamW; epsilon 1e-12, precondition_frequency 100, start_preconditioning_step =
precondition_frequency, grafting_beta2 = betas[1]) with this package's AdamW settings (lr 1e-3, betas
(0.9, 0.999), weight decay 0.1, eps 1e-8), and the reference class's ``max_preconditioner_dim=1024`` (its
README examples use 8192).

State per parameter, tensors only (``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``
work): ``step`` (0-d), ``exp_avg`` (``M``, parameter shape; absent when β1 = 0), ``grafting_exp_avg_sq``
(``V``, parameter shape; only with Adam grafting), and per block ``j`` and side ``i`` ``factor_{j}_{i}``
(``L_i``) and ``root_{j}_{i}`` (``R_i``), float32 (float64 for float64 parameters; bf16/fp16 parameters get
float32 state). :func:`shampoo_state_numel` counts them.

FSDP2 ``DTensor`` parameters are handled as SOAP handles them: the gradient is gathered once per step (one
all-gather per parameter over its mesh), every rank keeps the full state and computes the full update, and
applies the part it holds (the weight decay on its own shard) — identical on every rank, the state is not
sharded and the work is not split.

Hugging Face ``Conv1D`` weights are stored (in, out); every side of a block gets the same treatment, so such a
weight needs no special case and a group's ``transposed`` flag (set by the default grouping) is ignored.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lightning_optim._dtensor import is_dtensor, local_slice
from lightning_optim.optim._closure import evaluate_closure

__all__ = ["Shampoo", "shampoo_work_shape", "shampoo_blocks", "shampoo_state_numel"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_ROOT_METHODS = ("eigh", "newton")
_ROOT_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_GRAFTINGS = ("adam", "sgd", None)
_NEWTON_MAX_ITERATIONS = 100  # the reference's CoupledNewtonConfig defaults
_NEWTON_TOLERANCE = 1e-6
_GRAFT_NORM_EPS = 1e-16  # added to ‖S_B‖ in the grafting ratio, as the reference


# ---------------------------------------------------------------------------------------------------------
# shapes and blocks


def shampoo_work_shape(shape: Iterable[int], max_preconditioner_dim: int = 1024,
                       merge_dims: bool = True) -> tuple[int, ...]:
    """The shape a gradient of ``shape`` is preconditioned in: size-1 dims dropped, then (``merge_dims``)
    neighbouring dims merged from the last backwards while their product stays <= ``max_preconditioner_dim``."""
    shape = tuple(int(s) for s in shape)
    if 0 in shape:
        return (0,)
    dims = [d for d in shape if d != 1] or [1]
    if not merge_dims:
        return tuple(dims)
    merged = [dims[-1]]
    for d in reversed(dims[:-1]):
        if merged[-1] * d <= max_preconditioner_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(reversed(merged))


def _pieces(d: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, d)) for a in range(0, d, size)]


def shampoo_blocks(work: tuple[int, ...], max_preconditioner_dim: int) -> list[tuple[slice, ...]]:
    """The blocks of a work-shaped tensor, row-major over the grid: every dim cut into pieces of at most
    ``max_preconditioner_dim``."""
    if 0 in work:
        return []
    return list(itertools.product(*(_pieces(d, max_preconditioner_dim) for d in work)))


def _block_sides(block: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in block)


def shampoo_state_numel(shape: Iterable[int], max_preconditioner_dim: int = 1024, merge_dims: bool = True,
                        precondition_1d: bool = True) -> int:
    """Elements of the factors and roots of a parameter of ``shape``: 2·Σ_blocks Σ_i d_i²."""
    work = shampoo_work_shape(shape, max_preconditioner_dim, merge_dims)
    if len(work) == 1 and not precondition_1d:
        return 0
    return 2 * sum(d * d for b in shampoo_blocks(work, max_preconditioner_dim) for d in _block_sides(b))


# ---------------------------------------------------------------------------------------------------------
# kernels


def _factor_product(block: Tensor, i: int) -> Tensor:
    """``G_(i)·G_(i)ᵀ``: the block with dim ``i`` first and the rest flattened, times its transpose."""
    a = block.movedim(i, 0).reshape(block.shape[i], -1)
    return a @ a.T


def _precondition(block: Tensor, roots: list[Tensor]) -> Tensor:
    """``D ×_1 R_1 ×_2 … ×_k R_k`` (the roots are symmetric)."""
    if block.dim() == 2:
        return roots[0] @ block @ roots[1]
    out = block
    for i, r in enumerate(roots):
        out = (out.movedim(i, -1) @ r).movedim(-1, i)
    return out


def eigh_inverse_root(a: Tensor, p: int, eps: float) -> Tensor:
    """``(A + ε·I)^(-1/p)`` by a symmetric eigendecomposition, eigenvalues shifted to ``λ - min λ + ε`` when
    round-off leaves ``min λ < ε`` (no host synchronisation: the shift is a ``torch.where``)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    ridge = a + eps * eye
    try:
        lam, q = torch.linalg.eigh(ridge)
    except RuntimeError:  # as the reference: retry in double precision
        lam, q = torch.linalg.eigh(ridge.double())
        lam, q = lam.to(a.dtype), q.to(a.dtype)
    lam_min = lam.min()
    lam = torch.where(lam_min < eps, lam - lam_min + eps, lam)
    return (q * lam.pow(-1.0 / p)) @ q.T


def newton_inverse_root(a: Tensor, p: int, eps: float, max_iterations: int = _NEWTON_MAX_ITERATIONS,
                        tolerance: float = _NEWTON_TOLERANCE) -> Tensor:
    """``(A + ε·I)^(-1/p)`` by the coupled Newton iteration (see the module docstring)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    ridge = a + eps * eye
    z = (p + 1) / (2 * torch.linalg.norm(ridge))
    x = z ** (1.0 / p) * eye
    m = z * ridge
    for _ in range(max_iterations):
        if (m - eye).abs().max() <= tolerance:
            break
        t = eye * (1 + 1.0 / p) - m / p
        x = x @ t
        m = torch.linalg.matrix_power(t, p) @ m
    return x


_ROOT_FUNCTIONS = {"eigh": eigh_inverse_root, "newton": newton_inverse_root}


# ---------------------------------------------------------------------------------------------------------
# input checks


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Shampoo: {name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Shampoo: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _checked(lr, betas, epsilon, weight_decay, max_preconditioner_dim, precondition_frequency,
             start_preconditioning_step, grafting, grafting_beta2, grafting_epsilon, root_method,
             root_dtype) -> dict[str, Any]:
    if _number("lr", lr) < 0:
        raise ValueError(f"Shampoo: lr must be >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Shampoo: betas must be two numbers (beta1, beta2), got {betas!r}")
    b1, b2 = _number("betas[0]", betas[0]), _number("betas[1]", betas[1])
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Shampoo: betas[0] must be in [0, 1), got {b1}")
    if not 0.0 < b2 <= 1.0:
        raise ValueError(f"Shampoo: betas[1] (the factors' EMA) must be in (0, 1], got {b2}")
    for name, value in (("epsilon", epsilon), ("grafting_epsilon", grafting_epsilon)):
        if not _number(name, value) > 0:
            raise ValueError(f"Shampoo: {name} must be > 0, got {value}")
    if _number("weight_decay", weight_decay) < 0:
        raise ValueError(f"Shampoo: weight_decay must be >= 0, got {weight_decay}")
    if not 0.0 < _number("grafting_beta2", grafting_beta2) <= 1.0:
        raise ValueError(f"Shampoo: grafting_beta2 must be in (0, 1], got {grafting_beta2}")
    freq = _count("precondition_frequency", precondition_frequency, 1)
    if start_preconditioning_step is None or start_preconditioning_step == -1:
        start = freq
    else:
        start = _count("start_preconditioning_step", start_preconditioning_step, 1)
        if start < freq:
            raise ValueError(f"Shampoo: start_preconditioning_step ({start}) must be >= precondition_frequency "
                             f"({freq}) (None or -1: equal to it)")
    if grafting == "none":
        grafting = None
    if grafting not in _GRAFTINGS:
        raise ValueError(f"Shampoo: grafting must be 'adam', 'sgd' or None, got {grafting!r}")
    if root_method not in _ROOT_METHODS:
        raise ValueError(f"Shampoo: root_method must be one of {_ROOT_METHODS}, got {root_method!r}")
    if root_dtype not in _ROOT_DTYPES:
        raise ValueError(f"Shampoo: root_dtype must be 'float32' or 'float64', got {root_dtype!r}")
    return dict(
        lr=lr, betas=(b1, b2), epsilon=float(epsilon), weight_decay=float(weight_decay),
        max_preconditioner_dim=_count("max_preconditioner_dim", max_preconditioner_dim, 1),
        precondition_frequency=freq, start_preconditioning_step=start, grafting=grafting,
        grafting_beta2=float(grafting_beta2), grafting_epsilon=float(grafting_epsilon),
        root_method=root_method, root_dtype=root_dtype,
    )


_CHECKED = ("lr", "betas", "epsilon", "weight_decay", "max_preconditioner_dim", "precondition_frequency",
            "start_preconditioning_step", "grafting", "grafting_beta2", "grafting_epsilon", "root_method", "root_dtype")


# ---------------------------------------------------------------------------------------------------------


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo with grafting (see the module docstring for the math, the defaults and the state).

    Args:
        lr: learning rate.
        betas: ``(β1, β2)``: β1 the EMA of the gradient (``M``; 0 turns it off), β2 the EMA of the factors
            (1.0: AdaGrad-style sums).
        epsilon: added to every factor (``ε·I``) before its root.
        weight_decay: decoupled weight decay ``λ`` (``W ← W - lr·(P + λ·W)``).
        max_preconditioner_dim: the longest side of a block.
        precondition_frequency: steps between root computations.
        start_preconditioning_step: the first step with Shampoo directions (and a root computation); before
            it the grafting method alone. ``None`` (or the reference's ``-1``): ``precondition_frequency``.
        use_bias_correction: divide ``M`` by ``1-β1^t`` and the factors by ``1-β2^t``; the grafting Adam's
            ``V`` is divided by ``1-βg^t`` either way (it is Adam; as the reference).
        grafting: ``"adam"`` (default), ``"sgd"`` or ``None`` (no grafting: the raw Shampoo direction).
        grafting_beta2, grafting_epsilon: the grafting Adam's β2 and ε.
        root_method: ``"eigh"`` (eigendecomposition, default) or ``"newton"`` (coupled Newton iteration).
        root_dtype: ``"float32"`` (default) or ``"float64"``: the precision of the root computation.
        merge_dims: merge small neighbouring dims (see the module docstring).
        precondition_1d: give order-1 blocks a full factor (default, as the reference); ``False``: the
            grafting method alone for them.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        weight_decay: float = 0.1,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 100,
        start_preconditioning_step: int | None = None,
        use_bias_correction: bool = True,
        grafting: str | None = "adam",
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        root_method: str = "eigh",
        root_dtype: str = "float32",
        merge_dims: bool = True,
        precondition_1d: bool = True,
    ) -> None:
        defaults = _checked(lr, betas, epsilon, weight_decay, max_preconditioner_dim, precondition_frequency,
                            start_preconditioning_step, grafting, grafting_beta2, grafting_epsilon, root_method,
                            root_dtype)  # the order of _CHECKED
        defaults.update(use_bias_correction=bool(use_bias_correction), merge_dims=bool(merge_dims),
                        precondition_1d=bool(precondition_1d))
        super().__init__(params, defaults)
        for group in self.param_groups:  # per-group overrides get the same checks and normalisation
            group.update(_checked(**{k: group[k] for k in _CHECKED}))

    # -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _layout(p: Tensor, group: dict[str, Any]) -> tuple[tuple[int, ...], list[tuple[slice, ...]], bool]:
        """(work shape, blocks, whether the blocks carry factors)."""
        work = shampoo_work_shape(p.shape, group["max_preconditioner_dim"], group["merge_dims"])
        blocks = shampoo_blocks(work, group["max_preconditioner_dim"])
        return work, blocks, not (len(work) == 1 and not group["precondition_1d"])

    @staticmethod
    def _init_state(state: dict, shape: tuple[int, ...], blocks, preconditioned: bool, dtype, device,
                    group: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        if group["grafting"] == "adam":
            state["grafting_exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        if preconditioned:
            for j, block in enumerate(blocks):
                for i, d in enumerate(_block_sides(block)):
                    state[f"factor_{j}_{i}"] = torch.zeros(d, d, dtype=dtype, device=device)
                    state[f"root_{j}_{i}"] = torch.eye(d, dtype=dtype, device=device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"Shampoo does not support sparse gradients (param_groups[{gi}] "
                                       f"parameter {pi})")
                self._step_param(p, group, f"param_groups[{gi}] parameter {pi} {tuple(p.shape)}")
        return loss

    def _step_param(self, p: Tensor, group: dict[str, Any], label: str) -> None:
        beta1, beta2 = group["betas"]
        g = p.grad.full_tensor() if is_dtensor(p.grad) else p.grad
        dtype = torch.float32 if g.dtype in _LOW_PRECISION else g.dtype
        work, blocks, preconditioned = self._layout(p, group)
        g = g.to(dtype).reshape(work)
        state = self.state[p]
        if "step" not in state:
            self._init_state(state, tuple(p.shape), blocks, preconditioned, dtype, g.device, group)
        state["step"] += 1
        t = int(state["step"].item())  # a CPU scalar: no device synchronisation
        correct = group["use_bias_correction"]
        order = len(work)

        # factors, their roots when due, the grafting second moment
        start, freq = group["start_preconditioning_step"], group["precondition_frequency"]
        refresh = t == start or (t > start and t % freq == 0)
        if preconditioned:
            weight = 1.0 - beta2 if beta2 < 1.0 else 1.0
            c2 = 1.0 - beta2**t if (correct and beta2 < 1.0) else 1.0
            for j, block in enumerate(blocks):
                gb = g[block]
                for i in range(order):
                    factor = state[f"factor_{j}_{i}"]
                    if beta2 < 1.0:
                        factor.mul_(beta2)
                    factor.add_(_factor_product(gb, i), alpha=weight)
                    if refresh:
                        self._refresh_root(state, f"{j}_{i}", factor / c2, 2 * order, group, label)
        graft = group["grafting"]
        if graft == "adam":
            bg = group["grafting_beta2"]
            v = state["grafting_exp_avg_sq"].view(work)
            if bg < 1.0:
                v.mul_(bg)
            v.addcmul_(g, g, value=1.0 - bg if bg < 1.0 else 1.0)
            cg = 1.0 - bg**t if bg < 1.0 else 1.0  # Adam grafting is always bias-corrected (as the reference)
            graft_denom = (v / cg).sqrt_().add_(group["grafting_epsilon"])

        # filtered gradient
        if beta1 > 0:
            m = state["exp_avg"].view(work)
            m.lerp_(g, 1.0 - beta1)
            d = m / (1.0 - beta1**t) if correct else m
        else:
            d = g

        # per-block directions, grafted
        direction = torch.empty_like(g)
        for j, block in enumerate(blocks):
            db = d[block]
            if graft == "adam":
                a = db / graft_denom[block]
            elif graft == "sgd":
                a = db
            else:
                a = None
            if not preconditioned or (a is not None and t < start):
                direction[block] = db if a is None else a
                continue
            s = _precondition(db, [state[f"root_{j}_{i}"] for i in range(order)])
            if a is not None:
                s = s * (torch.linalg.vector_norm(a) / (torch.linalg.vector_norm(s) + _GRAFT_NORM_EPS))
            direction[block] = s
        self._apply(p, direction.reshape(p.shape), group["lr"], group["weight_decay"])

    @staticmethod
    def _refresh_root(state: dict, key: str, factor: Tensor, p: int, group: dict[str, Any], label: str) -> None:
        """``root_{key} = (factor + ε·I)^(-1/p)`` in ``root_dtype``; a failed or non-finite root keeps the old one."""
        fn = _ROOT_FUNCTIONS[group["root_method"]]
        target = state[f"root_{key}"]
        try:
            root = fn(factor.to(_ROOT_DTYPES[group["root_dtype"]]), p, group["epsilon"])
        except RuntimeError as err:
            warnings.warn(f"Shampoo: the root of factor {key} of {label} failed ({err}); keeping the previous root",
                          RuntimeWarning, stacklevel=5)
            return
        if not bool(torch.isfinite(root).all()):
            warnings.warn(f"Shampoo: the root of factor {key} of {label} is not finite (is the factor finite?); "
                          "keeping the previous root", RuntimeWarning, stacklevel=5)
            return
        target.copy_(root)

    @staticmethod
    def _apply(p: Tensor, direction: Tensor, lr: float, weight_decay: float) -> None:
        """``W ← W - lr·(P + λ·W)`` on the part of ``W`` this rank holds (float32 arithmetic for bf16/fp16)."""
        if is_dtensor(p):
            direction = local_slice(direction, p)
            target = p.to_local()
        else:
            target = p
        work = target.float() if target.dtype in _LOW_PRECISION else target
        if weight_decay != 0:
            work.mul_(1.0 - lr * weight_decay)
        work.add_(direction.to(work.dtype), alpha=-lr)
        if work is not target:
            target.copy_(work)

"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (``soap``).

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade 2024, "SOAP: Improving and Stabilizing
Shampoo using Adam" (arXiv 2409.11321); reference code nikhilvyas/SOAP (``soap.py``). Same algorithm and
conventions as the reference, for a gradient ``g`` reshaped to its work shape (``merge_dims``) with one
factor ``GG_i`` (d_i × d_i) and one orthogonal basis ``Q_i`` per dimension ``d_i <= max_precond_dim``
(1-D parameters only with ``precondition_1d``)::

    first step (only initialises, no update):  GG_i = (1-β_s)·g_(i)·g_(i)ᵀ;  Q_i = eigh(GG_i) (descending)
    then, t = 1, 2, ...:
        g' = project(g) = g ×_i Q_i                    (Q_Lᵀ·g·Q_R for a matrix)
        m  = β1·m + (1-β1)·g';   v = β2·v + (1-β2)·g'²    (Adam moments in the rotated space)
        u  = project_back(m / (sqrt(v) + eps))          (Q_L·(·)·Q_Rᵀ)
        u /= RMS(u)                                     (only with normalize_grads)
        p -= lr·sqrt(1-β2^t)/(1-β1^t) · u               (plain lr without correct_bias)
        p -= lr·wd·p                                    (decoupled, after the update, as the reference)
        GG_i = β_s·GG_i + (1-β_s)·g_(i)·g_(i)ᵀ           (g_(i): g with dim i first, the rest flattened)
        every precondition_frequency steps (t % f == 0), one power iteration per factor:
            λ̂ = diag(Q_iᵀ·GG_i·Q_i); sort descending (v is permuted along dim i the same way);
            Q_i = qr(GG_i·Q_i[:, order]).Q;  m is rotated from the old basis into the new one.

``β_s`` is ``shampoo_beta``; ``None`` (or a negative value, the reference's ``-1``) means ``betas[1]``.

Efficiency (the reference loops over parameters and factors one at a time and rotates m back and forth on
every step): the eigendecompositions and QR refreshes of all factors of the same size are done as one batched
``torch.linalg.eigh`` / ``torch.linalg.qr`` call on a stack; the Adam moments, the parameter update and the
weight decay are multi-tensor (``torch._foreach_*``) operations; m is rotated only on the steps whose basis
changed (mathematically identical: the reference's back-and-forth rotation is the identity between refreshes);
the factor EMA is one fused ``addmm``. No host synchronisation: the step counters are CPU scalars. The
per-step projections stay one matmul per matrix: stacking same-shape matrices into one batched matmul was
measured no faster on CPU (bfloat16, the GPT benchmark's 24 matrices: 868 ms batched vs 794 ms per matrix; every
product is already ≥ 0.27 GFLOP and the stacking copies cost what batching saves).

State per parameter, tensors only (``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``
work): ``step``, ``exp_avg`` and ``exp_avg_sq`` (parameter shape, float32 for low-precision parameters),
``GG{i}`` and ``Q{i}`` for each preconditioned dimension ``i`` of the work shape. FSDP2 ``DTensor``
parameters (``Shard(0)`` on a 1-D mesh, or HSDP's ``(Replicate(), Shard(0))``): the gradient is gathered once
per step (one all-gather per parameter over the shard group) and every rank keeps the full (replicated) state
and computes the full update, of which it applies its own shard — correct and identical on every rank, but
the state is not sharded and the work is not split (``benchmarks/comm_model.py`` gives the traffic).

Low-precision matmuls (``matmul_dtype="bfloat16"``, off by default): a median step is six matmuls per matrix —
the two factor products ``g·gᵀ``/``gᵀ·g``, the projection ``Q_Lᵀ·g·Q_R`` and the back-projection
``Q_L·r·Q_Rᵀ`` — and nothing else of comparable cost. With the option, those six take bfloat16 inputs
(``g``, ``r = m/(sqrt(v)+eps)`` and bfloat16 copies of the bases) and their results are cast back to float32
before they touch the state: ``GG_i = β_s·GG_i + (1-β_s)·fp32(bf16(g_(i))·bf16(g_(i))ᵀ)``,
``g' = fp32(bf16(Q_L)ᵀ·bf16(g)·bf16(Q_R))`` (intermediate product rounded to bfloat16), likewise for ``u``.
The state (``GG``, ``Q``, ``exp_avg``, ``exp_avg_sq``), the moment updates, the eigh/QR refreshes and the
rotation of ``m`` into a refreshed basis stay float32. Why: bfloat16 matmuls run on AMX (Sapphire Rapids and
later CPUs, ~5× float32 here) and on GPU tensor cores, so the step gets several times faster. Cost: each
product carries an error of about 2⁻⁸ relative to the matrix's norm (bfloat16's 8-bit mantissa; float32
accumulation inside the kernel). The coordinates of ``g'`` in weakly excited eigen-directions are tiny, so
their relative error is large, and Adam's per-coordinate normalisation turns it into update noise there;
measured on small least-squares problems, the trajectory moves about as far from the float32 one as a float32
run with 1% multiplicative gradient noise (cosine of the parameter change ≈ 0.99 after 20 full-batch steps),
at the same loss — much less than minibatch noise does. ``m`` and ``v`` are both formed from the same rounded
``g'``, so ``m/sqrt(v)`` stays bounded even where a factor is rank-deficient (rotating ``m`` back and forth
in bfloat16 every step, as the reference's structure would under low-precision matmuls, does not: ``m/sqrt(v)``
then blows up in the factors' null directions). The bfloat16 copies of the bases are cached outside the state
(recast whenever a basis changes: tensor version counter), Σ d_i² · 2 bytes extra.

Defaults are the benchmark's (Semenov et al. 2025): lr 1e-3, betas (0.9, 0.999) [0.9999 for long runs],
shampoo_beta = betas[1], eps 1e-8, weight decay 0.1, precondition_frequency 10, max_precond_dim 10000.

Hugging Face ``Conv1D`` weights are stored (in, out). The left and right preconditioners treat the two sides
alike, so such a weight needs no special case; a group's ``transposed`` flag (set by the default grouping) is
ignored here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lightning_optim.optim._closure import evaluate_closure
from lightning_optim._dtensor import is_dtensor as _is_dtensor, local_slice


__all__ = ["SOAP", "soap_work_shape"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_MATMUL_DTYPES = {"bfloat16": torch.bfloat16}


def _matmul_dtype_name(value: Any) -> str | None:
    """Validate ``matmul_dtype``; the name kept in the param group (a string: state_dicts stay weights_only)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
    else:
        name = None
    if name not in _MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be None (float32 matmuls) or 'bfloat16' / torch.bfloat16, got {value!r}")
    return name


def _merge_dims(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The reference's ``merge_dims``: merge neighbouring dims while their product stays <= max_precond_dim."""
    new_shape: list[int] = []
    cur = 1
    for sh in shape:
        tmp = cur * sh
        if tmp > max_precond_dim:
            if cur > 1:
                new_shape.append(cur)
                cur = sh
            else:
                new_shape.append(sh)
                cur = 1
        else:
            cur = tmp
    if cur > 1 or not new_shape:
        new_shape.append(cur)
    return tuple(new_shape)


def soap_work_shape(
    shape: Iterable[int], max_precond_dim: int = 10000, merge_dims: bool = False, precondition_1d: bool = False
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """(work shape, which of its dims carry a preconditioner) for a parameter of ``shape``."""
    shape = tuple(int(s) for s in shape) or (1,)
    if len(shape) == 1:
        return shape, (bool(precondition_1d) and shape[0] <= max_precond_dim,)
    work = _merge_dims(shape, max_precond_dim) if merge_dims else shape
    return work, tuple(d <= max_precond_dim for d in work)


# ---------------------------------------------------------------------------------------------------------
# kernels on one work-shaped tensor


def _project(x: Tensor, qs: list[Tensor | None], back: bool) -> Tensor:
    """``x ×_i Q_i`` (``back=False``) or ``x ×_i Q_iᵀ`` (``back=True``) over the dims that have a basis."""
    if x.dim() == 2:
        ql, qr = qs
        if back:
            if ql is not None:
                x = ql @ x
            if qr is not None:
                x = x @ qr.T
        else:
            if ql is not None:
                x = ql.T @ x
            if qr is not None:
                x = x @ qr
        return x
    for i, q in enumerate(qs):
        if q is None:
            continue
        x = (x.movedim(i, -1) @ (q.T if back else q)).movedim(-1, i)
    return x


def _project_low(x: Tensor, qs: list[Tensor | None], back: bool, dtype: torch.dtype) -> Tensor:
    """``_project`` with ``dtype`` inputs (``qs`` already in ``dtype``); the result is cast back to ``x.dtype``
    (float32, the state's dtype)."""
    return _project(x.to(dtype), qs, back).to(x.dtype)


def _accumulate_factors_low(g: Tensor, ggs: list[Tensor | None], beta: float) -> None:
    """``_accumulate_factors`` with the products ``g_(i)·g_(i)ᵀ`` taken from ``g`` already in a low-precision
    dtype; the product is added to the float32 factor (the EMA itself stays float32)."""
    for i, gg in enumerate(ggs):
        if gg is None:
            continue
        if g.dim() == 2 and i == 1:
            prod = g.T @ g
        else:
            a = g if (g.dim() == 1 or i == 0) else g.movedim(i, 0)
            a = a.reshape(a.shape[0], -1)
            prod = a @ a.T
        gg.mul_(beta).add_(prod, alpha=1 - beta)


def _accumulate_factors(g: Tensor, ggs: list[Tensor | None], beta: float) -> None:
    """``GG_i = β·GG_i + (1-β)·g_(i)·g_(i)ᵀ`` for every factor (one fused addmm each)."""
    for i, gg in enumerate(ggs):
        if gg is None:
            continue
        a = g if (g.dim() == 1 or i == 0) else g.movedim(i, 0)
        a = a.reshape(a.shape[0], -1)
        if g.dim() == 2 and i == 1:
            gg.addmm_(g.T, g, beta=beta, alpha=1 - beta)
        else:
            gg.addmm_(a, a.T, beta=beta, alpha=1 - beta)


def _batched_eigh(mats: list[Tensor]) -> list[Tensor]:
    """Eigenvectors, descending eigenvalue order, of every matrix (one eigh per same-size stack)."""
    out: list[Tensor | None] = [None] * len(mats)
    for idx, stack in _stacks(mats):
        eye = torch.eye(stack.shape[-1], device=stack.device, dtype=stack.dtype)
        try:
            q = torch.linalg.eigh(stack + 1e-30 * eye)[1]
        except RuntimeError:  # the reference retries in double precision
            q = torch.linalg.eigh(stack.double() + 1e-30 * eye.double())[1].to(stack.dtype)
        q = torch.flip(q, [-1])
        for k, j in enumerate(idx):
            out[j] = q[k]
    return out  # type: ignore[return-value]


def _batched_power_qr(ggs: list[Tensor], qs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """One power iteration + QR per factor, columns re-sorted by the estimated eigenvalues (descending).

    Returns the new bases and the sort orders (to permute ``exp_avg_sq`` the same way)."""
    new_q: list[Tensor | None] = [None] * len(ggs)
    orders: list[Tensor | None] = [None] * len(ggs)
    for idx, gg in _stacks(ggs):
        q = torch.stack([qs[j] for j in idx]) if len(idx) > 1 else qs[idx[0]].unsqueeze(0)
        tmp = gg @ q
        est = (q * tmp).sum(dim=-2)  # diag(Qᵀ·GG·Q)
        order = torch.argsort(est, dim=-1, descending=True)
        power = torch.gather(tmp, -1, order.unsqueeze(-2).expand_as(tmp))
        qn = torch.linalg.qr(power)[0]
        for k, j in enumerate(idx):
            new_q[j] = qn[k]
            orders[j] = order[k]
    return new_q, orders  # type: ignore[return-value]


def _stacks(mats: list[Tensor]):
    """Group matrices by (size, dtype, device); yield (indices, stacked tensor)."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for j, m in enumerate(mats):
        buckets[(m.shape[-1], m.dtype, m.device)].append(j)
    for idx in buckets.values():
        yield idx, (torch.stack([mats[j] for j in idx]) if len(idx) > 1 else mats[idx[0]].unsqueeze(0))


# ---------------------------------------------------------------------------------------------------------
# DTensor (FSDP2) helpers


class SOAP(torch.optim.Optimizer):
    """SOAP (see the module docstring for the math and the state layout).

    Args:
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, applied after the update).
        shampoo_beta: EMA factor of the Shampoo factors ``GG``; ``None``/negative → ``betas[1]``.
        precondition_frequency: steps between power-iteration/QR refreshes of the bases.
        max_precond_dim: dimensions larger than this get no preconditioner (identity basis).
        merge_dims: merge neighbouring dims (convolutions) while their product is <= max_precond_dim.
        precondition_1d: also precondition 1-D parameters (size <= max_precond_dim).
        normalize_grads: divide each update by its RMS.
        correct_bias: Adam bias correction ``sqrt(1-β2^t)/(1-β1^t)``.
        matmul_dtype: ``None`` (default): every matmul in float32, as the reference. ``"bfloat16"`` (or
            ``torch.bfloat16``): the per-step projections, back-projections and factor products ``g·gᵀ`` take
            bfloat16 inputs, results cast back to float32; the state and the eigh/QR refreshes stay float32.
            Several times faster where bfloat16 matmuls have hardware (AMX CPUs, GPU tensor cores) at ~2⁻⁸
            relative error per product (see the module docstring). Kept as a string in ``param_groups``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        matmul_dtype: str | torch.dtype | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if shampoo_beta is not None and not shampoo_beta < 1.0:
            raise ValueError(f"shampoo_beta must be < 1 (negative or None: betas[1]), got {shampoo_beta}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        for name, value in (("precondition_frequency", precondition_frequency), ("max_precond_dim", max_precond_dim)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=int(precondition_frequency), max_precond_dim=int(max_precond_dim),
            merge_dims=bool(merge_dims), precondition_1d=bool(precondition_1d),
            normalize_grads=bool(normalize_grads), correct_bias=bool(correct_bias),
            matmul_dtype=_matmul_dtype_name(matmul_dtype),
        )
        super().__init__(params, defaults)
        # low-precision copies of the bases for matmul_dtype (not state: derived, recast when a basis changes;
        # rebuilt every step, so bases no longer in use — after load_state_dict — are not kept alive)
        self._low_q: dict[int, tuple[Tensor, int, Tensor]] = {}
        self._low_q_next: dict[int, tuple[Tensor, int, Tensor]] = {}

    @staticmethod
    def _shampoo_beta(group: dict[str, Any]) -> float:
        sb = group["shampoo_beta"]
        return group["betas"][1] if sb is None or sb < 0 else sb

    def _low_basis(self, q: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """``q`` in ``dtype``, cached until ``q`` is modified in place (its version counter) or replaced."""
        if q is None:
            return None
        hit = self._low_q_next.get(id(q)) or self._low_q.get(id(q))
        if hit is None or hit[0] is not q or hit[1] != q._version or hit[2].dtype != dtype:
            hit = (q, q._version, q.to(dtype))
        self._low_q_next[id(q)] = hit
        return hit[2]

    def _layout(self, p: Tensor, group: dict[str, Any]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return soap_work_shape(p.shape, group["max_precond_dim"], group["merge_dims"], group["precondition_1d"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        if not hasattr(self, "_low_q"):  # unpickled (Optimizer.__getstate__ keeps only defaults/state/groups)
            self._low_q = {}
        self._low_q_next = {}
        for group in self.param_groups:
            self._step_group(group)
        self._low_q, self._low_q_next = self._low_q_next, {}
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        sbeta = self._shampoo_beta(group)
        mm_name = _matmul_dtype_name(group.get("matmul_dtype"))  # .get: groups saved before the option
        mm = _MATMUL_DTYPES[mm_name] if mm_name is not None else None
        new: list[tuple[Tensor, Tensor, dict, tuple, tuple]] = []
        act: list[tuple[Tensor, Tensor, dict, tuple, tuple]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SOAP does not support sparse gradients")
            g = p.grad.full_tensor() if _is_dtensor(p.grad) else p.grad
            work, pre = self._layout(p, group)
            dtype = torch.float32 if g.dtype in _LOW_PRECISION else g.dtype
            g = g.to(dtype).reshape(work)
            state = self.state[p]
            (act if "step" in state else new).append((p, g, state, work, pre))

        # first step of a parameter: factors and eigenbases only, no update (as the reference)
        if new:
            pending: list[Tensor] = []
            slots: list[tuple[dict, int]] = []
            for p, g, state, work, pre in new:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros(tuple(p.shape), dtype=g.dtype, device=g.device)  # global shape
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                ggs = []
                for i, (d, flag) in enumerate(zip(work, pre)):
                    if flag:
                        state[f"GG{i}"] = torch.zeros(d, d, dtype=g.dtype, device=g.device)
                        ggs.append(state[f"GG{i}"])
                        pending.append(state[f"GG{i}"])
                        slots.append((state, i))
                    else:
                        ggs.append(None)
                if mm is None:
                    _accumulate_factors(g, ggs, sbeta)
                elif any(gg is not None for gg in ggs):
                    _accumulate_factors_low(g.to(mm), ggs, sbeta)
            for (state, i), q in zip(slots, _batched_eigh(pending)):
                state[f"Q{i}"] = q.contiguous()

        if not act:
            return

        params, grads, ms, vs, qss, steps = [], [], [], [], [], []
        for p, g, state, work, pre in act:
            state["step"] += 1
            steps.append(int(state["step"].item()))  # a CPU scalar: no device synchronisation
            qs = [state.get(f"Q{i}") if flag else None for i, flag in enumerate(pre)]
            params.append(p)
            grads.append(g)
            ms.append(state["exp_avg"].view(work))
            vs.append(state["exp_avg_sq"].view(work))
            qss.append(qs)

        if mm is None:
            gps = [_project(g, qs, back=False) for g, qs in zip(grads, qss)]
        else:
            # parameters without any basis (1-D, or every dim > max_precond_dim) stay float32: nothing to multiply
            low_qss = [[self._low_basis(q, mm) for q in qs] if any(q is not None for q in qs) else None for qs in qss]
            low_grads = [None if lq is None else g.to(mm) for g, lq in zip(grads, low_qss)]
            gps = [g if lg is None else _project(lg, lq, back=False).to(g.dtype)
                   for g, lg, lq in zip(grads, low_grads, low_qss)]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gps, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gps, gps, value=1 - beta2)
        del gps
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])
        ratio = torch._foreach_div(ms, denom)
        del denom
        if mm is None:
            upd = [_project(r, qs, back=True) for r, qs in zip(ratio, qss)]
        else:
            upd = [r if lq is None else _project_low(r, lq, True, mm) for r, lq in zip(ratio, low_qss)]
            del low_qss
        del ratio
        if group["normalize_grads"]:
            norms = torch._foreach_norm(upd)
            torch._foreach_mul_(norms, [u.numel() ** -0.5 for u in upd])
            torch._foreach_add_(norms, 1e-30)
            upd = [u / n for u, n in zip(upd, norms)]
        lr, wd = group["lr"], group["weight_decay"]
        if group["correct_bias"]:
            scales = [-lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]
        else:
            scales = [-lr] * len(steps)
        torch._foreach_mul_(upd, scales)
        self._apply(params, upd, lr * wd)
        del upd

        # factor EMAs with the current gradient, then the periodic refresh of the bases
        refresh_mats, refresh_qs, refresh_slots = [], [], []
        refreshed: dict[int, tuple] = {}
        for k, ((p, g, state, work, pre), qs) in enumerate(zip(act, qss)):
            ggs = [state.get(f"GG{i}") if flag else None for i, flag in enumerate(pre)]
            if mm is None:
                _accumulate_factors(g, ggs, sbeta)
            elif low_grads[k] is not None:
                _accumulate_factors_low(low_grads[k], ggs, sbeta)
            if any(pre) and steps[k] % group["precondition_frequency"] == 0:
                refreshed[k] = (state, work, pre)
                for i, flag in enumerate(pre):
                    if flag:
                        refresh_mats.append(state[f"GG{i}"])
                        refresh_qs.append(state[f"Q{i}"])
                        refresh_slots.append((k, i))
        if refreshed:
            # m back to the parameter space with the old bases
            m_orig = {k: _project(ms[k], qss[k], back=True) for k in refreshed}
            new_qs, orders = _batched_power_qr(refresh_mats, refresh_qs)
            for (k, i), q, order in zip(refresh_slots, new_qs, orders):
                state = refreshed[k][0]
                state[f"Q{i}"].copy_(q)
                v = vs[k]
                v.copy_(v.index_select(i, order))
            for k, (state, work, pre) in refreshed.items():
                qs = [state.get(f"Q{i}") if flag else None for i, flag in enumerate(pre)]
                ms[k].copy_(_project(m_orig[k], qs, back=False))

    @staticmethod
    def _apply(params: list[Tensor], upd: list[Tensor], decay: float) -> None:
        """``p += u; p *= 1 - decay`` on every parameter (local shards of DTensors, float32 for bf16)."""
        targets, sources, writeback = [], [], []
        for p, u in zip(params, upd):
            if _is_dtensor(p):
                u = local_slice(u.reshape(p.shape), p)
                t = p.to_local()
            else:
                u = u.reshape(p.shape)
                t = p
            if t.dtype in _LOW_PRECISION:
                w = t.float()
                writeback.append((t, w))
                t = w
            elif u.dtype != t.dtype:
                u = u.to(t.dtype)
            targets.append(t)
            sources.append(u)
        torch._foreach_add_(targets, sources)
        if decay != 0:
            torch._foreach_mul_(targets, 1 - decay)
        for t, w in writeback:
            t.copy_(w)

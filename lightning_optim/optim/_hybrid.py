"""One optimizer object, two rules: matrices follow a matrix rule (Muon family), everything else an internal AdamW.

Lightning's automatic optimisation refuses more than one optimizer, and one object keeps gradient clipping,
accumulation, the LR scheduler and checkpoints working, so the hybrid lives in a single
:class:`torch.optim.Optimizer` whose parameter groups carry ``"matrix": True/False``:

* groups from :func:`lightning_optim.param_groups` with ``split_matrices=True`` already carry the flag
  (names ``matrix``/``matrix_no_decay``/``decay``/``no_decay``; ``create_optimizer(name, module)`` does this);
* a group without the flag (plain ``model.parameters()``, e.g. LightningCLI's ``--optimizer``) is split by
  :func:`lightning_optim.param_groups.split_by_shape` into ``<name>_matrix`` and ``<name>_adamw``
  (``matrix``/``adamw`` when unnamed), keeping ``param_names`` aligned: >= 2 dimensions and fewer than 10000
  rows follow the matrix rule, so a GPT's 50304-row embedding/head goes to AdamW; without names this warns
  once, naming the shapes sent each way.

A matrix group may carry ``transposed``: one bool per parameter, aligned with ``params`` (the default grouping
sets it for Hugging Face ``Conv1D`` weights, stored ``(in, out)``). The shape-dependent parts of the matrix
rule (Muon's ``adjust_lr`` factor ``sqrt(max(1, rows/cols))``, NorMuon's per-neuron rows) then use the
``(out, in)`` view. Newton–Schulz needs nothing: ``NS(Xᵀ) = NS(X)ᵀ``, and the kernel already works on the wide
orientation of either. The flag is plain data in the group, so ``state_dict``/``load_state_dict`` keep it.

AdamW groups take their own ``lr``/``betas``/``eps``/``weight_decay`` from ``adamw_lr``, ``adamw_betas``,
``adamw_eps``, ``adamw_weight_decay`` unless the group sets them (``None`` means "the matrix value"). Every
group keeps its ``name`` (LearningRateMonitor shows ``lr-<Optimizer>/<name>``) and schedules multiply each
group's own ``lr``. :meth:`HybridMatrixOptimizer.routing_table` lists which parameter went where.

Parameters with more than two dimensions (convolutions) are viewed as ``shape[0] × prod(shape[1:])`` for the
matrix rule, as Keller Jordan's Muon does for conv filters; stacked experts ``(E, m, n)`` are therefore treated
as one ``E × m·n`` matrix, not E matrices — split them into separate parameters or route them to AdamW
(``GroupingRules.other_patterns``) if that is not what you want. Parameters the matrix rule cannot handle
(fewer than two dimensions in a matrix group, complex, empty, DTensors on 2-D meshes or with placements other
than ``Shard(0)``/``Replicate``) raise ``ValueError`` naming the parameter when the optimizer is built.

``cautious=True`` (Muon, D-Muon, NorMuon; Liang et al. 2024, arXiv 2411.16085; the rule in
:mod:`lightning_optim.optim._cautious`): every update this object applies is masked where it disagrees with the
gradient and rescaled by the mask's mean — the matrix rule's final update (C-Muon: the orthogonalised update
against ``p.grad``; the subclass applies it) and the internal AdamW's first moment (C-AdamW; there the eager
:func:`~lightning_optim.optim.torch_builtin.adam_foreach_` replaces torch's fused kernel). The official C-Muon code
leaves its AdamW part unmasked (commented out "for ablation purposes"); one switch for the whole object is what a
user reading ``cautious=True`` expects, and the AdamW part is then exactly C-AdamW. Weight decay is never masked.
FSDP2 shards get the mask's mean over the whole matrix (an all-reduce of the counts).

``state_dtype="bfloat16"`` (Muon, D-Muon, NorMuon) keeps the matrices' ``momentum_buffer`` in bfloat16: the
EMA is computed in float32 and written back with stochastic rounding (``lightning_optim.optim._low_precision``;
the seed mixes the group's ``sr_step`` count, saved in the state dict, so resumed runs round identically).
NorMuon's per-row second moment stays float32 (rows × 1, negligible), and so does the internal AdamW's state
(torch's fused kernel keeps state in the parameter's dtype).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_functional

from lightning_optim.optim._cautious import check_cautious
from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._low_precision import check_state_dtype, mix_seed, sr_copy_, state_torch_dtype, up
from lightning_optim._dtensor import rows_placements
from lightning_optim.optim._matrix_dist import DTensor, MatrixMeta, local, matrix_meta, orthogonalize
from lightning_optim.optim.newton_schulz import newton_schulz, resolve_coefficients
from lightning_optim.optim.torch_builtin import adam_foreach_, fused_supported
from lightning_optim.param_groups import split_by_shape

__all__ = ["HybridMatrixOptimizer", "ADAMW_ROUTING", "state_like_rows"]

ADAMW_ROUTING = (
    "parameters with >= 2 dimensions that are not embeddings or the output head (module type, tie to an "
    "embedding, head name, or >= 10000 rows for bare parameters) follow the matrix rule, viewed as "
    "shape[0] x prod(shape[1:]) (Hugging Face Conv1D weights, flagged 'transposed', as (out, in)); "
    "embeddings, the head and 1-D parameters follow the internal AdamW "
    "(adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay). Groups carry 'matrix': True/False; plain "
    "parameter lists are split by shape: ndim >= 2 and fewer than 10000 rows follow the matrix rule."
)

_ADAMW_KEYS = ("adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay")


def state_like_rows(p: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A zero ``rows × 1`` state tensor for parameter ``p``; for a DTensor, split like ``p``'s rows (column
    splits become ``Replicate()``: ranks holding other columns of the same rows hold the same values)."""
    if isinstance(p, DTensor):
        loc = torch.zeros(p._local_tensor.shape[0], 1, dtype=dtype, device=p._local_tensor.device)
        return DTensor.from_local(loc, p.device_mesh, rows_placements(tuple(p.placements)), run_check=False,
                                  shape=torch.Size((p.shape[0], 1)), stride=(1, 1))
    return torch.zeros(p.shape[0], 1, dtype=dtype, device=p.device)


class HybridMatrixOptimizer(torch.optim.Optimizer):
    """Base of the Muon family: routing, state initialisation, the batched/distributed orthogonalisation and
    the internal AdamW. Subclasses implement :meth:`_apply_matrix_update` (what to do with ``NS(u)``).

    ``distributed``: ``None`` (auto: plain tensors on ``world > 1`` ranks are DDP replicas and share the
    Newton–Schulz work; DTensor shards are always orthogonalised once across ranks) or ``False`` (every rank
    orthogonalises all its plain matrices itself).

    ``column_shards``: a subclass whose update handles column blocks (tensor-parallel ``Shard(1)``: only global
    dimensions, or rows and norms completed with ``row_mean_sq``/``global_sq_norms``) sets it ``True``; for the
    others such parameters are refused when the optimizer is built.
    """

    column_shards = False

    def __init__(self, params: Any, defaults: dict[str, Any], *, adamw_lr: float | None, adamw_betas: tuple,
                 adamw_eps: float, adamw_weight_decay: float | None, distributed: bool | None = None) -> None:
        self._adamw_defaults = {"lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps,
                                "weight_decay": adamw_weight_decay}
        self._distributed = distributed
        self._metas: dict[int, MatrixMeta] = {}
        resolve_coefficients(defaults.get("ns_coefficients", "jordan"), defaults.get("ns_steps", 5))
        if "state_dtype" in defaults:
            defaults = {**defaults, "state_dtype": check_state_dtype(defaults["state_dtype"])}
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or parameter groups, not a single tensor")
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        super().__init__(params, defaults)

    # -- routing --------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        if ps and isinstance(ps[0], tuple):  # named parameters
            group["param_names"] = [n for n, _ in ps]
            ps = [p for _, p in ps]
        group["params"] = ps
        flags = self._check_transposed(group)
        if "matrix" not in group:
            names = group.get("param_names")
            mat, oth = split_by_shape(ps, names, owner=type(self).__name__)
            base = group.get("name")
            parts = []
            for idx, flag, suffix in ((mat, True, "matrix"), (oth, False, "adamw")):
                if not idx:
                    continue
                g = dict(group)
                g["params"] = [ps[i] for i in idx]
                if names is not None:
                    g["param_names"] = [names[i] for i in idx]
                if flags is not None:
                    g["transposed"] = [flags[i] for i in idx]
                g["name"] = f"{base}_{suffix}" if base else suffix
                g["matrix"] = flag
                parts.append(g)
            for g in parts:
                self.add_param_group(g)
            return
        group["matrix"] = bool(group["matrix"])
        if "cautious" in group:
            group["cautious"] = check_cautious(group["cautious"],
                                               f"{type(self).__name__} param group {group.get('name', '')!r}")
        if "state_dtype" in group:
            group["state_dtype"] = check_state_dtype(group["state_dtype"], f"param group {group.get('name', '')!r} state_dtype")
        if not group["matrix"]:
            for key, value in self._adamw_defaults.items():
                if key not in group:
                    group[key] = self.defaults[key] if value is None else value
        else:
            names = group.get("param_names") or [None] * len(ps)
            for i, p in enumerate(ps):
                label = names[i] or f"{group.get('name', 'matrix')}[{i}] shape {tuple(p.shape)}"
                self._metas[id(p)] = matrix_meta(p, label, self._distributed, column_shards=self.column_shards)
            resolve_coefficients(group.get("ns_coefficients", self.defaults.get("ns_coefficients", "jordan")),
                                 group.get("ns_steps", self.defaults.get("ns_steps", 5)))
        super().add_param_group(group)

    @staticmethod
    def _check_transposed(group: dict[str, Any]) -> list[bool] | None:
        """Validate a group's ``transposed`` list (one bool per parameter, 2-D parameters only)."""
        flags = group.get("transposed")
        if flags is None:
            return None
        label = f"param group {group.get('name', '')!r}"
        if isinstance(flags, (bool, str)) or not hasattr(flags, "__len__") or len(flags) != len(group["params"]):
            raise ValueError(f"{label}: 'transposed' must be a list of bools, one per parameter "
                             f"({len(group['params'])}), got {flags!r}")
        flags = [bool(f) for f in flags]
        names = group.get("param_names") or [None] * len(flags)
        for f, p, n in zip(flags, group["params"], names):
            if f and p.ndim != 2:
                raise ValueError(f"{label}: parameter {n or tuple(p.shape)!r} is flagged transposed but has "
                                 f"{p.ndim} dimensions; only 2-D (in, out) weights can be transposed")
        group["transposed"] = flags
        return flags

    @staticmethod
    def transposed_flags(group: dict[str, Any], ps: list[Tensor]) -> list[bool]:
        """For each of ``ps`` (parameters of ``group``): is it stored ``(in, out)`` (the group's ``transposed``)."""
        flags = group.get("transposed")
        if not flags:
            return [False] * len(ps)
        by_id = {id(q): bool(f) for q, f in zip(group["params"], flags)}
        return [by_id.get(id(p), False) for p in ps]

    def lr_dims(self, group: dict[str, Any], ps: list[Tensor], metas: list[MatrixMeta]) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each matrix in the ``(out, in)`` orientation (swapped for transposed weights):
        what shape-dependent lr factors must use."""
        flags = self.transposed_flags(group, ps)
        return [(m.cols, m.rows) if f else (m.rows, m.cols) for f, m in zip(flags, metas)]

    def routing_table(self) -> list[dict[str, Any]]:
        """One row per parameter: name, shape, rule (``matrix``/``adamw``), group name, lr, weight decay,
        whether it is stored transposed (HF ``Conv1D``) and the group's muP ``lr_multiplier`` (1 without muP)."""
        rows = []
        for gi, g in enumerate(self.param_groups):
            names = g.get("param_names") or [f"{g.get('name', gi)}[{i}]" for i in range(len(g["params"]))]
            flags = g.get("transposed") or [False] * len(g["params"])
            for n, p, t in zip(names, g["params"], flags):
                rows.append({"name": n, "shape": tuple(p.shape), "rule": "matrix" if g["matrix"] else "adamw",
                             "group": g.get("name", str(gi)), "lr": g["lr"], "weight_decay": g["weight_decay"],
                             "transposed": bool(t), "lr_multiplier": g.get("lr_multiplier", 1.0)})
        return rows

    def _meta(self, p: Tensor) -> MatrixMeta:
        meta = self._metas.get(id(p))
        if meta is None:
            meta = self._metas[id(p)] = matrix_meta(p, f"shape {tuple(p.shape)}", self._distributed,
                                                    column_shards=self.column_shards)
        return meta

    # -- the step -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        self._check_mode()
        matrix_groups = [g for g in self.param_groups if g["matrix"]]
        if matrix_groups:
            self._step_matrices(matrix_groups)
            for g in matrix_groups:
                if g.get("state_dtype") is not None and any(p.grad is not None for p in g["params"]):
                    g["sr_step"] = int(g.get("sr_step", 0)) + 1
        for g in self.param_groups:
            if not g["matrix"]:
                self._step_other(g)
        return loss

    def _check_mode(self) -> None:
        pass

    def _init_matrix_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        dt = state_torch_dtype(group.get("state_dtype"))
        state["momentum_buffer"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)

    def _ns_inputs(self, group: dict[str, Any], ps: list[Tensor]) -> list[Tensor]:
        """Update the momentum and return the matrices to orthogonalise (local tensors). A bf16 buffer
        (``state_dtype="bfloat16"``) is updated in float32 and stored with stochastic rounding."""
        grads = [local(p.grad) for p in ps]
        bufs = [local(self.state[p]["momentum_buffer"]) for p in ps]
        mu = group["momentum"]
        lowp = group.get("state_dtype") is not None and bool(bufs) and bufs[0].dtype == torch.bfloat16
        stored = bufs
        if lowp:
            grads = [up(g) for g in grads]
            bufs = [b.float() for b in bufs]
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        if lowp:
            gi = next((i for i, g in enumerate(self.param_groups) if g is group), 0)
            step = int(group.get("sr_step", 0))
            for j, (dst, src) in enumerate(zip(stored, bufs)):
                sr_copy_(dst, src, mix_seed(step, gi, j))
        if group.get("nesterov", False):
            return torch._foreach_lerp(grads, bufs, mu)
        return bufs

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to the parameter's dtype; a bf16 momentum buffer is put back in bf16."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            dt = state_torch_dtype(check_state_dtype(group.get("state_dtype")))
            if dt is None or not group["matrix"]:
                continue
            for p in group["params"]:
                st = self.state.get(p, {})
                buf = st.get("momentum_buffer")
                if isinstance(buf, Tensor) and buf.dtype != dt:
                    st["momentum_buffer"] = buf.to(dt)

    def _step_matrices(self, groups: list[dict[str, Any]]) -> None:
        per_group = []
        buckets: dict[str, list[tuple[int, int]]] = defaultdict(list)
        mats: list[list[Tensor]] = []
        for gi, group in enumerate(groups):
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_matrix_state(p, state, group)
            u = self._ns_inputs(group, ps) if ps else []
            metas = [self._meta(p) for p in ps]
            views = [x.reshape(m.local_shape) for x, m in zip(u, metas)]
            per_group.append((group, ps, metas))
            mats.append(views)
            key = repr((group["ns_steps"], group["ns_coefficients"], group.get("ns_eps", 1e-7)))
            buckets[key].extend((gi, j) for j in range(len(ps)))
        outs: list[list[Tensor]] = [[None] * len(v) for v in mats]  # type: ignore[list-item]
        for key, members in buckets.items():
            if not members:
                continue
            g0 = groups[members[0][0]]
            steps, coeffs, eps = g0["ns_steps"], g0["ns_coefficients"], g0.get("ns_eps", 1e-7)

            def ns_fn(x: Tensor, steps=steps, coeffs=coeffs, eps=eps) -> Tensor:
                return newton_schulz(x, steps, coeffs, eps)

            res = orthogonalize([mats[gi][j] for gi, j in members],
                                [per_group[gi][2][j] for gi, j in members], ns_fn)
            for (gi, j), r in zip(members, res):
                outs[gi][j] = r
        for (group, ps, metas), o in zip(per_group, outs):
            if ps:
                self._apply_matrix_update(group, ps, o, metas)

    def _apply_matrix_update(self, group: dict[str, Any], ps: list[Tensor], ortho: list[Tensor],
                             metas: list[MatrixMeta]) -> None:
        raise NotImplementedError

    @staticmethod
    def _to_param(ortho: list[Tensor], pl: list[Tensor]) -> list[Tensor]:
        """NS results (bf16 ``local_rows × cols``) as fresh tensors in each local parameter's dtype and shape."""
        return [o.to(dtype=x.dtype, copy=True).view(x.shape) for o, x in zip(ortho, pl)]

    # -- internal AdamW -------------------------------------------------------------------------------------

    def _step_other(self, group: dict[str, Any]) -> None:
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        for p in ps:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        pl = [local(p) for p in ps]
        gl = [local(p.grad) for p in ps]
        m = [local(self.state[p]["exp_avg"]) for p in ps]
        v = [local(self.state[p]["exp_avg_sq"]) for p in ps]
        steps = [self.state[p]["step"] for p in ps]
        beta1, beta2 = group["betas"]
        if group.get("cautious"):
            by_step: dict[int, list[int]] = defaultdict(list)
            for i, st in enumerate(steps):
                by_step[int(st.item())].append(i)  # CPU step counters: no device sync
            for t, idx in by_step.items():
                adam_foreach_([pl[i] for i in idx], [gl[i] for i in idx], [m[i] for i in idx], [v[i] for i in idx],
                              step=t, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], decoupled=True, cautious=True,
                              param_objs=[ps[i] for i in idx])
            for st in steps:
                st += 1
            return
        fused = fused_supported(pl)
        _adamw_functional(pl, gl, m, v, [], steps, foreach=None if fused else True, fused=fused or None,
                          amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

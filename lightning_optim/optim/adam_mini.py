"""Adam-mini (Zhang, Chen, Li, Ding, Chen, Ye, Luo & Sun 2024, "Adam-mini: Use Fewer Learning Rates To Gain
More", arXiv 2406.16793, Algorithm 1): Adam with one second moment per *block* of parameters instead of one
per element. For a block ``b`` of parameter ``x`` with gradient ``g`` at step ``t``::

    m = β1·m + (1-β1)·g                                       (elementwise, as Adam)
    v_b = β2·v_b + (1-β2)·mean_{i∈b}(g_i²)                    (one number per block)
    x ← x·(1 - η·λ) - η·(m / (1-β1^t)) / (sqrt(v_b / (1-β2^t)) + ε)

**The block rule** (the paper's partition by Hessian structure, §2.3; reference code zyushun/Adam-mini v1.1),
applied by parameter name (the groups' ``param_names``, given by the default grouping and by
``create_optimizer(name, model)``) — :func:`block_segments` is the rule, subclass and override it to change it:

* query and key weights (names ending in one of ``q_names`` / ``k_names``, default ``q_proj``/``wq`` and
  ``k_proj``/``wk``): one block per attention head (``n_heads`` for q, ``n_kv_heads`` for k);
* a fused q/k/v weight (``qkv_names``: ``qkv`` as in :mod:`lightning_optim.models.gpt`, nanoGPT's ``c_attn``,
  ``wqkv``, ``query_key_value``), rows stacked q, k, v in that order: one block per head for the q and k
  rows, one block per output row (neuron) for the v rows;
* every other tensor with >= 2 dimensions (MLP, value and output projections, embeddings and the output head,
  whose rows are tokens): one block per output row, i.e. per ``shape[0]`` slice;
* tensors with fewer than 2 dimensions (biases, norm gains): one block for the whole tensor.

``n_heads=None`` (the default, since the optimizer cannot see the model's config): q/k rows fall back to one
block per output row — finer than the paper's heads, so closer to Adam, never coarser — with one warning per
optimizer naming the first such parameter. Pass ``n_heads`` (and ``n_kv_heads`` for grouped-query attention)
for the published rule: ``OptimConfig(name="adam-mini", extra={"n_heads": 12})``.

Defaults: lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 (the reference's GPT-2 / Llama pretraining
settings; lr as the package's AdamW). pytorch-optimizer's ``AdamMini`` implements the paper's first release
(embeddings with full Adam, one block per non-attention tensor), not this rule, so the tests compare against
the algorithm box written plainly instead.

State per parameter: ``exp_avg`` (parameter-sized, the parameter's dtype), ``v_block`` (one float32 number per
block), ``step``. FSDP2: ``exp_avg`` is sharded like the parameter; the per-row sums of ``g²`` (``rows``
numbers) are all-reduced across the row shards each step, so a head block that straddles two shards gets the
same ``v_block`` on every rank, and ``v_block`` is a replicated DTensor. Other layouts (column sharding,
tensor parallelism) are refused at construction, naming the parameter.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import torch

from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._per_tensor import (DTensor, check_betas, check_count, check_nonneg, check_positive,
                                               is_dtensor, local, next_step, up, write_back)

__all__ = ["AdamMini", "block_segments"]

Q_NAMES = ("q_proj", "wq")
K_NAMES = ("k_proj", "wk")
QKV_NAMES = ("qkv", "c_attn", "wqkv", "query_key_value")


def _module_of(name: str) -> str:
    """``blocks.0.attn.qkv.weight`` → ``qkv`` (the owning module's own name, without ``_orig_mod.`` wrappers)."""
    parts = re.sub(r"(^|\.)_orig_mod\.", r"\1", name).split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def block_segments(name: str | None, shape: Sequence[int], n_heads: int | None, n_kv_heads: int | None,
                   q_names: Sequence[str] = Q_NAMES, k_names: Sequence[str] = K_NAMES,
                   qkv_names: Sequence[str] = QKV_NAMES) -> list[tuple[int, int]]:
    """The block rule: ``[(blocks, rows_per_block), ...]`` covering the tensor's rows in order.

    Rows are ``shape[0]`` slices for tensors with >= 2 dimensions and the whole tensor (one row) otherwise.
    ``n_heads=None`` makes q/k rows one block each (see the module docstring). Raises ``ValueError`` naming the
    parameter when its rows do not divide into the heads."""
    if len(shape) < 2:
        return [(1, 1)]
    rows = int(shape[0])
    module = _module_of(name) if name else ""
    is_weight = bool(name) and name.endswith("weight")
    if not is_weight or n_heads is None or module not in (*q_names, *k_names, *qkv_names):
        return [(rows, 1)]
    kv = n_kv_heads if n_kv_heads is not None else n_heads
    if module in qkv_names:
        heads_total = n_heads + 2 * kv
        if rows % heads_total:
            raise ValueError(f"adam-mini: parameter {name!r} has {rows} rows, not divisible into q/k/v of "
                             f"n_heads={n_heads}, n_kv_heads={kv} ({heads_total} head slices)")
        hd = rows // heads_total
        return [(n_heads, hd), (kv, hd), (kv * hd, 1)]
    heads = n_heads if module in q_names else kv
    if rows % heads:
        raise ValueError(f"adam-mini: parameter {name!r} has {rows} rows, not divisible into {heads} heads")
    return [(heads, rows // heads)]


def _names(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field} must be a list of module names, got {value!r}")
    return tuple(value)


class AdamMini(torch.optim.Optimizer):
    """Adam with one second moment per block (attention head, output neuron, token row, small tensor)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, n_heads: int | None = None,
                 n_kv_heads: int | None = None, q_names: Sequence[str] = Q_NAMES, k_names: Sequence[str] = K_NAMES,
                 qkv_names: Sequence[str] = QKV_NAMES) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        check_positive(eps=eps)
        if n_heads is not None:
            check_count("n_heads", n_heads)
        if n_kv_heads is not None:
            check_count("n_kv_heads", n_kv_heads)
            if n_heads is None:
                raise ValueError("n_kv_heads is set but n_heads is not; give both")
        super().__init__(params, dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                                      n_heads=n_heads, n_kv_heads=n_kv_heads, q_names=_names(q_names, "q_names"),
                                      k_names=_names(k_names, "k_names"),
                                      qkv_names=_names(qkv_names, "qkv_names")))
        self._warned = False
        for gi, group in enumerate(self.param_groups):  # a bad head count or layout is refused now, named
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                self._segments(group, i, p)
                check_placements(p, repr(names[i]) if names and i < len(names) else f"(group {gi} item {i})")

    def _segments(self, group: dict[str, Any], index: int, p: torch.Tensor) -> list[tuple[int, int]]:
        names = group.get("param_names")
        name = names[index] if names is not None and index < len(names) else None
        segments = block_segments(name, tuple(p.shape), group["n_heads"], group["n_kv_heads"],
                                  group["q_names"], group["k_names"], group["qkv_names"])
        if (group["n_heads"] is None and not self._warned and name and p.ndim >= 2 and name.endswith("weight")
                and _module_of(name) in (*group["q_names"], *group["k_names"], *group["qkv_names"])):
            self._warned = True
            warnings.warn(f"adam-mini: n_heads is not set, so the query/key rows of {name!r} (and any others) get "
                          "one second moment per output row instead of one per head; pass n_heads (extra: "
                          "{n_heads: ...}) for the published per-head blocks", stacklevel=3)
        return segments

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                segments = self._segments(group, i, p)
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v_block"] = _replicated_like(p, torch.zeros(sum(nb for nb, _ in segments),
                                                                        dtype=torch.float32, device=local(p).device))
                t = next_step(state)
                if p.numel() == 0:
                    continue
                x_store, m_store = local(p), local(state["exp_avg"])
                x, g, m = up(x_store), up(local(p.grad)), up(m_store)
                rows = p.shape[0] if p.ndim >= 2 else 1
                start, local_rows = _local_rows(p, x_store, rows)
                row_sq = _row_square_sums(p, g, rows, start, local_rows) / (p.numel() // rows)
                block_sq, first = [], 0
                for nb, rpb in segments:
                    block_sq.append(row_sq[first:first + nb * rpb].view(nb, rpb).mean(dim=1))
                    first += nb * rpb
                v = local(state["v_block"])
                v.mul_(beta2).add_(torch.cat(block_sq), alpha=1.0 - beta2)
                denom = (v / (1.0 - beta2 ** t)).sqrt_().add_(eps)
                per_row, first = [], 0
                for nb, rpb in segments:
                    per_row.append(denom[first:first + nb].repeat_interleave(rpb))
                    first += nb
                row_denom = torch.cat(per_row)[start:start + local_rows].unsqueeze(1)
                m.lerp_(g, 1.0 - beta1)
                if wd != 0:
                    x.mul_(1.0 - lr * wd)
                x.sub_(((m / (1.0 - beta1 ** t)).reshape(local_rows, -1) / row_denom).reshape(x.shape), alpha=lr)
                write_back(m_store, m)
                write_back(x_store, x)
        return loss


# ----------------------------------------------------------------------------------------------------------
# FSDP2: row shards (Shard(0), optionally under Replicate for HSDP); the block statistics are all-reduced


def check_placements(p: torch.Tensor, label: str) -> None:
    """Refuse a DTensor layout other than one ``Shard(0)`` (plus ``Replicate``), naming the parameter."""
    if not is_dtensor(p):
        return
    shards = [pl for pl in p.placements if pl.is_shard()]
    bad = [pl for pl in p.placements if not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0))]
    if bad or len(shards) > 1:
        raise ValueError(f"adam-mini: parameter {label} has DTensor placements {tuple(p.placements)}; only row "
                         "sharding (Shard(0), as FSDP2 does, optionally with Replicate() for HSDP) is supported")


def _shard_dim(p: torch.Tensor) -> int | None:
    if not is_dtensor(p):
        return None
    return next((d for d, pl in enumerate(p.placements) if pl.is_shard()), None)


def _local_rows(p: torch.Tensor, x_local: torch.Tensor, rows: int) -> tuple[int, int]:
    """``(first global row, rows held here)``; a 1-D tensor is one row held by every shard."""
    dim = _shard_dim(p)
    if dim is None or p.ndim < 2:
        return 0, rows
    n, coord = p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)
    chunk = -(-rows // n)  # DTensor's Shard(0) split: ceil(rows / n) rows per rank, the last ones fewer or none
    start = min(coord * chunk, rows)
    if x_local.shape[0] != max(0, min(chunk, rows - start)):
        raise ValueError(f"adam-mini: a row shard of {x_local.shape[0]} rows at rank {coord} of {n} is not "
                         f"DTensor's even split of {rows} rows")
    return start, x_local.shape[0]


def _row_square_sums(p: torch.Tensor, g: torch.Tensor, rows: int, start: int, local_rows: int) -> torch.Tensor:
    """Σ g² of every row of the whole tensor (float32, ``rows`` long), all-reduced across row shards."""
    local_sums = g.reshape(local_rows if p.ndim >= 2 else 1, -1).square().sum(dim=1)
    dim = _shard_dim(p)
    if dim is None:
        return local_sums
    import torch.distributed as dist

    full = torch.zeros(rows, dtype=torch.float32, device=g.device)
    full[start:start + local_sums.shape[0]] = local_sums
    dist.all_reduce(full, group=p.device_mesh.get_group(dim))
    return full


def _replicated_like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` as a DTensor replicated over ``p``'s mesh when ``p`` is a DTensor (checkpoints see one copy)."""
    if not is_dtensor(p):
        return t
    from torch.distributed.tensor import Replicate

    return DTensor.from_local(t, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)

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
block), ``step``. FSDP2 DTensor parameters are refused at construction (registry: ``supports_dtensor=False``):
a head block may straddle two shards.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import torch

from lightning_optim.optim._per_tensor import (check_betas, check_count, check_nonneg, check_positive, next_step, up,
                                               write_back)

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
        for group in self.param_groups:  # a bad head count is refused now, naming the parameter
            for i, p in enumerate(group["params"]):
                self._segments(group, i, p)

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
                    state["v_block"] = torch.zeros(sum(nb for nb, _ in segments), dtype=torch.float32,
                                                   device=p.device)
                t = next_step(state)
                if p.numel() == 0:
                    continue
                x, g, m = up(p), up(p.grad), up(state["exp_avg"])
                rows = p.shape[0] if p.ndim >= 2 else 1
                row_sq = g.reshape(rows, -1).square().mean(dim=1)
                block_sq, start = [], 0
                for nb, rpb in segments:
                    block_sq.append(row_sq[start:start + nb * rpb].view(nb, rpb).mean(dim=1))
                    start += nb * rpb
                v = state["v_block"]
                v.mul_(beta2).add_(torch.cat(block_sq), alpha=1.0 - beta2)
                denom = (v / (1.0 - beta2 ** t)).sqrt_().add_(eps)
                per_row, start = [], 0
                for nb, rpb in segments:
                    per_row.append(denom[start:start + nb].repeat_interleave(rpb))
                    start += nb
                m.lerp_(g, 1.0 - beta1)
                if wd != 0:
                    x.mul_(1.0 - lr * wd)
                step_ = (m / (1.0 - beta1 ** t)).reshape(rows, -1) / torch.cat(per_row).unsqueeze(1)
                x.sub_(step_.reshape(p.shape), alpha=lr)
                write_back(state["exp_avg"], m)
                write_back(p, x)
        return loss

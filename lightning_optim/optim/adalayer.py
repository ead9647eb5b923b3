"""Adalayer (Zhao, Morwani, Brandfonbrener, Vyas & Kakade 2024, "Deconstructing What Makes a Good Optimizer for
Language Models", arXiv 2407.07972, Section 5): Adam whose second moment is one number per layer ("block")
instead of one per element, so each layer gets one adaptive effective learning rate. For a block ``b`` of
parameter ``x`` with gradient ``g`` at step ``t``::

    m   = β1·m + (1-β1)·g                                   (elementwise, as Adam)
    v_b = β2·v_b + (1-β2)·mean_{i∈b}(g_i²)                  (one float32 number per block)
    x  ← x·(1 - η·λ)                                        (decoupled weight decay)
    x  ← x - η/(1-β1^t) · m / (sqrt(v_b)/sqrt(1-β2^t) + ε)

**Blocks**, as in the paper's runs (the authors' code: github.com/rosieyzh/optimizers-llm, ``olmo/optim.py``
``AdalayerW`` with ``att_correction`` and ``lastlayer_correction`` on, ``configs/sweeps/lr.yaml``):

* every tensor is one block (hidden matrices, embeddings, LayerNorm gains and biases: each norm tensor is
  its own layer, adapted like the rest), except
* the last layer (the output head, vocabulary × d): one block per row, i.e. per output token
  (``head_rows=True``); the paper finds adaptivity on the last layer and the LayerNorms is what Adam's
  preconditioning needs most;
* a fused q/k/v projection (``split_qkv=True``; module names of
  :data:`lightning_optim.optim.adam_mini.QKV_NAMES` and OLMo's ``att_proj``): three blocks, the q rows
  (``d_in`` of them) and the k and v rows (half the rest each), as the paper's q, k and v layers.

The head is recognised by the default grouping's ``matrix`` flag (``create_optimizer`` / the mixin): a
parameter with >= 2 dimensions in a group with ``"matrix": False`` is an embedding or the output head. With
the package's tied embeddings that tensor *is* the last layer. An untied input embedding is flagged the same
way and so also gets one block per row (the authors' ``firstlayer_correction``; their lr sweep kept the
embedding as one block) — give its group ``"head_rows": False`` to keep it whole. A plain parameter list has
no flags: every tensor is one block there (no per-row head), and fused q/k/v needs the groups' ``param_names``.

Defaults are the paper's settings: betas (0.9, 0.95), ε 1e-15, weight decay 0 (the sweeps), lr 1e-3 (the
paper sweeps 1e-4 … 1 per model size; tune it). Not included: the analysis variants (second moments frozen
after ``t_freeze`` steps; SGD on all but the last layer and the norms).

State per parameter: ``exp_avg`` (parameter-sized, the parameter's dtype), ``exp_avg_sq`` (one float32 number
per block: a 0-d tensor, or ``rows`` / 3 numbers), ``step``. bf16 parameters are updated in float32 and
written back. FSDP2 ``DTensor`` parameters are refused when the optimizer is built, naming the parameter (a
block mean needs the whole tensor).
"""

from __future__ import annotations

import math
import re
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._per_tensor import (check_betas, check_nonneg, check_positive, is_dtensor,
                                               is_matrix_param, local, next_step, up, write_back)
from lightning_optim.optim.adam_mini import QKV_NAMES

__all__ = ["Adalayer", "block_rows"]

FUSED_QKV_NAMES = (*QKV_NAMES, "att_proj")


def _module_name(name: str | None) -> str:
    """``blocks.0.attn.qkv.weight`` → ``qkv`` (without ``_orig_mod.`` wrappers); ``""`` without a name."""
    if not name:
        return ""
    parts = re.sub(r"(^|\.)_orig_mod\.", r"\1", name).split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def block_rows(p: Tensor, name: str | None, is_head: bool, split_qkv: bool) -> str | tuple[int, ...]:
    """The block rule: ``"tensor"`` (one block), ``"rows"`` (one per row) or row counts of consecutive blocks."""
    if p.ndim < 2:
        return "tensor"
    if is_head:
        return "rows"
    rows, cols = p.shape[0], p[0].numel()
    if split_qkv and _module_name(name) in FUSED_QKV_NAMES and rows > cols and (rows - cols) % 2 == 0:
        kv = (rows - cols) // 2
        return (cols, kv, kv)
    return "tensor"


def _block_mean_sq(g: Tensor, rule: str | tuple[int, ...]) -> Tensor:
    """mean(g²) over each block: 0-d for ``"tensor"``, ``(rows,)`` for ``"rows"``, one per segment otherwise."""
    sq = g.square()
    if rule == "tensor":
        return sq.mean()
    sq = sq.reshape(g.shape[0], -1)
    if rule == "rows":
        return sq.mean(dim=1)
    return torch.stack([s.mean() for s in sq.split(list(rule), dim=0)])


def _expand(v: Tensor, rule: str | tuple[int, ...], like: Tensor) -> Tensor:
    """Per-block values broadcast to ``like``'s shape."""
    if rule == "tensor":
        return v
    per_row = v if rule == "rows" else torch.repeat_interleave(v, torch.tensor(rule, device=v.device))
    return per_row.reshape(-1, *([1] * (like.ndim - 1)))


class Adalayer(torch.optim.Optimizer):
    """Adam with one second moment per layer (per row for the output head); see the module docstring.

    Args:
        params: parameters or groups (``param_names`` enable the fused q/k/v split; ``"matrix": False``
            marks embeddings / the head, as the default grouping does). A group may set ``head_rows``.
        lr, betas, eps, weight_decay: as AdamW (decoupled decay ``x ← x·(1 - lr·λ)``).
        head_rows: one block per row for >= 2-D parameters of ``"matrix": False`` groups (the last layer).
        split_qkv: three blocks (q, k, v rows) for a fused q/k/v projection named in ``param_names``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-15, weight_decay: float = 0.0, head_rows: bool = True,
                 split_qkv: bool = True) -> None:
        check_nonneg(lr=lr, weight_decay=weight_decay)
        check_positive(eps=eps)
        super().__init__(params, dict(lr=lr, betas=check_betas(betas), eps=eps, weight_decay=weight_decay,
                                      head_rows=bool(head_rows), split_qkv=bool(split_qkv)))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        ps = param_group.get("params")
        ps = [ps] if isinstance(ps, Tensor) else list(ps) if ps is not None else []
        names = param_group.get("param_names") or []
        where = f"param group {param_group.get('name', len(self.param_groups))!r}"
        for i, p in enumerate(ps):
            p = p[1] if isinstance(p, tuple) else p
            if is_dtensor(p):
                label = repr(names[i]) if i < len(names) and names[i] else f"{where} item {i} shape {tuple(p.shape)}"
                raise ValueError(f"adalayer: parameter {label} is a DTensor (FSDP2 shard); a layer's second "
                                 "moment is a mean over the whole tensor: use DDP, or an elementwise optimizer "
                                 "under FSDP2")
        super().add_param_group({**param_group, "params": ps})

    def _rule(self, group: dict[str, Any], index: int, p: Tensor) -> str | tuple[int, ...]:
        names = group.get("param_names") or []
        name = names[index] if index < len(names) else None
        is_head = group["head_rows"] and group.get("matrix") is not None and not is_matrix_param(group, p)
        return block_rows(p, name, is_head, group["split_qkv"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adalayer does not support sparse gradients")
                rule = self._rule(group, index, p)
                state = self.state[p]
                x_store, g = local(p), up(local(p.grad))
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(_block_mean_sq(g, rule), dtype=torch.float32)
                t = next_step(state)
                m_store, v = local(state["exp_avg"]), state["exp_avg_sq"]
                x, m = up(x_store), up(m_store)
                m.lerp_(g, 1.0 - beta1)
                v.lerp_(_block_mean_sq(g, rule), 1.0 - beta2)
                if wd != 0:
                    x.mul_(1.0 - lr * wd)
                denom = _expand(v, rule, x).sqrt().div(math.sqrt(1.0 - beta2 ** t)).add_(eps)
                x.sub_(m / denom, alpha=lr / (1.0 - beta1 ** t))
                write_back(m_store, m)
                write_back(x_store, x)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to the parameter's dtype; the per-block second moments are put back from
        the saved float32 values (not from a bf16 rounding of them), so a bf16 run resumes exactly."""
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        saved_v = {i: state_dict["state"][i]["exp_avg_sq"] for i in saved_ids
                   if i in state_dict["state"] and "exp_avg_sq" in state_dict["state"][i]}
        super().load_state_dict(state_dict)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for i, p in zip(saved_ids, params):
            if i in saved_v:
                self.state[p]["exp_avg_sq"] = saved_v[i].to(device=local(p).device, dtype=torch.float32, copy=True)

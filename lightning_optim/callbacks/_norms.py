"""On-device norm helpers shared by the stability callbacks.

Everything here stays on the device: per-tensor squared norms come from one ``torch._foreach_norm`` call per
(device, dtype) bucket, sums per layer from one ``index_add_``, and the only cross-rank traffic is one
``all_reduce`` of a stacked vector of *squared* norms when parameters are sharded (FSDP2 ``DTensor`` shards, or
FSDP1 flat shards). Under DDP gradients and weights are identical on every rank after the gradient all-reduce,
so no collective is needed. Nothing here calls ``.item()``.

For a sharded ``DTensor`` the full squared norm is the sum of the local shards' squared norms over the mesh
dimension it is sharded on: that is exactly what ``torch.linalg.vector_norm(g).full_tensor()`` computes, done
for all parameters at once instead of one collective per parameter.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_optim._dtensor import DTensor, Shard, local


def shard_group(t: Tensor):
    """The process group a ``DTensor`` is sharded over (``None`` when it is not a sharded DTensor)."""
    if not isinstance(t, DTensor):
        return None
    dims = [i for i, pl in enumerate(t.placements) if isinstance(pl, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("norms of DTensors sharded over more than one mesh dimension are not supported")
    return t.device_mesh.get_group(dims[0])


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Float32 vector of the squared L2 norms of the local parts of ``tensors`` (empty tensors give 0)."""
    if not tensors:
        return torch.zeros(0)
    locs = [local(t) for t in tensors]
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(locs):
        buckets[(t.device, t.dtype)].append(i)
    device = locs[0].device
    out = torch.empty(len(locs), dtype=torch.float32, device=device)
    for (dev, _dtype), idx in buckets.items():
        norms = torch._foreach_norm([locs[i] for i in idx], 2.0)
        sq = torch.stack(norms).float().pow_(2)
        out.index_copy_(0, torch.tensor(idx, device=device), sq.to(device))
    return out


def reduce_squared(sq: Tensor, tensors: Sequence[Tensor], sharded_plain: bool = False) -> Tensor:
    """Make local squared norms global: sum the sharded entries across the ranks that hold their shards.

    One ``all_reduce`` at most. Replicated entries (plain tensors under DDP, replicated DTensors) are divided by
    the group size before the sum so that they come back unchanged. ``sharded_plain``: treat plain tensors as
    shards over the default group (FSDP1 flat parameters).
    """
    groups = [shard_group(t) for t in tensors]
    group = next((g for g in groups if g is not None), None)
    if group is None and sharded_plain and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
        groups = [group] * len(tensors)
    if group is None:
        return sq
    if any(g is not None and g != group for g in groups):
        raise NotImplementedError("parameters sharded over different process groups are not supported")
    size = dist.get_world_size(group)
    mask = torch.tensor([g is not None for g in groups], device=sq.device)
    sq = torch.where(mask, sq, sq / size)
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return sq


def is_fsdp1(trainer) -> bool:
    """Lightning's FSDPStrategy (FSDP1): parameters are flat shards that are plain tensors."""
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def layer_name(param_name: str, module_names: set[str]) -> str:
    """The module a parameter belongs to: ``h.0.attn.c_attn.weight`` -> ``h.0.attn.c_attn``."""
    parts = param_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in module_names:
            return prefix
    return parts[0] if len(parts) > 1 else param_name


class LayerIndex:
    """Maps the trainable parameters of a module to layers (their owning module) for per-layer sums."""

    def __init__(self, module: nn.Module, by: str = "module") -> None:
        if by not in ("module", "parameter"):
            raise ValueError(f"group_by must be 'module' or 'parameter', got {by!r}")
        names = {n for n, _ in module.named_modules() if n}
        self.param_names: list[str] = []
        self.params: list[nn.Parameter] = []
        layers: list[str] = []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            self.param_names.append(name)
            self.params.append(p)
            layers.append(name if by == "parameter" else layer_name(name, names))
        self.layers: list[str] = list(dict.fromkeys(layers))
        pos = {layer: i for i, layer in enumerate(self.layers)}
        self._ids = [pos[layer] for layer in layers]
        self._ids_dev: dict[torch.device, Tensor] = {}

    def ids(self, device: torch.device) -> Tensor:
        if device not in self._ids_dev:
            self._ids_dev[device] = torch.tensor(self._ids, dtype=torch.long, device=device)
        return self._ids_dev[device]

    def per_layer(self, per_param: Tensor) -> Tensor:
        """Sum a per-parameter vector (or a (k, n_params) matrix) into per-layer entries."""
        ids = self.ids(per_param.device)
        if per_param.dim() == 1:
            return torch.zeros(len(self.layers), device=per_param.device).index_add_(0, ids, per_param)
        out = torch.zeros(per_param.shape[0], len(self.layers), device=per_param.device)
        return out.index_add_(1, ids, per_param)


def grads_of(params: Iterable[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]

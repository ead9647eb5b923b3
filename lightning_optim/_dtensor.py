"""FSDP2 ``DTensor`` helpers shared by the optimizers and callbacks (one definition each).

A ``DTensor`` (``torch.distributed.tensor``, public since torch 2.4; this package pins ``torch>=2.6``) is a
global tensor whose data lives in per-rank shards: ``placements`` says, per mesh dimension, whether it is
sharded along a dim (``Shard(d)``) or replicated (``Replicate()``). Elementwise updates run on the local
shard; anything that needs whole rows or norms over the whole tensor must communicate.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

__all__ = ["DTensor", "Replicate", "Shard", "is_dtensor", "is_sharded", "local", "local_slice", "shard_dim",
           "rows_placements"]


def is_dtensor(t: Any) -> bool:
    """``t`` is a ``DTensor`` (an FSDP2 parameter, its gradient or state created like it)."""
    return isinstance(t, DTensor)


def is_sharded(t: Any) -> bool:
    """``t`` is a ``DTensor`` split across ranks on at least one mesh dimension (not only replicated)."""
    return isinstance(t, DTensor) and any(shard_dim(p) is not None for p in t.placements)


def shard_dim(placement: Placement) -> int | None:
    """The tensor dimension a placement splits: ``Shard(d)`` and ``_StridedShard(d)`` give ``d``, anything else
    ``None``. ``_StridedShard`` is what ``fully_shard`` puts on the data-parallel mesh dimension of a parameter
    that tensor parallelism already split along the same dimension (torch 2.13: ``(_StridedShard(dim=0, sf=2),
    Shard(dim=0))`` for a ``ColwiseParallel`` weight on a ``(dp, tp)`` mesh); it is not a ``Shard`` subclass and
    its ``is_shard()`` is ``False``, hence this helper."""
    if isinstance(placement, _StridedShard):
        return int(placement.dim)
    if isinstance(placement, Shard):
        return int(placement.dim)
    return None


def rows_placements(placements: tuple[Placement, ...]) -> tuple[Placement, ...]:
    """Placements for a ``rows × 1`` companion of a matrix laid out with ``placements`` (a per-row state such as
    NorMuon's second moment): row splits are kept, column splits become ``Replicate()`` (the ranks holding
    different columns of the same rows hold the same per-row values)."""
    return tuple(Replicate() if shard_dim(p) not in (None, 0) else p for p in placements)


def local(t: Tensor) -> Tensor:
    """The data this rank holds: a ``DTensor``'s local shard (a view sharing storage, so in-place writes
    reach the ``DTensor``), the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_slice(full: Tensor, p: Tensor) -> Tensor:
    """The part of ``full`` (a tensor of ``p``'s global shape, the same on every rank) that the DTensor ``p`` holds
    on this rank, by torch's own shard arithmetic (``compute_local_shape_and_global_offset``): what SOAP, Shampoo
    and PSGD-Kron apply after computing a full update from a gathered gradient. Contiguous blocks only: the
    optimizers that use it run on ``Shard``/``Replicate`` layouts (FSDP2, HSDP, TP), not ``_StridedShard``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]

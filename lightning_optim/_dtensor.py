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

__all__ = ["DTensor", "Replicate", "Shard", "is_dtensor", "is_sharded", "local"]


def is_dtensor(t: Any) -> bool:
    """``t`` is a ``DTensor`` (an FSDP2 parameter, its gradient or state created like it)."""
    return isinstance(t, DTensor)


def is_sharded(t: Any) -> bool:
    """``t`` is a ``DTensor`` split across ranks on at least one mesh dimension (not only replicated)."""
    return isinstance(t, DTensor) and any(p.is_shard() for p in t.placements)


def local(t: Tensor) -> Tensor:
    """The data this rank holds: a ``DTensor``'s local shard (a view sharing storage, so in-place writes
    reach the ``DTensor``), the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t

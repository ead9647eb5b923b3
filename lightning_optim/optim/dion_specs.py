"""Registry records of dion: one :class:`~lightning_optim.specs.OptimizerSpec` per registry name.

The algorithm module knows nothing of the registry; :mod:`lightning_optim.builtins` splices :data:`SPECS`
into the built-in table. ``defaults`` are :class:`~lightning_optim.optim.dion.Dion`'s ``__init__`` defaults
(microsoft/dion's, written once in the signature).
"""

from __future__ import annotations

import math

from lightning_optim.optim import dion
from lightning_optim.optim._hybrid import ADAMW_ROUTING
from lightning_optim.specs import OptimizerSpec, StateLayout, signature_defaults

__all__ = ["SPECS"]

_DEFAULTS = signature_defaults(dion.Dion)[0]


def _right_factor(shape: tuple[int, ...]) -> int:
    """+ n·r (Q), r = rank_fraction·min(m, n) at the default rank_fraction"""
    if len(shape) < 2 or math.prod(shape) == 0:
        return 0
    rows, cols = int(shape[0]), int(math.prod(shape[1:]))
    return cols * dion.dion_rank(rows, cols, _DEFAULTS["rank_fraction"])


SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="dion", factory=dion.Dion, defaults=_DEFAULTS, family="matrix", hybrid=True,
        state=StateLayout(1, extra=_right_factor, names=("momentum",), replicated="extra"),
        other_state=StateLayout(2, names=("exp_avg", "exp_avg_sq")),
        routing=ADAMW_ROUTING,
        paper="Ahn, Xu et al. 2025, Dion: Distributed Orthonormalized Updates (arXiv 2504.05295), Algorithm 1",
        reference="https://github.com/microsoft/dion (dion/dion_reference.py, dion/dion.py)",
        description="rank-r orthonormal update from one power-iteration step on an error-feedback buffer "
        "(P = orth(B·Q), Q ← colnorm(Bᵀ·P)); row-sharded under FSDP2/HSDP with two all-reduces per step",
        dtensor_note="FSDP2 Shard(0) and HSDP (Replicate, Shard(0)) row shards are stepped where they are; "
        "sums over the shards (the QR sketch; the Gram matrix with Bᵀ·P) are two packed all-reduces per step",
    ),
)

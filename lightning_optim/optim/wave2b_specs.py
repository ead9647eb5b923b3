"""Registry records of the wave-2 second batch: Scion (and Adalayer once it lands).

:data:`SPECS` lists one :class:`OptimizerSpec` per registry name; the algorithm modules know nothing of the
registry. Each record's ``defaults`` are its class's ``__init__`` defaults (the published settings live in
the signature, written once). :mod:`lightning_optim.builtins` lists them in the built-in table.
"""

from __future__ import annotations

from lightning_optim.optim import scion
from lightning_optim.specs import OptimizerSpec, StateLayout, signature_defaults

__all__ = ["SPECS"]

_MOMENTUM_STATE = StateLayout(1, names=("momentum_buffer",))

SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="scion", factory=scion.Scion, defaults=signature_defaults(scion.Scion)[0], family="lmo",
        # hybrid: the default grouping flags hidden matrices, which take the spectral LMO; the rest take sign
        # (>= 2 dims: embeddings, head) or bias_rms (vectors). Every parameter keeps one momentum buffer.
        hybrid=True, state=_MOMENTUM_STATE, other_state=_MOMENTUM_STATE,
        routing="hidden matrices (>= 2 dims; not embeddings or the output head under the default grouping): "
        "spectral LMO sqrt(d_out/d_in)·NS(d), radius; embeddings and the head: sign(d)/d_in, head_radius; "
        "vectors: d/RMS(d), vector_radius; a group's 'norm' and 'radius' override",
        paper="Pethick et al. 2025, Training Deep Learning Models with Norm-Constrained LMOs (arXiv 2502.07529)",
        reference="https://github.com/LIONS-EPFL/scion (scion.py; examples/modded-nanogpt radii)",
        description="momentum, then a per-layer norm-ball LMO (spectral / sign / RMS); constrained variant "
        "x ← (1-lr)·x + lr·lmo(d)",
        supports_dtensor=False,
        dtensor_note="the spectral LMO (Newton–Schulz) needs whole matrices; use DDP, or an elementwise "
        "optimizer under FSDP2",
    ),
)

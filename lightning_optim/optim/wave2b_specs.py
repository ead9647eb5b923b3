"""Registry records of the wave-2 second batch: Scion and Adalayer.

:data:`SPECS` lists one :class:`OptimizerSpec` per registry name; the algorithm modules know nothing of the
registry. Each record's ``defaults`` are its class's ``__init__`` defaults (the published settings live in
the signature, written once). :mod:`lightning_optim.builtins` lists them in the built-in table.
"""

from __future__ import annotations

from lightning_optim.optim import adalayer, scion
from lightning_optim.specs import OptimizerSpec, StateLayout, signature_defaults

__all__ = ["SPECS"]

_MOMENTUM_STATE = StateLayout(1, names=("momentum_buffer",))


def _one_block(shape: tuple[int, ...]) -> int:
    """+ 1 (one second moment per tensor; 3 for a fused q/k/v)"""
    return 1


def _head_blocks(shape: tuple[int, ...]) -> int:
    """+ one per row for embeddings / the head, 1 for vectors"""
    return int(shape[0]) if len(shape) >= 2 else 1


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
        # hidden matrices on the Muon family's orthogonalisation (shared among DDP replicas, once per matrix
        # on an owner for FSDP2 / HSDP / TP shards); the RMS LMOs' sums of squares are all-reduced over shards
        supports_dtensor=True,
    ),
    OptimizerSpec(
        name="adalayer", factory=adalayer.Adalayer, defaults=signature_defaults(adalayer.Adalayer)[0],
        family="block-wise",
        # hybrid: the default grouping's matrix flag tells the output head (one block per row) from the rest
        hybrid=True,
        state=StateLayout(1, extra=_one_block, names=("exp_avg",)),
        other_state=StateLayout(1, extra=_head_blocks, names=("exp_avg",)),
        routing="one second moment per tensor (hidden matrices, LayerNorm gains, biases; a fused q/k/v: one "
        "each for q, k, v); embeddings and the output head (>= 2 dims, not matrices under the default "
        "grouping): one per row",
        paper="Zhao et al. 2024, Deconstructing What Makes a Good Optimizer for Language Models "
        "(arXiv 2407.07972), Adalayer",
        reference="https://github.com/rosieyzh/optimizers-llm (olmo/optim.py AdalayerW, configs/sweeps/lr.yaml)",
        description="Adam with one second moment per layer (per token row for the last layer)",
        supports_dtensor=False,
        dtensor_note="a layer's second moment is a mean over the whole tensor; use DDP, or an elementwise "
        "optimizer under FSDP2",
    ),
)

"""Registry records of adamuon: one :class:`~lightning_optim.specs.OptimizerSpec` per registry name.

The algorithm module knows nothing of the registry; :mod:`lightning_optim.builtins` splices :data:`SPECS`
into the built-in table. The record's ``defaults`` are the class's ``__init__`` defaults (the published
settings live in the signature, written once).
"""

from __future__ import annotations

from lightning_optim.optim import adamuon
from lightning_optim.optim._hybrid import ADAMW_ROUTING
from lightning_optim.specs import OptimizerSpec, StateLayout, signature_defaults

__all__ = ["SPECS"]

SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="adamuon", factory=adamuon.AdaMuon, defaults=signature_defaults(adamuon.AdaMuon)[0],
        family="matrix", hybrid=True,
        # matrices: the momentum buffer and the element-wise second moment V of NS(sign(U)); the rest: AdamW
        state=StateLayout(2, names=("momentum_buffer", "exp_avg_sq")),
        other_state=StateLayout(2, names=("exp_avg", "exp_avg_sq")),
        low_precision_state={True: ("momentum_buffer",), False: ()},
        routing=ADAMW_ROUTING,
        paper="Si, Zhang & Shen 2025, AdaMuon: Adaptive Muon Optimizer (arXiv 2507.11005)",
        reference="https://github.com/Chongjie-Si/AdaMuon (adamuon.py; gpt2/models/train.py settings)",
        description="Muon on sign(momentum), then an element-wise second moment of the orthogonalised update "
        "and a 0.2·sqrt(mn)/‖·‖_F rescale (Adam's update RMS: Adam's lr carries over)",
        supports_dtensor=True,
        dtensor_note="V is sharded like the parameter; ‖Ô‖_F is all-reduced over the shards",
    ),
)

"""Registry records of shampoo: one :class:`~lightning_optim.specs.OptimizerSpec` per registry name.

The algorithm module knows nothing of the registry; :mod:`lightning_optim.builtins` splices :data:`SPECS`
into the built-in table. The record's ``defaults`` are the class's ``__init__`` defaults (the published
settings live in the signature, written once).
"""

from __future__ import annotations

from lightning_optim.optim import shampoo
from lightning_optim.specs import OptimizerSpec, StateLayout, signature_defaults

__all__ = ["SPECS"]

_DEFAULTS = signature_defaults(shampoo.Shampoo)[0]


def _shampoo_factors(shape: tuple[int, ...]) -> int:
    """+ 2·Σ_blocks Σ_i d_i² (a factor and its root per block side; blocks of <= 1024)"""
    return shampoo.shampoo_state_numel(shape, _DEFAULTS["max_preconditioner_dim"], _DEFAULTS["merge_dims"],
                                       _DEFAULTS["precondition_1d"])


SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="shampoo", factory=shampoo.Shampoo, defaults=_DEFAULTS, family="matrix",
        # exp_avg (beta1 > 0) and the grafting Adam's second moment, then the blocked factors and roots
        state=StateLayout(2, extra=_shampoo_factors, names=("exp_avg", "grafting_exp_avg_sq"), replicated="all"),
        routing="every parameter follows the same rule: blocks of at most max_preconditioner_dim per side, "
        "one factor per side (1-D blocks: a full d×d factor; precondition_1d=False: the grafting Adam alone)",
        paper="Gupta et al. 2018, Shampoo: Preconditioned Stochastic Tensor Optimization (arXiv 1802.09568); "
        "Shi et al. 2023, A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo "
        "Optimizer (arXiv 2309.06497)",
        reference="https://github.com/facebookresearch/optimizers (distributed_shampoo, README Example 4: "
        "AdamW grafting)",
        description="blocked Kronecker-factored preconditioner L^(-1/2k)·G·R^(-1/2k), roots (eigh or coupled "
        "Newton) every precondition_frequency steps, step norm grafted from Adam per block",
        aliases=("distributed-shampoo",),
    ),
)

"""Registry records of the wave-2 optimizers: LAMB, StableAdamW, Adam-mini, GaLore, APOLLO (and APOLLO-Mini).

:data:`SPECS` lists one :class:`OptimizerSpec` per registry name; the algorithm modules know nothing of the
registry. Each record's ``defaults`` are its class's ``__init__`` defaults (the published settings live in
the signature, written once), except APOLLO-Mini, which is APOLLO with the paper's rank-1 tensor-wise settings.
:mod:`lightning_optim.builtins` lists them in the built-in table.
"""

from __future__ import annotations

import math

from lightning_optim.optim import adam_mini, apollo, galore, lamb, stable_adamw
from lightning_optim.optim._low_rank import low_rank_shape, projector_shape
from lightning_optim.specs import OptimizerSpec, StateLayout, signature_defaults

__all__ = ["SPECS"]

_ADAM_STATE = StateLayout(2, names=("exp_avg", "exp_avg_sq"))
_LOW_RANK_ROUTING = ("matrices (>= 2 dims; not embeddings or the output head under the default grouping): "
                     "low-rank projected state; everything else: AdamW")
_LOW_RANK_DTENSOR = ("the projection needs whole matrices (an SVD or a channel norm over all rows); use DDP, or "
                     "an elementwise optimizer under FSDP2")


def _signature(cls: type) -> dict:
    return signature_defaults(cls)[0]


def _blocks(shape: tuple[int, ...]) -> int:
    """+ one per row (Adam-mini v_block; per head for q/k when n_heads is set)"""
    return int(shape[0]) if len(shape) >= 2 else 1


def _low_rank_state(rank: int):
    def extra(shape: tuple[int, ...]) -> int:
        if len(shape) < 2 or math.prod(shape) == 0:
            return 2 * math.prod(shape)
        return 2 * math.prod(low_rank_shape(rank, shape)) + math.prod(projector_shape(rank, shape))

    extra.__doc__ = f"2·r·max(m,n) + r·min(m,n), r = min({rank}, m, n) (the default rank)"
    return extra


_GALORE = _signature(galore.GaLore)
_APOLLO = _signature(apollo.APOLLO)
_APOLLO_MINI = {**_APOLLO, "rank": 1, "scale_type": "tensor", "scale": 128.0}

SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="lamb", factory=lamb.LAMB, defaults=_signature(lamb.LAMB), family="layer-wise",
        state=_ADAM_STATE,
        paper="You et al. 2020, Large Batch Optimization for Deep Learning: Training BERT in 76 minutes "
        "(arXiv 1904.00962), Algorithm 2",
        reference="google-research/bert optimization.py (LAMB); pytorch-optimizer Lamb",
        description="AdamW step rescaled per tensor by the trust ratio ‖x‖ / ‖update‖",
    ),
    OptimizerSpec(
        name="stable-adamw", factory=stable_adamw.StableAdamW, defaults=_signature(stable_adamw.StableAdamW),
        state=_ADAM_STATE,
        paper="Wortsman et al. 2023, Stable and low-precision training for large-scale vision-language models "
        "(arXiv 2304.13013), Algorithm 2",
        reference="the paper's algorithm box; pytorch-optimizer StableAdamW",
        description="AdamW with per-tensor update clipping: lr / max(1, RMS(g / sqrt(v)))",
        aliases=("stableadamw",),
    ),
    OptimizerSpec(
        name="adam-mini", factory=adam_mini.AdamMini, defaults=_signature(adam_mini.AdamMini),
        family="block-wise",
        state=StateLayout(1, extra=_blocks, names=("exp_avg",)),
        routing="one second moment per block: per head for query/key (n_heads), per output row for other "
        "matrices (tokens for embeddings and head), per tensor for 1-D parameters",
        paper="Zhang et al. 2024, Adam-mini: Use Fewer Learning Rates To Gain More (arXiv 2406.16793)",
        reference="https://github.com/zyushun/Adam-mini (v1.1 block rule)",
        description="Adam with one second moment per Hessian block instead of per element",
        aliases=("adammini",),
    ),
    OptimizerSpec(
        name="galore", factory=galore.GaLore, defaults=_GALORE, family="low-rank",
        state=StateLayout(0, extra=_low_rank_state(_GALORE["rank"])), other_state=_ADAM_STATE, hybrid=True,
        routing=_LOW_RANK_ROUTING,
        paper="Zhao et al. 2024, GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection "
        "(arXiv 2403.03507)",
        reference="https://github.com/jiaweizzhao/GaLore (galore_torch/adamw.py, galore_projector.py)",
        description="Adam moments of the gradient projected on its top-r singular vectors, refreshed every "
        "update_proj_gap steps",
        supports_dtensor=False, dtensor_note=_LOW_RANK_DTENSOR,
    ),
    OptimizerSpec(
        name="apollo", factory=apollo.APOLLO, defaults=_APOLLO, family="low-rank",
        state=StateLayout(0, extra=_low_rank_state(_APOLLO["rank"])), other_state=_ADAM_STATE, hybrid=True,
        routing=_LOW_RANK_ROUTING,
        paper="Zhu et al. 2024, APOLLO: SGD-like Memory, AdamW-level Performance (arXiv 2412.05270)",
        reference="https://github.com/zhuhanqing/APOLLO (apollo_torch/apollo.py, random_projector.py)",
        description="raw gradient scaled channel-wise by Adam's ratio estimated in a random rank-r projection",
        supports_dtensor=False, dtensor_note=_LOW_RANK_DTENSOR,
    ),
    OptimizerSpec(
        name="apollo-mini", factory=apollo.APOLLO, defaults=_APOLLO_MINI, family="low-rank",
        state=StateLayout(0, extra=_low_rank_state(_APOLLO_MINI["rank"])), other_state=_ADAM_STATE, hybrid=True,
        routing=_LOW_RANK_ROUTING,
        paper="Zhu et al. 2024, APOLLO: SGD-like Memory, AdamW-level Performance (arXiv 2412.05270), APOLLO-Mini",
        reference="https://github.com/zhuhanqing/APOLLO (rank 1, scale_type tensor, scale 128)",
        description="APOLLO with a rank-1 projection and one tensor-wise scale (SGD-like memory)",
        aliases=("apollomini",),
        supports_dtensor=False, dtensor_note=_LOW_RANK_DTENSOR,
    ),
)


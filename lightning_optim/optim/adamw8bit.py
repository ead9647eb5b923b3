"""8-bit AdamW through bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
arXiv 2110.02861): AdamW with block-wise uint8 moments (≈ 2 bytes of state per parameter, plus per-block
scales). Tensors with fewer than ``min_8bit_size`` elements keep 32-bit state. Runs on CPU since
bitsandbytes 0.45.

Optional extra: ``pip install 'lightning-optim[bnb]'``; without it ``create_optimizer("adamw8bit", ...)``
raises an ImportError naming the extra. bitsandbytes' state is not DTensor-aware: for FSDP2 use torchao's
8-bit AdamW (``create_optimizer("torchao.optim.AdamW8bit", ...)``).
"""

from __future__ import annotations

from typing import Any

from lightning_optim.registry import StateLayout, register_optimizer


@register_optimizer(
    "adamw8bit",
    defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
              "min_8bit_size": 4096, "is_paged": False},
    state=StateLayout(2, names=("state1", "state2"), bytes_per_element=1.0 + 4.0 / 256),
    paper="Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization (arXiv 2110.02861)",
    reference="bitsandbytes-foundation/bitsandbytes bitsandbytes.optim.AdamW8bit",
    description="AdamW with block-wise 8-bit moments (bitsandbytes; optional extra 'bnb')",
    aliases=("adamw-8bit", "bnb-adamw8bit"),
    requires="bnb",
    supports_dtensor=False,
    dtensor_note=(
        "bitsandbytes' 8-bit kernels have no DTensor sharding strategy; use DDP, or torchao's 8-bit AdamW "
        "(torchao.optim.AdamW8bit, FSDP2-friendly) through its class path"
    ),
)
def adamw8bit(params: list[dict[str, Any]], **hp: Any):
    import bitsandbytes as bnb  # ImportError → the registry names the extra

    return bnb.optim.AdamW8bit(params, **hp)

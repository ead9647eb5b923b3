"""8-bit AdamW through bitsandbytes (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization",
arXiv 2110.02861): AdamW with block-wise uint8 moments (≈ 2 bytes of state per parameter, plus per-block
scales). Tensors with fewer than ``min_8bit_size`` elements keep 32-bit state. Runs on CPU since
bitsandbytes 0.45.

Optional extra: ``pip install 'lightning-optim[bnb]'``; without it ``create_optimizer("adamw8bit", ...)``
raises an ImportError naming the extra. bitsandbytes' state is not DTensor-aware: for FSDP2 use torchao's
8-bit AdamW, ``adamw8bit-torchao`` (``lightning_optim/optim/torchao_lowbit.py``).
"""

from __future__ import annotations

from typing import Any


def adamw8bit(params: list[dict[str, Any]], **hp: Any):
    """``bitsandbytes.optim.AdamW8bit`` over ``params``; bitsandbytes is imported only when one is built."""
    import bitsandbytes as bnb  # ImportError → the registry names the extra

    return bnb.optim.AdamW8bit(params, **hp)

"""Low-bit AdamW from torchao: 8-bit, 4-bit and FP8 optimizer state with DTensor-aware (FSDP2) state.

torchao (``pip install 'lightning-optim[torchao]'``) implements AdamW with block-wise quantised moments as
tensor subclasses: Dettmers et al.'s dynamic-tree 8-bit quantisation (``AdamW8bit``; 2110.02861), Li et al.'s
4-bit state (``AdamW4bit``: 4-bit first moment, 4-bit linear second moment; "Memory Efficient Optimizers with
4-bit States", arXiv 2309.01507) and FP8 (e4m3) state with a per-block scale (``AdamWFp8``). Each step
dequantises a tensor's moments, runs the AdamW update in float32 and requantises (the per-parameter update is
``torch.compile``d by torchao itself: the first step compiles, about 15 s on CPU for the 8-bit kernel).

Why these rather than bitsandbytes' ``adamw8bit``: the state subclasses are wrapped in ``DTensor`` like the
parameter, so they shard under FSDP2 (``fully_shard``) and save through ``torch.distributed.checkpoint``;
bitsandbytes' state is not DTensor-aware (its entry refuses DTensor parameters). Their state dicts load with
``torch.load(weights_only=True)`` (torchao registers its subclasses as safe globals).

Measured here (torchao 0.18.0, torch 2.13 CPU; ``tests/conformance`` run with torchao installed): all three
train on CPU and pass resume (torch.save and DCP), non-finite, bf16, bad-input and Lightning-FSDP2-checkpoint
cells; the 2-process FSDP2 cell with *uneven* shards (13 rows over 2 ranks: 7 + 6) fails inside torchao's own
``torch.compile``d step (an Inductor size assertion, ``expected size 7==6``: a graph specialised to one
rank's shard shape runs on the other's). Shard dimensions that divide evenly by the world size avoid it; this
is why torchao is an optional extra and not part of the test extra. Their first step compiles (8-bit ~15 s on
CPU).

Names: ``adamw8bit`` stays bitsandbytes'; torchao's 8-bit one is ``adamw8bit-torchao`` (same algorithm
family, the backend in the name so the two are never confused); ``adamw4bit`` and ``adamw-fp8`` exist only
here, so they carry no suffix (``adamw4bit-torchao`` / ``adamw-fp8-torchao`` are aliases).

As in torchao, only tensors with at least 4096 elements whose size is a multiple of ``block_size`` get
quantised state; the others keep state like the parameter. Defaults follow ``adamw``: lr 1e-3, betas
(0.9, 0.999), eps 1e-8, weight decay 0.1; ``block_size`` 256 (8-bit, FP8) / 128 (4-bit), torchao's.
``bf16_stochastic_round`` is torchao's option for bf16 *parameters* (stochastic rounding of the weight update).
"""

from __future__ import annotations

import math
from typing import Any

from lightning_optim.specs import OptimizerSpec, StateLayout

__all__ = ["TORCHAO_OPTIMIZERS", "SPECS", "quantized_if"]

#: registry name → (torchao class, bytes per element of a quantised state tensor, default block size)
TORCHAO_OPTIMIZERS = {
    "adamw8bit-torchao": ("AdamW8bit", 1.0 + 4.0 / 256, 256),
    "adamw4bit": ("AdamW4bit", 0.5 + 4.0 / 128, 128),
    "adamw-fp8": ("AdamWFp8", 1.0 + 4.0 / 256, 256),
}

_DESCRIPTIONS = {
    "adamw8bit-torchao": ("AdamW with block-wise 8-bit moments (torchao; DTensor-aware state)",
                          "Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization (arXiv 2110.02861)",
                          ("adamw-8bit-torchao", "torchao-adamw8bit")),
    "adamw4bit": ("AdamW with block-wise 4-bit moments (torchao; DTensor-aware state)",
                  "Li et al. 2023, Memory Efficient Optimizers with 4-bit States (arXiv 2309.01507)",
                  ("adamw4bit-torchao", "adamw-4bit")),
    "adamw-fp8": ("AdamW with block-scaled FP8 (e4m3) moments (torchao; DTensor-aware state)",
                  "torchao AdamWFp8 (FP8 e4m3 optimizer state with per-block scales)",
                  ("adamw-fp8-torchao", "adamwfp8")),
}


def quantized_if(block_size: int):
    """torchao's rule for which tensors get quantised state: ``numel >= 4096`` and divisible by the block."""

    def rule(shape: tuple[int, ...]) -> bool:
        n = math.prod(shape) if shape else 1
        return n >= 4096 and n % block_size == 0

    return rule


def _make(name: str, cls_name: str, bytes_per_element: float, block_size: int) -> OptimizerSpec:
    description, paper, aliases = _DESCRIPTIONS[name]

    def factory(params: list[dict[str, Any]], **hp: Any):
        import torchao.optim  # ImportError → the registry names the extra

        return getattr(torchao.optim, cls_name)(params, **hp)

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = f"torchao.optim.{cls_name} with this package's AdamW defaults."
    return OptimizerSpec(
        name=name,
        factory=factory,
        quantized_if=quantized_if(block_size),  # read by the memory estimator
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                  "block_size": block_size, "bf16_stochastic_round": False},
        state=StateLayout(2, names=("exp_avg", "exp_avg_sq"), bytes_per_element=bytes_per_element),
        paper=paper,
        reference=f"pytorch/ao torchao.optim.{cls_name}",
        description=description,
        aliases=aliases,
        requires="torchao",
    )


#: the records :mod:`lightning_optim.builtins` lists (this module knows nothing of the registry)
SPECS = tuple(_make(_name, _cls, _bytes, _block) for _name, (_cls, _bytes, _block) in TORCHAO_OPTIMIZERS.items())

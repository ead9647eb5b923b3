"""Decoder-only language models (GPT-2 and Llama-style), their presets, and the Lightning wrapper.

``build_model(preset, arch)`` gives a plain ``nn.Module``; ``LanguageModel`` is the LightningModule the
recipes train (it imports Lightning, so it loads lazily).
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_optim.models.gpt import (
    ARCHS,
    PRESETS,
    Block,
    ModelConfig,
    Transformer,
    build_model,
    count_parameters,
    flops_per_token,
    model_config,
)

_LAZY = {"LanguageModel": "lightning_optim.models.module"}
#: old names kept for one release; the module named warns (TokenThroughput is a callback: lightning_optim.callbacks)
_DEPRECATED = {"TokenThroughput": "lightning_optim.models.throughput"}

__all__ = ["ARCHS", "PRESETS", "Block", "ModelConfig", "Transformer", "build_model", "count_parameters",
           "flops_per_token", "model_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY or name in _DEPRECATED:
        return getattr(importlib.import_module({**_LAZY, **_DEPRECATED}[name]), name)
    raise AttributeError(f"module 'lightning_optim.models' has no attribute {name!r}")

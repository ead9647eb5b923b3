"""Small protocols a LightningModule implements so optimizers and callbacks can reach its logits.

``ZLoss`` hooks the module returned by ``output_head()`` (the layer whose output is the logits);
Sophia-G's Gauss–Newton–Bartlett pass calls ``logits_for_batch(batch)`` for a forward pass with autograd
and samples labels from those logits. The models in :mod:`lightning_optim.models` implement both::

    class MyLM(OptimizerMixin, L.LightningModule):
        def output_head(self) -> nn.Module:
            return self.lm_head
        def logits_for_batch(self, batch) -> torch.Tensor:
            inputs, _targets = batch
            return self(inputs)            # (batch, seq, vocab), with grad
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["LogitsModel", "find_output_head"]


@runtime_checkable
class LogitsModel(Protocol):
    def output_head(self) -> nn.Module: ...

    def logits_for_batch(self, batch: Any) -> torch.Tensor: ...


def find_output_head(module: nn.Module) -> nn.Module:
    """The output head: ``module.output_head()`` if provided, else a child named lm_head / output / head."""
    if isinstance(module, LogitsModel) or hasattr(module, "output_head"):
        return module.output_head()
    for name in ("lm_head", "output", "head"):
        for mod_name, mod in module.named_modules():
            if mod_name.split(".")[-1] == name:
                return mod
    raise ValueError(
        f"{type(module).__name__} has no output head: implement output_head() (see lightning_optim.protocols) "
        "or name the layer lm_head"
    )

"""The gradient norms of the optimizer step that is running, computed once and shared by the callbacks.

``NonFiniteGuard`` (is ``Σ‖g‖²`` finite?), ``LossSpikeDetector(monitor_grad_norm=True)`` (z-score of ``‖g‖``)
and ``GradientClipping`` (the clip coefficient) all need the global gradient norm of the same step. Each used to
compute it: a ``torch._foreach_norm`` pass over every gradient (and, for sharded parameters, an ``all_reduce``)
per callback. :class:`StepGradNorms` computes it once per step and hands the same device tensors to all of them:

- :meth:`StepGradNorms.before_clipping` — the norm of the gradients as the first of these callbacks saw them
  (before any clipping, whatever the order of the callbacks);
- :meth:`StepGradNorms.squared` — the per-gradient squared norms of the gradients *as they are now*: if a
  gradient was replaced or modified in place since it was measured (tracked by tensor identity and autograd's
  version counter, ``Tensor._version``) it is measured again, unless the change was declared with
  :meth:`StepGradNorms.rescaled` (the clipping callback scales in place and knows the new norms:
  ``‖c·g‖² = c²‖g‖²``).

The squared norms are global: one ``torch._foreach_norm`` per (device, dtype) bucket over the local gradients
(DTensor shards, FSDP1 flat shards), then at most one ``all_reduce`` that sums the sharded entries
(:func:`~lightning_optim.callbacks._norms.reduce_squared`). Nothing here reads a value on the host.

The cache belongs to one optimizer step: it is dropped by a step post-hook on the optimizer, by
:meth:`StepGradNorms.clear` (the callbacks call it from ``on_train_batch_end``, for steps that never ran), and
when ``trainer.global_step`` moves. It holds only weak references to the gradients.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from lightning_optim.callbacks._norms import is_fsdp1, local, reduce_squared, squared_norms

__all__ = ["StepGradNorms", "step_grads"]


def step_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients the optimizer is about to use, in parameter-group order (parameters without one skipped)."""
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


class StepGradNorms:
    """Per-optimizer cache of the running step's squared gradient norms (see the module docstring)."""

    _by_optimizer: "weakref.WeakKeyDictionary[torch.optim.Optimizer, StepGradNorms]" = weakref.WeakKeyDictionary()

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)  # the cache is a value of a WeakKeyDictionary keyed on it
        self._handle = optimizer.register_step_post_hook(lambda *_: self.clear())
        self.clear()

    @classmethod
    def of(cls, trainer: Any, optimizer: torch.optim.Optimizer) -> "StepGradNorms":
        """The cache of ``optimizer``, emptied if ``trainer.global_step`` moved since it was filled."""
        entry = cls._by_optimizer.get(optimizer)
        if entry is None:
            entry = cls._by_optimizer[optimizer] = cls(optimizer)
        step = getattr(trainer, "global_step", None)
        if entry._step != step:
            entry.clear()
            entry._step = step
        entry._sharded_plain = is_fsdp1(trainer)
        return entry

    @classmethod
    def clear_all(cls, optimizers: "list[torch.optim.Optimizer]") -> None:
        for opt in optimizers:
            entry = cls._by_optimizer.get(opt)
            if entry is not None:
                entry.clear()

    def clear(self) -> None:
        self._step: Any = None
        self._first_sq: Tensor | None = None
        self._sq: Tensor | None = None
        self._signature: list[tuple[weakref.ref, int]] = []
        self._sharded_plain = False

    # ---------------------------------------------------------------- queries
    def squared(self, grads: list[Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
        """``(grads, sq)``: the gradients and their global squared norms (float32 vector on device), valid now."""
        grads = step_grads(self._optimizer()) if grads is None else grads
        if self._sq is None or not self._matches(grads):
            self._sq = self._measure(grads)
            self._signature = self._sign(grads)
            if self._first_sq is None:
                self._first_sq = self._sq
        return grads, self._sq

    def before_clipping(self) -> Tensor:
        """The global norm (0-d float32 on device) of the gradients as first measured in this step."""
        if self._first_sq is None:
            self.squared()
        return self._first_sq.sum().sqrt()

    def before_clipping_squared(self) -> Tensor:
        """``Σ‖g‖²`` (0-d float32 on device) of the gradients as first measured in this step."""
        if self._first_sq is None:
            self.squared()
        return self._first_sq.sum()

    def rescaled(self, grads: list[Tensor], sq: Tensor) -> None:
        """Declare that the caller changed ``grads`` in place and that ``sq`` are their new squared norms."""
        self._sq = sq
        self._signature = self._sign(grads)

    # ---------------------------------------------------------------- internals
    def _measure(self, grads: list[Tensor]) -> Tensor:
        if not grads:
            return torch.zeros(0)
        return reduce_squared(squared_norms(grads), grads, sharded_plain=self._sharded_plain)

    @staticmethod
    def _sign(grads: list[Tensor]) -> list[tuple[weakref.ref, int]]:
        return [(weakref.ref(g), local(g)._version) for g in grads]

    def _matches(self, grads: list[Tensor]) -> bool:
        sig = self._signature
        if len(sig) != len(grads):
            return False
        return all(ref() is g and local(g)._version == version for (ref, version), g in zip(sig, grads))

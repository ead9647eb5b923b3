"""Shared machinery for callbacks that drop an optimizer step or roll training back.

How a step is dropped, for any optimizer
----------------------------------------
Lightning calls ``on_before_optimizer_step`` from inside ``optimizer.step(closure)`` (the closure runs the
forward and backward, then the hook), so a callback cannot stop the step from running. Zeroing the gradients
is not a skip either: Adam's moments still decay, weight decay still shrinks the weights, step counters move,
and ``0·NaN = NaN`` still poisons the state. :class:`StepGate` makes the step a no-op instead:

1. when a callback decides to drop the step (the decision already reduced across ranks, see
   :mod:`~lightning_optim.callbacks._loss_watch`), the gate copies the
   optimizer's parameters, every tensor in ``optimizer.state`` and the non-tensor group hyperparameters (the
   local shard for FSDP2 ``DTensor`` parameters and state), then replaces the gradients with zeros so that the
   optimizer's arithmetic stays finite (some optimizers raise on NaN input, e.g. eigendecompositions);
2. a post-step hook registered on the optimizer (``register_step_post_hook``) copies everything back in place
   and removes any state the step created, then runs the actions queued with the drop (a rollback).

The result is bitwise the pre-step state, whatever the optimizer keeps (hybrid Muon+AdamW, schedule-free
``z``/``x`` buffers, per-group counters). The copy is taken only on dropped steps (rare), by default on the CPU
so that a spike never costs GPU memory. If the step never runs (a ``GradScaler`` skipping an inf step), the
callbacks call :meth:`StepGate.finish_all` from ``on_train_batch_end`` and the restore happens there.

Rollback
--------
:class:`Snapshot` is a CPU copy of the parameters, optimizer state and group hyperparameters that can be restored
in place; :func:`scale_peak_lr` lowers the peak lr of every scheduler (``base_lrs``) and the current group lrs.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_optim.callbacks._norms import local

__all__ = ["StepGate", "Snapshot", "TrainingUnstableError", "scale_peak_lr", "find_callback"]


class TrainingUnstableError(RuntimeError):
    """Raised when a stability callback gives up (too many non-finite steps, spikes or rollbacks)."""


def find_callback(trainer: Any, cls_name: str) -> Any:
    for cb in getattr(trainer, "callbacks", []):
        if type(cb).__name__ == cls_name:
            return cb
    return None


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


class Snapshot:
    """A copy of an optimizer's parameters, state and group hyperparameters, restorable in place.

    ``device="cpu"`` keeps it off the accelerator; ``None`` keeps each tensor on its own device. For ``DTensor``
    parameters and state the local shard is copied, so each rank restores its own shard.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: str | torch.device | None = "cpu",
                 extra: list[Tensor] | None = None) -> None:
        self.optimizer = optimizer
        params = _params(optimizer)
        with torch.no_grad():
            self.params = [self._copy(p, device) for p in params]
            self.extra = [self._copy(t, device) for t in (extra or [])]
            self.state: dict[int, dict[str, Any]] = {}
            index = {id(p): i for i, p in enumerate(params)}
            for p, st in optimizer.state.items():
                if id(p) not in index:
                    continue
                self.state[index[id(p)]] = {
                    k: (self._copy(v, device) if isinstance(v, Tensor) else copy.deepcopy(v)) for k, v in st.items()
                }
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    @staticmethod
    def _copy(t: Tensor, device) -> Tensor:
        src = local(t.detach())
        return src.to(device, copy=True) if device is not None else src.clone()

    @staticmethod
    def _put(dst: Tensor, src: Tensor) -> Tensor:
        target = local(dst)
        if target.shape == src.shape and target.dtype == src.dtype:
            target.copy_(src, non_blocking=False)
            return dst
        return src.to(target.device, copy=True)  # shape changed (lazy state): replace

    def restore(self, extra: list[Tensor] | None = None) -> None:
        opt = self.optimizer
        params = _params(opt)
        if len(params) != len(self.params):
            raise RuntimeError("the optimizer's parameters changed since the snapshot was taken")
        with torch.no_grad():
            for p, saved in zip(params, self.params):
                local(p.detach()).copy_(saved)
            for t, saved in zip(extra or [], self.extra):
                local(t.detach()).copy_(saved)
            for i, p in enumerate(params):
                saved = self.state.get(i)
                if saved is None:
                    opt.state.pop(p, None)
                    continue
                current = opt.state.get(p)
                if current is None or not isinstance(current, dict):
                    current = {}
                for k in [k for k in current if k not in saved]:
                    del current[k]
                for k, v in saved.items():
                    if isinstance(v, Tensor):
                        old = current.get(k)
                        if isinstance(old, Tensor):
                            current[k] = self._put(old, v)
                        else:  # state created later (or a DTensor that no longer exists): plain copy
                            current[k] = v.to(local(p).device, copy=True)
                    else:
                        current[k] = copy.deepcopy(v)
                opt.state[p] = current
        for g, saved in zip(opt.param_groups, self.groups):
            for k in [k for k in g if k != "params" and k not in saved]:
                del g[k]
            for k, v in saved.items():
                old = g.get(k)
                if isinstance(old, Tensor) and isinstance(v, Tensor) and old.shape == v.shape:
                    old.copy_(v)
                else:
                    g[k] = copy.deepcopy(v)


class StepGate:
    """Turns the optimizer step that is running into a no-op (see the module docstring). One per optimizer."""

    _gates: "weakref.WeakKeyDictionary[torch.optim.Optimizer, StepGate]" = weakref.WeakKeyDictionary()

    def __init__(self, optimizer: torch.optim.Optimizer, device: str | torch.device | None = "cpu") -> None:
        self._optimizer = weakref.ref(optimizer)  # the gate is a value of a WeakKeyDictionary keyed on it
        self.device = device
        self._snapshot: Snapshot | None = None
        self._after: list[Callable[[], None]] = []
        self.dropped_steps = 0
        self._handle = optimizer.register_step_post_hook(self._post_step)

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, device: str | torch.device | None = "cpu") -> "StepGate":
        gate = cls._gates.get(optimizer)
        if gate is None:
            gate = cls._gates[optimizer] = cls(optimizer, device)
        return gate

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer()

    @classmethod
    def get(cls, optimizer: torch.optim.Optimizer) -> "StepGate | None":
        """The gate of ``optimizer`` if one was created (no gate is created here)."""
        return cls._gates.get(optimizer)

    @classmethod
    def dropping(cls, optimizer: torch.optim.Optimizer) -> bool:
        """True while a drop of ``optimizer``'s running step is pending (some callback already dropped it)."""
        gate = cls._gates.get(optimizer)
        return gate is not None and gate.armed

    @classmethod
    def finish_all(cls, optimizers: "list[torch.optim.Optimizer]") -> None:
        """Finish every pending drop of these optimizers: restore now if the step did not run (a GradScaler
        skipped it) or will not run (a callback is about to raise inside the closure)."""
        for opt in optimizers:
            gate = cls._gates.get(opt)
            if gate is not None and gate.armed:
                gate.finish()

    @property
    def armed(self) -> bool:
        """A drop is pending: the pre-step copy is held and will be restored after the step."""
        return self._snapshot is not None

    def drop(self, then: Callable[[], None] | None = None) -> None:
        """Drop the step now running; ``then`` runs after the pre-step state is back (e.g. a rollback)."""
        if self._snapshot is None:
            self._snapshot = Snapshot(self.optimizer, self.device)
            grads = [local(p.grad) for p in _params(self.optimizer) if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        if then is not None:
            self._after.append(then)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.finish()

    def finish(self) -> None:
        """Restore the pre-step state if a drop is pending, then run the queued actions."""
        if self._snapshot is None:
            return
        snapshot, self._snapshot = self._snapshot, None
        snapshot.restore()
        self.dropped_steps += 1
        after, self._after = self._after, []
        for fn in after:
            fn()

    def remove(self) -> None:
        self._handle.remove()
        optimizer = self.optimizer
        if optimizer is not None:
            StepGate._gates.pop(optimizer, None)


def scale_peak_lr(trainer: Any, factor: float) -> None:
    """Multiply the peak lr of every scheduler (``base_lrs``) and every group's current lr by ``factor``."""
    seen: set[int] = set()
    for config in getattr(trainer, "lr_scheduler_configs", []):
        sched = config.scheduler
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [b * factor for b in sched.base_lrs]
        opt = getattr(sched, "optimizer", None)
        if opt is not None:
            seen.add(id(opt))
            _scale_groups(opt, factor)
            if hasattr(sched, "_last_lr"):
                sched._last_lr = [g["lr"] for g in opt.param_groups]
    for opt in getattr(trainer, "optimizers", []):
        if id(opt) not in seen:
            _scale_groups(opt, factor)


def _scale_groups(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in g:
                if isinstance(g[key], Tensor):
                    g[key].mul_(factor)
                else:
                    g[key] = g[key] * factor

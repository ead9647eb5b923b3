"""Base class of the callbacks that watch the training loss and may drop the optimizer step.

:class:`LossWatch` is what ``NonFiniteGuard`` and ``LossSpikeDetector`` share:

- the loss of the step: the training loss of every micro-batch, detached and summed on device in
  ``on_before_backward`` (no host read);
- **one decision round per optimizer step for all of them** (:class:`DecisionRound`): at the first
  ``on_before_optimizer_step`` of any enabled watcher, every enabled watcher in ``trainer.callbacks`` puts its
  device terms in two vectors: *flags* (0/1 per rank, summed over the ranks so that a condition on any rank holds
  on all) and *local values* (this rank's loss, the gradient norm). The flags are reduced with one
  ``all_reduce`` (only when there is more than one process), and flags and values come to the host with one
  ``tolist()`` — **one host sync per step for all watchers together**, instead of one per callback. The gradient
  norms come from :class:`~lightning_optim.callbacks._step_norms.StepGradNorms`, shared with
  ``GradientClipping`` (one ``torch._foreach_norm`` pass per step);
- **one owner per event**: watchers decide in ``priority`` order (lower first; ``NonFiniteGuard`` 0,
  ``LossSpikeDetector`` 10) whatever their order in the callback list. A step that a watcher claims (will drop)
  is not seen by the watchers after it: :attr:`Verdict.claimed_by` names the claimant, and the later watcher
  neither acts nor records the step. A step another callback already dropped through the
  :class:`~lightning_optim.callbacks._decisions.StepGate` (``StepGate.dropping``) is ignored the same way;
- the end of the step: ``on_train_batch_end`` finishes pending drops whose step never ran (a GradScaler skipped
  it) and empties the per-step caches;
- counters logged every step as device tensors refreshed only when they change (logging a Python number
  through ``pl_module.log`` copies it to the device, which on CUDA waits for the stream: a sync per step).

A disabled watcher (``enabled=False``) does nothing in any hook and takes no part in the round.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_optim.callbacks._decisions import StepGate
from lightning_optim.callbacks._step_norms import StepGradNorms

__all__ = ["LossWatch", "DecisionRound", "Terms", "Verdict"]


@dataclass
class Terms:
    """What one watcher contributes to the round: device 0-d tensors (any float dtype, any device)."""

    flags: list[Tensor] = field(default_factory=list)   # summed over ranks: > 0 means "on at least one rank"
    values: list[Tensor] = field(default_factory=list)  # this rank's values, not reduced
    extra: dict[str, Any] = field(default_factory=dict)  # anything the watcher wants back with its verdict


@dataclass
class Verdict:
    """One watcher's results of the round, on the host."""

    flags: list[float]
    values: list[float]
    extra: dict[str, Any]
    claimed_by: "LossWatch | None" = None  # a watcher deciding before this one drops the step


class LossWatch(Callback):
    """Accumulates the step's loss on device and takes part in the shared decision round (module docstring).

    Subclasses implement :meth:`step_terms` (device tensors only, no host reads), :meth:`claims` (from the
    verdict: will this watcher drop the step?) and :meth:`on_verdict` (act on it), and may override
    :meth:`after_batch`.
    """

    priority: int = 100

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self._loss: Tensor | None = None
        self._logged: dict[str, tuple[float, Tensor]] = {}

    # ---------------------------------------------------------------- subclass API
    def step_terms(self, trainer: Any, optimizer: torch.optim.Optimizer, norms: StepGradNorms) -> Terms | None:
        raise NotImplementedError

    def claims(self, verdict: Verdict) -> bool:
        """Whether this watcher will drop the step given its verdict (``verdict.claimed_by`` is already set)."""
        return False

    def on_verdict(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer, verdict: Verdict) -> None:
        raise NotImplementedError

    def after_batch(self, trainer: Any, pl_module: Any) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    def take_loss(self) -> Tensor | None:
        """The summed loss of the step's micro-batches (0-d float32 on device), and reset the sum."""
        loss, self._loss = self._loss, None
        return None if loss is None else loss.reshape(())

    def log_count(self, pl_module: Any, name: str, value: float) -> None:
        """Log a counter every step without a host-to-device copy per step (one only when it changes)."""
        cached = self._logged.get(name)
        if cached is None or cached[0] != value:
            cached = (value, torch.tensor(float(value), device=pl_module.device))
            self._logged[name] = cached
        pl_module.log(name, cached[1], on_step=True, on_epoch=False)

    # ---------------------------------------------------------------- hooks
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if not self.enabled:
            return
        value = loss.detach().float()
        self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if not self.enabled:
            return
        verdict = DecisionRound.for_step(trainer, optimizer).verdict(self, trainer, optimizer)
        if verdict is not None:
            self.on_verdict(trainer, pl_module, optimizer, verdict)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        optimizers = list(getattr(trainer, "optimizers", []))
        StepGate.finish_all(optimizers)  # the step never ran (e.g. GradScaler skipped it): restore here
        DecisionRound.clear_all(optimizers)
        StepGradNorms.clear_all(optimizers)
        self.after_batch(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release(trainer)

    def _release(self, trainer: Any) -> None:
        """Drop the per-step caches (a verdict names its watchers; nothing outlives the run)."""
        self._loss = None
        optimizers = list(getattr(trainer, "optimizers", []))
        DecisionRound.clear_all(optimizers)
        StepGradNorms.clear_all(optimizers)


class DecisionRound:
    """The decisions of all enabled watchers for one optimizer step, with one reduce and one host sync."""

    _by_optimizer: "weakref.WeakKeyDictionary[torch.optim.Optimizer, DecisionRound]" = weakref.WeakKeyDictionary()

    def __init__(self, step: Any) -> None:
        self.step = step
        self.verdicts: dict[int, Verdict | None] = {}

    @classmethod
    def for_step(cls, trainer: Any, optimizer: torch.optim.Optimizer) -> "DecisionRound":
        step = getattr(trainer, "global_step", None)
        current = cls._by_optimizer.get(optimizer)
        if current is None or current.step != step:
            current = cls(step)
            current._run(trainer, optimizer, _watchers(trainer))
            cls._by_optimizer[optimizer] = current
        return current

    @classmethod
    def clear_all(cls, optimizers: "list[torch.optim.Optimizer]") -> None:
        for opt in optimizers:
            cls._by_optimizer.pop(opt, None)

    def verdict(self, watcher: LossWatch, trainer: Any, optimizer: torch.optim.Optimizer) -> Verdict | None:
        if id(watcher) not in self.verdicts:  # a watcher not in trainer.callbacks: a round of its own
            self._run(trainer, optimizer, [watcher])
        return self.verdicts[id(watcher)]

    def _run(self, trainer: Any, optimizer: torch.optim.Optimizer, watchers: list[LossWatch]) -> None:
        norms = StepGradNorms.of(trainer, optimizer)
        terms = [(w, w.step_terms(trainer, optimizer, norms)) for w in watchers]
        flags = [t for _, ts in terms if ts is not None for t in ts.flags]
        values = [t for _, ts in terms if ts is not None for t in ts.values]
        host_flags: list[float] = []
        host_values: list[float] = []
        if flags or values:
            device = _device(trainer, flags + values)
            flag_vec = torch.stack([f.reshape(()).to(device, torch.float32) for f in flags]) if flags else None
            if flag_vec is not None and getattr(trainer, "world_size", 1) > 1:
                flag_vec = trainer.strategy.reduce(flag_vec, reduce_op="sum")
            parts = ([flag_vec] if flag_vec is not None else []) + (
                [torch.stack([v.reshape(()).to(device, torch.float32) for v in values])] if values else [])
            host = torch.cat(parts).tolist()  # the one host sync of the step
            host_flags, host_values = host[:len(flags)], host[len(flags):]
        fi = vi = 0
        ordered: list[tuple[LossWatch, Verdict | None]] = []
        for watcher, ts in terms:
            if ts is None:
                ordered.append((watcher, None))
                continue
            v = Verdict(host_flags[fi:fi + len(ts.flags)], host_values[vi:vi + len(ts.values)], ts.extra)
            fi, vi = fi + len(ts.flags), vi + len(ts.values)
            ordered.append((watcher, v))
        # ownership: decide in priority order; the first watcher that claims the step owns it
        owner: LossWatch | None = None
        for watcher, v in sorted(ordered, key=lambda wv: wv[0].priority):
            if v is not None:
                v.claimed_by = owner
                if owner is None and watcher.claims(v):
                    owner = watcher
            self.verdicts[id(watcher)] = v


def _watchers(trainer: Any) -> list[LossWatch]:
    return [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, LossWatch) and cb.enabled]


def _device(trainer: Any, tensors: list[Tensor]) -> torch.device:
    strategy = getattr(trainer, "strategy", None)
    root = getattr(strategy, "root_device", None)
    return root if isinstance(root, torch.device) else tensors[0].device

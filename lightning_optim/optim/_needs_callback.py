"""Optimizers that a Lightning run must pair with a callback, and the check that the callback is there.

Sophia-G needs :class:`~lightning_optim.callbacks.SophiaHessian` (its Hessian estimate stays 0 without it) and
the schedule-free optimizers need :class:`~lightning_optim.callbacks.ScheduleFreeSwitch` (without it validation
and checkpoints see ``y`` instead of the average ``x``). Neither fails by itself, so a run built without the
callback (LightningCLI's ``--optimizer``, a hand-written ``configure_optimizers``) would train wrongly in silence.

The handshake: the callback calls :func:`mark_driven` on every optimizer it serves in ``on_fit_start`` (after
Lightning has built the optimizers, before the first batch). At its first ``step()`` the optimizer calls
:func:`require_callback`, which raises ``RuntimeError`` naming the optimizer and the callback to add when the
step is taken inside a Lightning Trainer and nothing marked it. "Inside a Trainer" is decided once, at the
first step, from the call stack: a frame of ``lightning.pytorch.loops`` (or ``pytorch_lightning.loops``) is
below every optimizer step a Trainer takes, automatic or manual optimization, whatever the strategy. A plain
PyTorch loop or Lightning Fabric (``lightning.fabric``) has no such frame and is not checked here: there the
user drives the optimizer (``update_hessian``; ``train()`` / ``eval()``).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["mark_driven", "is_driven", "inside_lightning_trainer", "require_callback"]

_DRIVEN_BY = "_lightning_optim_driven_by"  # instance attribute: the callback's class name
_CHECKED = "_lightning_optim_callback_checked"  # instance attribute: the first-step check has run
_TRAINER_LOOP_MODULES = ("lightning.pytorch.loops", "pytorch_lightning.loops")


def mark_driven(optimizer: Any, callback_name: str) -> None:
    """Record that ``callback_name`` drives ``optimizer`` in this run (a ``LightningOptimizer`` is unwrapped)."""
    setattr(getattr(optimizer, "optimizer", optimizer), _DRIVEN_BY, callback_name)


def is_driven(optimizer: Any) -> bool:
    """Whether a callback has marked ``optimizer`` with :func:`mark_driven`."""
    return getattr(optimizer, _DRIVEN_BY, None) is not None


def inside_lightning_trainer() -> bool:
    """Whether the caller runs under a Lightning Trainer's loop (a frame of ``lightning.pytorch.loops``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_TRAINER_LOOP_MODULES):
            return True
        frame = frame.f_back
    return False


def require_callback(optimizer: Any, callback: str, why: str) -> None:
    """At ``optimizer``'s first step: raise if it runs in a Lightning Trainer without ``callback``.

    ``callback`` is the class path to add (``lightning_optim.callbacks.SophiaHessian``), ``why`` what goes
    wrong without it. Runs once per optimizer object; later steps cost one attribute lookup."""
    if getattr(optimizer, _CHECKED, False):
        return
    if not is_driven(optimizer) and inside_lightning_trainer():
        name = callback.rsplit(".", 1)[-1]
        raise RuntimeError(
            f"{type(optimizer).__name__} is stepped inside a Lightning Trainer without the {name} callback: "
            f"{why}. Add it: Trainer(callbacks=[{callback}()]) (LightningCLI: --trainer.callbacks+={callback}), "
            f"or build the optimizer through lightning_optim.OptimizerMixin, which adds it by itself"
        )
    setattr(optimizer, _CHECKED, True)

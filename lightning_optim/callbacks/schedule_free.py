"""``ScheduleFreeSwitch``: keep a schedule-free optimizer in the right mode through a Lightning run.

Schedule-free optimizers (``sf-adamw``, ``sf-normuon``) take gradients at ``y`` but their good weights are
the average ``x``; the parameter holds one or the other (``optimizer.train()`` → y, ``optimizer.eval()`` → x).
Lightning never calls these. This callback does, for *every* optimizer in ``trainer.optimizers`` that has
``train()`` and ``eval()`` methods:

* ``on_train_batch_start``: ``train()`` — every gradient is taken at y, including the first after a
  validation;
* ``on_validation_start`` / ``on_test_start`` / ``on_predict_start``: ``eval()`` — evaluation sees x;
* every checkpoint (epoch-end, step-interval, ``trainer.save_checkpoint``, on exception) stores x:
  Lightning collects the weights *before* ``on_save_checkpoint`` runs (and holds references to the live
  parameters until the file is written), so the callback wraps this trainer's ``save_checkpoint`` (which
  every ``ModelCheckpoint`` and ``OnExceptionCheckpoint`` save goes through) and switches to eval before
  the save. Should the method be missing, it falls back to switching to eval at every
  ``on_train_batch_end`` (it runs before ``ModelCheckpoint``'s, which Lightning orders last). With an
  asynchronous ``CheckpointIO`` the write may outlive the call: use a synchronous one with schedule-free;
* after a save the optimizer *stays* in eval mode (the parameters hold the x just written) until the next
  training batch starts, unless the save happened inside a training batch (between ``on_train_batch_start``
  and this callback's ``on_train_batch_end``, e.g. a user's save in ``on_before_optimizer_step`` or
  ``OnExceptionCheckpoint`` after a failing step), where it switches back to train at once since that
  batch's gradient is taken at y: such a file holds x too, but a resume from it is not promised to be
  bit-exact (``ModelCheckpoint`` never saves there);
* ``on_train_end``: ``eval()``, so the model left after ``fit`` holds x.

**Resume is bit-exact.** The two maps ``y → x`` and ``x → y`` are inverse only in exact arithmetic: in floating
point ``train(eval(y))`` can differ from ``y`` in the last bit, so a run matches its resumed twin only if both
see the same switches after the checkpoint was written. A resumed run starts from the file's x in eval mode
and switches to train once, at its first batch. Staying in eval after the save makes the straight run do
exactly that, also when a validation follows the checkpoint on the same step (step-interval checkpoints are
written in ``on_train_batch_end``, before that step's validation, and a resumed run does not repeat that
validation): switching back to train after the save and to eval again for the validation would be one round
trip more than the resumed run makes, and the runs would part in the last bits (seen with validation and
checkpoints both every 500 steps, the recipes' default). The optimizer state (``z``, moments, the clock and
``train_mode``) is saved with the checkpoint, so a resumed run continues bit for bit.

In ``on_fit_start`` the callback marks every optimizer it switches; a schedule-free optimizer stepped in a
Trainer without that mark raises at its first step (:mod:`lightning_optim.optim._needs_callback`).

Usage (the :class:`~lightning_optim.OptimizerMixin` adds it by itself for schedule-free optimizers)::

    trainer = L.Trainer(callbacks=[ScheduleFreeSwitch()])
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_optim.optim._needs_callback import mark_driven

__all__ = ["ScheduleFreeSwitch"]


def _switchable(trainer: "pl.Trainer") -> list[Any]:
    """The trainer's optimizers that have ``train()`` and ``eval()`` (schedulefree's API, no argument)."""
    return [o for o in getattr(trainer, "optimizers", []) or []
            if callable(getattr(o, "train", None)) and callable(getattr(o, "eval", None))]


class ScheduleFreeSwitch(pl.Callback):
    """Train mode (y) for every gradient; eval mode (x) for validation, test, predict and checkpoints."""

    def __init__(self) -> None:
        self._wrapped = False
        self._in_batch = False  # between on_train_batch_start and on_train_batch_end

    # -- modes ---------------------------------------------------------------------------------------------

    @staticmethod
    def _train(trainer: "pl.Trainer") -> None:
        for opt in _switchable(trainer):
            opt.train()

    @staticmethod
    def _eval(trainer: "pl.Trainer") -> None:
        for opt in _switchable(trainer):
            opt.eval()

    # -- checkpoint dump -----------------------------------------------------------------------------------

    def _wrap_dump(self, trainer: "pl.Trainer") -> None:
        original = getattr(trainer, "save_checkpoint", None)
        if original is None:
            return
        if getattr(original, "_schedule_free_wrapped", False):
            self._wrapped = True
            return

        def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
            self._eval(trainer)
            try:
                return original(*args, **kwargs)
            finally:
                if self._in_batch:  # a save inside a training batch: its gradient is still to be taken at y
                    self._train(trainer)

        save_checkpoint._schedule_free_wrapped = True  # type: ignore[attr-defined]
        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        self._wrapped = True

    # -- hooks ---------------------------------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._in_batch = False  # not left over from a run that raised inside a batch
        self._wrap_dump(trainer)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for opt in _switchable(trainer):
            mark_driven(opt, type(self).__name__)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._in_batch = True
        self._train(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._in_batch = False
        if not self._wrapped:  # fallback: be in eval before ModelCheckpoint's step-interval save
            self._eval(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._wrapped:
            self._eval(trainer)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval(trainer)

    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval(trainer)

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._eval(trainer)

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
  every ``ModelCheckpoint`` and ``OnExceptionCheckpoint`` save goes through) to switch to eval around the
  whole save and back afterwards. Should the method be missing, it falls back to switching to eval at every
  ``on_train_batch_end`` (it runs before ``ModelCheckpoint``'s, which Lightning orders last). With an
  asynchronous ``CheckpointIO`` the write may outlive the call: use a synchronous one with schedule-free;
* ``on_train_end``: ``eval()``, so the model left after ``fit`` holds x.

The optimizer state (``z`` and the modes) is saved with the checkpoint, and weights are saved as x with the
optimizer in eval mode, so a resumed run continues bit for bit.

Usage (the :class:`~lightning_optim.OptimizerMixin` adds it by itself for schedule-free optimizers)::

    trainer = L.Trainer(callbacks=[ScheduleFreeSwitch()])
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = ["ScheduleFreeSwitch"]


def _switchable(trainer: "pl.Trainer") -> list[Any]:
    return [o for o in getattr(trainer, "optimizers", []) or []
            if callable(getattr(o, "train", None)) and callable(getattr(o, "eval", None))]


def _in_train_mode(opt: Any) -> bool | None:
    groups = getattr(opt, "param_groups", None) or []
    if groups and "train_mode" in groups[0]:
        return bool(groups[0]["train_mode"])
    mode = getattr(opt, "train_mode", None)
    return bool(mode) if isinstance(mode, bool) else None


class ScheduleFreeSwitch(pl.Callback):
    """Train mode (y) for every gradient; eval mode (x) for validation, test, predict and checkpoints."""

    def __init__(self) -> None:
        self._wrapped = False

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
            opts = _switchable(trainer)
            was_train = [_in_train_mode(o) is not False for o in opts]
            for o in opts:
                o.eval()
            try:
                return original(*args, **kwargs)
            finally:
                for o, was in zip(opts, was_train):
                    if was:
                        o.train()

        save_checkpoint._schedule_free_wrapped = True  # type: ignore[attr-defined]
        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        self._wrapped = True

    # -- hooks ---------------------------------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._wrap_dump(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._train(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
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

"""``StepProgressBar``: a progress bar that counts optimizer steps against ``max_steps``.

Lightning's ``TQDMProgressBar`` counts micro-batches of the current epoch, so with gradient accumulation a
run of ``max_steps=3`` shows ``6/3``, and with the endless streams of pretraining (``max_epochs=-1``) the
description reads ``Epoch 0/-2``. This bar shows ``step 3/3`` instead: ``n`` is ``trainer.global_step`` and the
total is ``trainer.max_steps`` (or the Trainer's estimate when there is no ``max_steps``).

Usage::

    trainer = L.Trainer(max_steps=1000, callbacks=[StepProgressBar()])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepProgressBar"]


class StepProgressBar(TQDMProgressBar):
    """TQDM bar in optimizer steps (see the module docstring)."""

    def _total_steps(self, trainer: Any) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # an endless loader with no max_steps
            return None
        return None if total == float("inf") else int(total)

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(self._total_steps(trainer))
        bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if step != bar.n and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
        if self._leave:
            bar.close()

"""NonFiniteGuard: a NaN or inf loss or gradient never reaches the weights or the optimizer state.

Example::

    from lightning_optim.callbacks import NonFiniteGuard

    trainer = L.Trainer(callbacks=[NonFiniteGuard(max_consecutive=5)])
    trainer.fit(model)
    # a step whose loss or gradients are not finite on any rank is dropped on every rank; after 5 such steps
    # in a row training stops with TrainingUnstableError and the checkpoints already written stay as they are

How it works: the training loss of each micro-batch is summed on device in ``on_before_backward``; in
``on_before_optimizer_step`` the guard forms one flag ``not isfinite(loss) or not isfinite(Σ‖g‖²)`` from a
``torch._foreach_norm`` over the (local) gradients, reduces it across ranks (one all-reduce, one host sync:
true on every rank if it is true on any), and when set drops the step through
:class:`~lightning_optim.callbacks._decisions.StepGate`: the optimizer's parameters and state are copied, the
gradients zeroed so the optimizer's arithmetic stays finite, and everything is copied back right after the step.
This works for every optimizer (torch, registry, hybrid, schedule-free, DTensor shards) because nothing is
assumed about what the optimizer does with the gradient. ``global_step`` and the data iterator move on, so the
offending batch is not seen again. A finite-but-huge gradient whose squared norm overflows float32 counts as
non-finite.

Logged (rank zero, through ``pl_module.log``): ``stability/nonfinite_steps`` (total dropped so far).
``state_dict`` keeps the counters so a resumed run continues the count.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_optim.callbacks._decisions import StepGate, TrainingUnstableError, any_rank
from lightning_optim.callbacks._norms import squared_norms

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard(Callback):
    """Drop any step with a non-finite loss or gradient on every rank; stop after too many in a row.

    Args:
        max_consecutive: stop after this many non-finite steps in a row.
        check_grads: also check the gradients (one foreach norm over them); ``False`` checks the loss only.
        on_give_up: ``"raise"`` (default; :class:`TrainingUnstableError`, nonzero exit, no further checkpoint)
            or ``"stop"`` (``trainer.should_stop``; Lightning ends the epoch normally).
        snapshot_device: where the copy taken on a dropped step lives (``"cpu"``; ``None``: beside the tensors).
    """

    def __init__(self, max_consecutive: int = 5, check_grads: bool = True, on_give_up: str = "raise",
                 snapshot_device: str | None = "cpu") -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if on_give_up not in ("raise", "stop"):
            raise ValueError(f"on_give_up must be 'raise' or 'stop', got {on_give_up!r}")
        self.max_consecutive = max_consecutive
        self.check_grads = check_grads
        self.on_give_up = on_give_up
        self.snapshot_device = snapshot_device
        self.consecutive = 0
        self.total = 0
        self._loss: torch.Tensor | None = None
        self.stop_reason: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.total = int(state_dict.get("total", 0))

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        bad = torch.zeros((), dtype=torch.bool)
        if self._loss is not None:
            bad = ~torch.isfinite(self._loss)
        self._loss = None
        if self.check_grads:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                sq = squared_norms(grads).sum()
                bad = bad.to(sq.device) | ~torch.isfinite(sq)
        if not any_rank(trainer, bad):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        StepGate.of(optimizer, self.snapshot_device).drop()
        step = trainer.global_step
        rank_zero_warn(
            f"NonFiniteGuard: non-finite loss or gradient at step {step}; the step was dropped on every rank "
            f"({self.consecutive} in a row, {self.total} in total)", category=RuntimeWarning,
        )
        if self.consecutive >= self.max_consecutive:
            self._give_up(trainer, step)

    def _give_up(self, trainer: Any, step: int) -> None:
        self.stop_reason = (
            f"NonFiniteGuard: {self.consecutive} consecutive optimizer steps with a non-finite loss or gradient "
            f"(last at step {step}); training stopped. The weights and optimizer state are those before the first "
            "of these steps and the checkpoints already written are untouched. Lower the learning rate, enable "
            "gradient clipping or z-loss, or check the data."
        )
        if self.on_give_up == "raise":
            # the pending drop still restores the state: raising inside the closure aborts optimizer.step, so
            # restore now
            for opt in trainer.optimizers:
                StepGate.of(opt, self.snapshot_device).finish()
            raise TrainingUnstableError(self.stop_reason)
        rank_zero_warn(self.stop_reason, category=RuntimeWarning)
        trainer.should_stop = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for opt in trainer.optimizers:  # the step never ran (e.g. GradScaler skipped it): restore here
            gate = StepGate._gates.get(opt)
            if gate is not None and gate.armed:
                gate.finish()
        if self.total:
            pl_module.log("stability/nonfinite_steps", float(self.total), on_step=True, on_epoch=False)

"""NonFiniteGuard: a NaN or inf loss or gradient never reaches the weights or the optimizer state.

Example::

    from lightning_optim.callbacks import NonFiniteGuard

    trainer = L.Trainer(callbacks=[NonFiniteGuard(max_consecutive=5)])
    trainer.fit(model)
    # a step whose loss or gradients are not finite on any rank is dropped on every rank; after 5 such steps
    # in a row training stops with TrainingUnstableError and the checkpoints already written stay as they are

How it works: the training loss of each micro-batch is summed on device in ``on_before_backward``; in
``on_before_optimizer_step`` the guard forms one device flag ``not isfinite(loss) or not isfinite(Σ‖g‖²)``, where
``Σ‖g‖²`` is the global squared gradient norm of the step shared with ``GradientClipping`` and
``LossSpikeDetector`` (one ``torch._foreach_norm`` pass for all of them,
:mod:`~lightning_optim.callbacks._step_norms`). The flag is summed across ranks and read on the host in the one
decision round of the step that all loss watchers share (one all-reduce, one host sync per step in total,
:mod:`~lightning_optim.callbacks._loss_watch`): true on every rank if it is true on any. When set the step is
dropped through :class:`~lightning_optim.callbacks._decisions.StepGate`: the optimizer's parameters and state are
copied, the gradients zeroed so the optimizer's arithmetic stays finite, and everything is copied back right after
the step. This works for every optimizer (torch, registry, hybrid, schedule-free, DTensor shards) because nothing
is assumed about what the optimizer does with the gradient. ``global_step`` and the data iterator move on, so the
offending batch is not seen again. A finite-but-huge gradient whose squared norm overflows float32 counts as
non-finite.

**A non-finite step belongs to the guard**: it decides first (priority 0), so a ``LossSpikeDetector`` in the same
Trainer, before or after it in the callback list, neither counts such a step as a spike nor puts its loss in its
window, and never rolls back for it.

**Giving up**: after ``max_consecutive`` dropped steps in a row the pending drop is restored at once (the weights
and optimizer state are those before the first of these steps, all finite) and :class:`TrainingUnstableError`
is raised from inside the optimizer step; Lightning re-raises it out of ``trainer.fit`` (after its
``on_exception`` hooks), so a script ends with a traceback and a non-zero exit status, and no checkpoint is
written after the failure.

Logged (rank zero, through ``pl_module.log``): ``stability/nonfinite_steps`` (total dropped so far).
``state_dict`` keeps the counters so a resumed run continues the count. ``enabled=False`` turns every hook into a
no-op (for recipes that add the guard by default).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_optim.callbacks._decisions import StepGate, TrainingUnstableError
from lightning_optim.callbacks._loss_watch import LossWatch, Terms, Verdict
from lightning_optim.callbacks._step_norms import StepGradNorms

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard(LossWatch):
    """Drop any step with a non-finite loss or gradient on every rank; stop after too many in a row.

    Args:
        max_consecutive: stop after this many non-finite steps in a row.
        check_grads: also check the gradients (the shared squared norm of the step); ``False`` checks the loss only.
        on_give_up: ``"raise"`` (default; :class:`TrainingUnstableError`, nonzero exit, no further checkpoint)
            or ``"stop"`` (``trainer.should_stop``; Lightning ends the epoch normally).
        snapshot_device: where the copy taken on a dropped step lives (``"cpu"``; ``None``: beside the tensors).
        enabled: ``False`` makes the callback do nothing at all.
    """

    priority = 0  # a non-finite step belongs to the guard

    def __init__(self, max_consecutive: int = 5, check_grads: bool = True, on_give_up: str = "raise",
                 snapshot_device: str | None = "cpu", enabled: bool = True) -> None:
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuard: max_consecutive must be >= 1, got {max_consecutive}")
        if on_give_up not in ("raise", "stop"):
            raise ValueError(f"NonFiniteGuard: on_give_up must be 'raise' or 'stop', got {on_give_up!r}")
        super().__init__(enabled=enabled)
        self.max_consecutive = max_consecutive
        self.check_grads = check_grads
        self.on_give_up = on_give_up
        self.snapshot_device = snapshot_device
        self.consecutive = 0
        self.total = 0
        self.stop_reason: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.total = int(state_dict.get("total", 0))

    # ---------------------------------------------------------------- the round
    def step_terms(self, trainer: Any, optimizer: torch.optim.Optimizer, norms: StepGradNorms) -> Terms:
        loss = self.take_loss()
        bad = torch.zeros((), dtype=torch.bool) if loss is None else ~torch.isfinite(loss)
        if self.check_grads:
            sq = norms.before_clipping_squared()
            bad = bad.to(sq.device) | ~torch.isfinite(sq)
        return Terms(flags=[bad])

    def claims(self, verdict: Verdict) -> bool:
        return verdict.flags[0] > 0

    def on_verdict(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer, verdict: Verdict) -> None:
        if not self.claims(verdict):
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
            # raising inside the closure aborts optimizer.step before its post-hook: restore the pending drop now
            StepGate.finish_all(list(trainer.optimizers))
            raise TrainingUnstableError(self.stop_reason)
        rank_zero_warn(self.stop_reason, category=RuntimeWarning)
        trainer.should_stop = True

    def after_batch(self, trainer: Any, pl_module: Any) -> None:
        if self.total:
            self.log_count(pl_module, "stability/nonfinite_steps", float(self.total))

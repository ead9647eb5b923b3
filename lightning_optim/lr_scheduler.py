"""``PerStepLR``: the registry's schedules for LightningCLI's own ``--lr_scheduler`` flag.

It lives apart from :mod:`lightning_optim.schedules` because it looks schedules up by name in the registry, and
the registry's table of built-ins imports :mod:`lightning_optim.schedules` (one import direction, no cycle).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_optim.registry import get_scheduler_spec
from lightning_optim.schedules import ScheduledLR

__all__ = ["PerStepLR"]


class PerStepLR(ScheduledLR):
    """A :class:`ScheduledLR` built from plain arguments that steps itself after every optimizer step.

    Made for LightningCLI's own flag, whose ``configure_optimizers`` returns the scheduler with Lightning's
    default ``interval: "epoch"``::

        fit --optimizer AdamW --lr_scheduler lightning_optim.lr_scheduler.PerStepLR \\
            --lr_scheduler.schedule wsd --lr_scheduler.total_steps 1000 --lr_scheduler.warmup_steps 100

    The lr of each group is ``initial_lr · f(t)`` with ``t`` the number of optimizer steps taken (the schedules
    of the module docstring): the scheduler registers an optimizer step post-hook
    (``optimizer.register_step_post_hook``) that advances it after each ``optimizer.step()``, so ``t`` counts
    the steps actually taken (a step skipped by AMP's scaler or by gradient accumulation is not counted).
    Its own :meth:`step` is the one Lightning calls at epoch ends: it does nothing (apart from the one call
    ``LRScheduler.__init__`` makes to set the lr of step 0). State and resume are :class:`ScheduledLR`'s.

    Args:
        schedule: a registered schedule name (``constant | cosine | linear | wsd | inverse-sqrt``).
        total_steps: the horizon, required by every schedule but ``constant`` and ``inverse-sqrt``: the
            scheduler cannot see the Trainer, so pass the same number as ``--trainer.max_steps``.
        warmup_steps: linear warmup from 0.
        final_fraction, decay_fraction, cooldown_shape, cooldown_start, timescale: the schedule's own
            settings (``None``: the registered default); one the schedule does not take is refused.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: str = "cosine",
        total_steps: int | None = None,
        warmup_steps: int = 0,
        final_fraction: float | None = None,
        decay_fraction: float | None = None,
        cooldown_shape: str | None = None,
        cooldown_start: int | None = None,
        timescale: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        spec = get_scheduler_spec(schedule)
        given = {key: value for key, value in dict(
            final_fraction=final_fraction, decay_fraction=decay_fraction, cooldown_shape=cooldown_shape,
            cooldown_start=cooldown_start, timescale=timescale).items() if value is not None}
        unknown = sorted(set(given) - set(spec.defaults))
        if unknown:
            raise ValueError(
                f"PerStepLR: schedule {spec.name!r} does not take {', '.join(unknown)}; it takes total_steps, "
                f"warmup_steps{''.join(', ' + k for k in sorted(spec.defaults))}"
            )
        if spec.schedule_cls.needs_total_steps and total_steps is None:
            raise ValueError(
                f"PerStepLR: schedule {spec.name!r} needs total_steps (the scheduler cannot read the Trainer's "
                "max_steps): pass --lr_scheduler.total_steps N, the same N as --trainer.max_steps"
            )
        built = spec.schedule_cls(total_steps=total_steps, warmup_steps=warmup_steps, **{**spec.defaults, **given})
        super().__init__(optimizer, built, last_epoch)
        self._step_hook = optimizer.register_step_post_hook(self._after_optimizer_step)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ScheduledLR.step(self)

    def step(self, epoch: int | None = None) -> None:
        """Ignored once built (Lightning's epoch-end call): the optimizer step post-hook advances the lr."""
        if getattr(self, "_step_hook", None) is None:  # the call LRScheduler.__init__ makes: lr of step 0
            super().step(epoch)

    def remove_hook(self) -> None:
        """Stop following the optimizer (the lr stays where it is)."""
        if self._step_hook is not None:
            self._step_hook.remove()

"""Learning-rate schedules as pure functions of the step, and the LRScheduler that applies them.

Every schedule maps the number of optimizer steps already taken, ``t`` (0 for the first step), to a
multiplier ``f(t)`` of each parameter group's own peak lr, so per-group lr ratios (hybrid optimizers,
``lr_scale``) hold throughout. Warmup is linear from 0: ``f(t) = t / warmup`` for ``t < warmup`` (the
Hugging Face convention: the first step runs at lr 0 when there is warmup), and ``f(warmup) = 1``.
After warmup, with ``u`` the fraction of the post-warmup horizon done (clamped to [0, 1])::

    constant      1
    cosine        m + (1 - m)·(1 + cos(π·u))/2                     m = final_fraction, default 0.01
    linear        m + (1 - m)·(1 - u)                              default m = 0.001
    wsd           1 until the cooldown, then m + (1 - m)·shape(v)   default m = 0, decay_fraction 0.2
                  shape: linear 1 - v | cosine (1 + cos πv)/2 | sqrt 1 - sqrt(v)  (sqrt: Hägele et al. 2024)
    inverse-sqrt  sqrt(τ / max(t, τ))                              τ = timescale, default max(warmup, 1)

The defaults follow Semenov et al. 2025 (arXiv 2509.01440): cosine to 0.01× peak (0.1× is clearly worse),
linear to 0.001× peak, WSD with a 20% (1-sqrt) cooldown to zero.

WSD's cooldown starts at ``cooldown_start`` (default ``total_steps - round(decay_fraction·total_steps)``)
and ends at ``total_steps``. To branch a cooldown from a checkpoint saved at step ``s`` of a constant run,
resume it with ``cooldown_start=s, total_steps=s + D``: on resume the scheduler keeps the step count and the
peak lrs from the checkpoint and the schedule the user asked for now.

From LightningCLI's own ``--lr_scheduler`` use :class:`lightning_optim.lr_scheduler.PerStepLR` (plain-typed
arguments, steps itself after every optimizer step); :class:`ScheduledLR` takes a ``Schedule`` object, which jsonargparse cannot build there,
and would be stepped once per epoch by LightningCLI's ``configure_optimizers``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "Schedule",
    "ConstantSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "WSDSchedule",
    "InverseSqrtSchedule",
    "ScheduledLR",
    "PerStepLR",
]

COOLDOWN_SHAPES = ("linear", "cosine", "sqrt")


@dataclass
class Schedule:
    """Base: warmup then :meth:`after_warmup`. Subclasses add their own fields."""

    total_steps: int | None = None
    warmup_steps: int = 0

    name = "schedule"
    needs_total_steps = True

    def __post_init__(self) -> None:
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.total_steps is not None:
            if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps <= 0:
                raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
            if self.warmup_steps >= self.total_steps:
                raise ValueError(
                    f"warmup_steps ({self.warmup_steps}) must be smaller than total_steps ({self.total_steps})"
                )
        self.validate()

    def validate(self) -> None:
        """Range checks for the subclass's own fields."""

    def _fraction(self, name: str, value: float, low_open: bool = False) -> None:
        ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
        if not ok:
            interval = "(0, 1]" if low_open else "[0, 1]"
            raise ValueError(f"{name} must be in {interval}, got {value}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if step == self.warmup_steps:
            return 1.0  # every schedule starts its post-warmup part at the peak (u = 0)
        if self.needs_total_steps and self.total_steps is None:
            raise RuntimeError(
                f"schedule {self.name!r} has no total_steps yet: call ScheduledLR.set_total_steps(n) before stepping"
            )
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError

    def progress(self, step: int, start: int | None = None) -> float:
        """``u`` in [0, 1]: how far ``step`` is from ``start`` (default: warmup end) to ``total_steps``."""
        start = self.warmup_steps if start is None else start
        span = max(self.total_steps - start, 1)
        return min(max((step - start) / span, 0.0), 1.0)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass
class ConstantSchedule(Schedule):
    name = "constant"
    needs_total_steps = False

    def after_warmup(self, step: int) -> float:
        return 1.0


@dataclass
class CosineSchedule(Schedule):
    final_fraction: float = 0.01
    name = "cosine"

    def validate(self) -> None:
        self._fraction("final_fraction", self.final_fraction)

    def after_warmup(self, step: int) -> float:
        m = self.final_fraction
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))


@dataclass
class LinearSchedule(Schedule):
    final_fraction: float = 0.001
    name = "linear"

    def validate(self) -> None:
        self._fraction("final_fraction", self.final_fraction)

    def after_warmup(self, step: int) -> float:
        m = self.final_fraction
        return m + (1.0 - m) * (1.0 - self.progress(step))


def cooldown_shape(shape: str, v: float) -> float:
    """Fraction of the peak left at cooldown progress ``v`` in [0, 1] (1 at v=0, 0 at v=1)."""
    if shape == "linear":
        return 1.0 - v
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * v))
    if shape == "sqrt":
        return 1.0 - math.sqrt(v)
    raise ValueError(f"cooldown_shape must be one of {COOLDOWN_SHAPES}, got {shape!r}")


@dataclass
class WSDSchedule(Schedule):
    """Warmup–stable–decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024)."""

    decay_fraction: float = 0.2
    final_fraction: float = 0.0
    cooldown_shape: str = "sqrt"
    cooldown_start: int | None = None
    name = "wsd"

    def validate(self) -> None:
        self._fraction("decay_fraction", self.decay_fraction, low_open=True)
        self._fraction("final_fraction", self.final_fraction)
        if self.cooldown_shape not in COOLDOWN_SHAPES:
            raise ValueError(f"cooldown_shape must be one of {COOLDOWN_SHAPES}, got {self.cooldown_shape!r}")
        if self.cooldown_start is not None:
            if not isinstance(self.cooldown_start, int) or self.cooldown_start < self.warmup_steps:
                raise ValueError(
                    f"cooldown_start must be an integer >= warmup_steps ({self.warmup_steps}), "
                    f"got {self.cooldown_start!r}"
                )
            if self.total_steps is not None and self.cooldown_start >= self.total_steps:
                raise ValueError(
                    f"cooldown_start ({self.cooldown_start}) must be before total_steps ({self.total_steps})"
                )

    @property
    def decay_start(self) -> int:
        if self.cooldown_start is not None:
            return self.cooldown_start
        return max(self.total_steps - round(self.decay_fraction * self.total_steps), self.warmup_steps)

    def after_warmup(self, step: int) -> float:
        start = self.decay_start
        if step < start:
            return 1.0
        m = self.final_fraction
        return m + (1.0 - m) * cooldown_shape(self.cooldown_shape, self.progress(step, start))


@dataclass
class InverseSqrtSchedule(Schedule):
    timescale: int | None = None
    name = "inverse-sqrt"
    needs_total_steps = False

    def validate(self) -> None:
        if self.timescale is not None and (not isinstance(self.timescale, int) or self.timescale <= 0):
            raise ValueError(f"timescale must be a positive integer, got {self.timescale!r}")

    def after_warmup(self, step: int) -> float:
        tau = self.timescale or max(self.warmup_steps, 1)
        return math.sqrt(tau / max(step, tau))


class ScheduledLR(LRScheduler):
    """Sets each group's lr to ``initial_lr · schedule(t)`` where ``t`` counts the optimizer steps taken.

    ``state_dict`` is plain data (the step, the peak lrs and the schedule's settings), so it loads with
    ``torch.load(weights_only=True)``. ``load_state_dict`` restores the step and peak lrs, keeps the
    schedule this object was built with (so a cooldown can be branched from a checkpoint; it warns when the
    saved schedule differs) and sets each group's lr for the restored step — load the optimizer first.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        last_epoch: int = -1,
        total_steps_fn: Callable[[], int] | None = None,
    ) -> None:
        self.schedule = schedule
        self.total_steps_fn = total_steps_fn
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if (
            self.schedule.total_steps is None
            and self.schedule.needs_total_steps
            and step > self.schedule.warmup_steps
            and self.total_steps_fn is not None
        ):
            self._set_schedule_total(self.total_steps_fn())
        factor = self.schedule(step)
        return [base * factor for base in self.base_lrs]

    def _set_schedule_total(self, total_steps: float) -> None:
        if total_steps is None or not math.isfinite(total_steps):
            raise ValueError(
                f"schedule {self.schedule.name!r} needs a finite horizon: set Trainer(max_steps=...) or "
                f"OptimConfig.total_steps (got {total_steps})"
            )
        config = self.schedule.config()
        config.pop("name")
        config["total_steps"] = int(total_steps)
        self.schedule = type(self.schedule)(**config)

    def set_total_steps(self, total_steps: int) -> None:
        """Fill in (or change) the horizon and re-apply the current lr."""
        self._set_schedule_total(total_steps)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "_step_count": self._step_count,
            "_last_lr": list(getattr(self, "_last_lr", [])),
            "schedule": self.schedule.config(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = dict(state_dict.get("schedule") or {})
        if saved and saved != self.schedule.config():
            warnings.warn(
                f"resuming with a different schedule than the checkpoint's: {saved} -> {self.schedule.config()}; "
                "the step count and peak lrs come from the checkpoint",
                stacklevel=2,
            )
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = list(state_dict["base_lrs"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        # Re-apply the lr for the restored step under *this* schedule (the optimizer's saved lr came from the
        # checkpoint's schedule; they agree on an exact resume and differ when a cooldown is branched).
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

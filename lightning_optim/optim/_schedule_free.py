"""The schedule-free core shared by ``sf-adamw`` and ``sf-normuon``: the clock, the y/x switch, the SF-AdamW rule.

Schedule-free methods (Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682, the reference being
facebookresearch/schedule_free) keep three sequences: the base iterate ``z`` (the one a plain optimizer would
step), the average ``x`` (the weights to evaluate and to ship) and the point ``y`` where gradients are taken::

    y_t = (1-β1)·z_t + β1·x_t
    z_{t+1} = z_t - lr_t·u_t                     (u_t: the base method's direction, from the gradient at y_t)
    x_{t+1} = (1-c_{t+1})·x_t + c_{t+1}·z_{t+1}

**The clock** (:func:`tick`), per parameter group, ``t = k+1`` counting the steps taken::

    lr_t = lr·min(1, t/warmup_steps)        (no warmup when warmup_steps is 0)
    lr_max = max(lr_max, lr_t);   w_t = t^r · lr_max^weight_lr_power;   c = w_t / Σ_{i≤t} w_i

(``r`` 0 and power 2 give ``c = lr_t²/Σ lr_i²`` while warming up, then ``1/t``-like averaging.) The group keys
``k``, ``lr_max``, ``weight_sum``, ``scheduled_lr`` and ``train_mode`` exist from construction
(:data:`CLOCK_KEYS`), so ``torch.save`` and ``torch.distributed.checkpoint`` restore them.

**y-form step** (the reference's layout: ``x`` is not stored). Substituting ``β1·x = y - (1-β1)·z`` into the
three lines above gives, with the old ``y`` and ``z`` on the right (:func:`apply_direction`)::

    y ← y + c·(z - y) + lr_t·(β1·(1-c) - 1)·u;     z ← z - lr_t·u

**Modes** (:class:`ScheduleFreeModes`): the parameter holds ``y`` in train mode and ``x`` in eval mode.
``eval()`` maps ``y → x = y + (1 - 1/β1)·(z - y)`` and ``train()`` maps ``x → y = x + (1-β1)·(z - x)``, both as
``lerp`` towards ``z``, per group, idempotent; they take no argument and return ``None``, as
``schedulefree.AdamWScheduleFree.train/eval`` do. One difference from the reference: a fresh optimizer here is
in train mode (``x = y = z`` before the first step, so no switch is needed to start), the reference's starts in
eval mode. The two maps are inverse in exact arithmetic only: in floating point ``train(eval(y))`` may differ
from ``y`` in the last bit, so code that needs a resumed run to match a straight one must make both see the
same switches (:class:`~lightning_optim.callbacks.schedule_free.ScheduleFreeSwitch` does).

**Without the switch in Lightning** the run would validate and checkpoint ``y`` in silence: the first
``step()`` inside a Lightning Trainer raises ``RuntimeError`` unless a ``ScheduleFreeSwitch`` marked the
optimizer (:mod:`lightning_optim.optim._needs_callback`). A plain loop or Fabric is not checked: it calls
``train()`` / ``eval()`` itself, and ``step()`` in eval mode raises there too.

**SF-AdamW** (:func:`sf_adamw_update`): ``v = β2·v + (1-β2)·g²``, ``u = g/(sqrt(v/bc2) + eps) + wd·d`` with
``bc2 = 1 - β2^t`` and the decay taken at ``d = y`` (the reference's ``sf-adamw``) or at ``d = z``
(sf-normuon's non-matrix parameters).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from lightning_optim.optim._elementwise import local
from lightning_optim.optim._needs_callback import require_callback

__all__ = ["CLOCK_KEYS", "clock_defaults", "check_schedule_free", "tick", "apply_direction", "sf_adamw_update",
           "ScheduleFreeModes"]

#: the per-group keys of the schedule-free clock and mode, with their values at construction
CLOCK_KEYS: dict[str, Any] = {"k": 0, "lr_max": -1.0, "weight_sum": 0.0, "scheduled_lr": 0.0, "train_mode": True}


def clock_defaults(warmup_steps: int, r: float, weight_lr_power: float) -> dict[str, Any]:
    """The group defaults of the clock: its hyperparameters and :data:`CLOCK_KEYS`."""
    return {"warmup_steps": int(warmup_steps), "r": r, "weight_lr_power": weight_lr_power, **CLOCK_KEYS}


def check_schedule_free(betas: tuple[float, ...], warmup_steps: Any, r: Any, weight_lr_power: Any,
                        betas_name: str = "betas") -> None:
    """Refuse hyperparameters the schedule-free iterates cannot take, naming the field."""
    if not betas[0] > 0:
        raise ValueError(f"{betas_name}[0] must be > 0 for schedule-free (x is recovered as "
                         f"(y - (1-β1)·z)/β1), got {betas[0]}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    for name, value in (("r", r), ("weight_lr_power", weight_lr_power)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def tick(group: dict[str, Any]) -> tuple[float, float]:
    """Advance ``group``'s clock by one step; return ``(lr_t, c)`` (see the module docstring).

    Updates ``k``, ``lr_max``, ``weight_sum`` and ``scheduled_lr`` in the group. Python floats: no device
    tensor is read."""
    k = group["k"]
    warmup = group["warmup_steps"]
    lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
    lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    group["k"] = k + 1
    group["scheduled_lr"] = lr
    return lr, (weight / weight_sum if weight_sum > 0 else 0.0)


def apply_direction(y: list[torch.Tensor], z: list[torch.Tensor], u: list[torch.Tensor], step: float, c: float,
                    beta1: float) -> None:
    """The y-form step with direction ``u`` and step size ``step`` (lr_t, or lr_t times a factor folded out
    of ``u``): ``y ← lerp(y, z, c) + step·(β1(1-c) - 1)·u``, ``z ← z - step·u``, in place."""
    torch._foreach_lerp_(y, z, c)
    torch._foreach_add_(y, u, alpha=step * (beta1 * (1.0 - c) - 1.0))
    torch._foreach_add_(z, u, alpha=-step)


def sf_adamw_update(y: list[torch.Tensor], g: list[torch.Tensor], z: list[torch.Tensor], v: list[torch.Tensor],
                    *, lr: float, c: float, t: int, betas: tuple[float, float], eps: float, weight_decay: float,
                    decay_at_z: bool = False) -> None:
    """One SF-AdamW step on lists of local tensors (``t``: this step's number, from 1), in place.

    ``u = g/(sqrt(v/bc2) + eps) + wd·d = sqrt(bc2)·w`` with ``w = g/(sqrt(v) + eps·sqrt(bc2)) + (wd/sqrt(bc2))·d``:
    the factor ``sqrt(bc2)`` goes into the step size, and ``w`` is built in one scratch list (a second 1×P
    list would be fresh pages every step)."""
    beta1, beta2 = betas
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    sbc2 = math.sqrt(1 - beta2 ** t)
    w = torch._foreach_sqrt(v)
    torch._foreach_add_(w, eps * sbc2)
    torch._foreach_div_(w, g)
    torch._foreach_reciprocal_(w)
    if weight_decay != 0:
        torch._foreach_add_(w, z if decay_at_z else y, alpha=weight_decay / sbc2)
    apply_direction(y, z, w, sbc2 * lr, c, beta1)


class ScheduleFreeModes:
    """Mixin for a ``torch.optim.Optimizer`` whose groups carry ``betas`` and ``train_mode`` and whose state
    holds ``z``: ``train()`` / ``eval()`` switch the parameters between ``y`` and ``x``."""

    param_groups: list[dict[str, Any]]
    state: Any

    @torch.no_grad()
    def _switch(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta1 = group["betas"][0]
            ps, zs = [], []
            for p in group["params"]:
                z = self.state[p].get("z") if p in self.state else None
                if z is not None:
                    lp = local(p)
                    ps.append(lp)
                    zs.append(local(z).to(device=lp.device, dtype=lp.dtype))
            if ps:
                torch._foreach_lerp_(ps, zs, (1.0 - beta1) if to_train else (1.0 - 1.0 / beta1))
            group["train_mode"] = to_train

    def train(self) -> None:
        """Parameters ← y, where gradients are taken. Idempotent."""
        self._switch(True)

    def eval(self) -> None:
        """Parameters ← x, the average: validate and save these. Idempotent."""
        self._switch(False)

    @property
    def train_mode(self) -> bool:
        """Every group is in train mode (the parameters hold y)."""
        return all(g["train_mode"] for g in self.param_groups)

    def _require_train_mode(self) -> None:
        """Called at the start of ``step()``: the switch callback is there (in a Trainer), train mode."""
        require_callback(self, "lightning_optim.callbacks.ScheduleFreeSwitch",
                         "validation and checkpoints would see the gradient point y instead of the average x")
        if not self.train_mode:
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: call optimizer.train() before training steps "
                "(in Lightning, add lightning_optim.callbacks.ScheduleFreeSwitch)")

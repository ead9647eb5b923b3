"""LossSpikeDetector: z-score of the training loss against a rolling window; log, skip or roll back.

Example::

    from lightning_optim.callbacks import GradientClipping, LossSpikeDetector

    trainer = L.Trainer(callbacks=[
        LossSpikeDetector(action="rollback", window=128, threshold=6.0, lr_factor=0.7, max_rollbacks=3,
                          clip_factor=0.7),          # also tighten GradientClipping by 30% on each rollback
        GradientClipping(max_norm=1.0),              # put the detector first: it then sees the unclipped norm
    ])

Detection (one-sided, as in PaLM-style monitoring): at each optimizer step the loss (the mean over the
micro-batches of the step) is compared with the last ``window`` accepted losses of this rank,
``z = (loss - mean) / std``; the step is a spike when ``z > threshold`` (or the loss is not finite). With
``monitor_grad_norm=True`` the global gradient norm (full under FSDP2) is scored the same way and either score
can flag the step. No decision is taken before the window holds ``min_history`` values (default half the
window). The per-rank flags are reduced across ranks (one all-reduce: a spike on any rank is a spike on all),
so every rank takes the same action and the replicas never diverge.

Actions:

- ``"log"``: only log (``stability/spikes``, ``stability/loss_z``, ``stability/grad_norm_z``) and warn.
- ``"skip"``: drop the update on every rank; the weights and the optimizer state after the step are bitwise
  those before it (see :mod:`lightning_optim.callbacks._decisions` for why zeroing gradients is not enough).
  After ``max_consecutive`` spikes in a row the detector gives up (the loss level has moved or the run diverged).
- ``"rollback"``: drop the update, restore the last good snapshot — an in-memory CPU copy of the weights and
  optimizer state taken every ``snapshot_every`` steps (``rollback_source="memory"``), or the newest checkpoint
  written by ``ModelCheckpoint`` (``"checkpoint"``, through ``trainer.strategy.load_checkpoint``) — multiply the
  peak lr of every scheduler (``base_lrs``) by ``lr_factor`` and, with ``clip_factor``, tighten the
  :class:`~lightning_optim.callbacks.GradientClipping` threshold. At most ``max_rollbacks`` times; then it gives
  up. ``global_step`` and the data iterator move on, so the batches that led to the spike are skipped (PaLM).

Giving up raises :class:`~lightning_optim.callbacks._decisions.TrainingUnstableError` (``on_give_up="raise"``)
or sets ``trainer.should_stop`` (``"stop"``), with a message that says what happened.

**Cost and ownership.** The detector is a :class:`~lightning_optim.callbacks._loss_watch.LossWatch`: its test
``loss > mean + threshold·std`` (the same as ``z > threshold``; ``mean`` and ``std`` of the window are known on
the host before the step) runs on device, the per-rank flags are summed in the decision round that all loss
watchers share, and the loss comes to the host in that round's single sync — one all-reduce and one host sync
per step for the detector and ``NonFiniteGuard`` together. The gradient norm is the step's shared norm before
clipping (:mod:`~lightning_optim.callbacks._step_norms`), whatever the order of the callbacks. A step with a
non-finite loss or gradient belongs to ``NonFiniteGuard`` when one is enabled in the Trainer (it decides first):
the detector then does not count it, does not roll back for it and keeps its loss out of the window; without a
guard the detector treats it as a spike. A step another callback already dropped is ignored the same way.

``state_dict`` holds the windows, the counters and the cumulative lr factor, so a resumed run keeps detecting
from where it was (the scaled ``base_lrs`` are in the scheduler's own state). ``enabled=False`` turns every hook
into a no-op (for recipes that add the detector by default).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_optim.callbacks._decisions import Snapshot, StepGate, TrainingUnstableError, find_callback, scale_peak_lr
from lightning_optim.callbacks._loss_watch import LossWatch, Terms, Verdict
from lightning_optim.callbacks._step_norms import StepGradNorms

__all__ = ["LossSpikeDetector", "spike_test", "window_stats"]

ACTIONS = ("log", "skip", "rollback")


def window_stats(history: "deque[float]") -> tuple[float, float]:
    """``(mean, std)`` of ``history``: population std, floored at 1e-8·|mean| + 1e-12."""
    n = len(history)
    mean = sum(history) / n
    var = sum((x - mean) ** 2 for x in history) / n
    return mean, max(math.sqrt(var), 1e-8 * abs(mean) + 1e-12)


def one_sided_z(value: float, history: "deque[float]") -> float:
    """``(value - mean)/std`` of ``history`` (see :func:`window_stats`)."""
    mean, std = window_stats(history)
    return (value - mean) / std


def spike_test(value: torch.Tensor, history: "deque[float]", threshold: float,
               min_history: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(isfinite(value) & value > mean + threshold·std, z)`` on device, ``mean``/``std`` of ``history``
    (:func:`window_stats`); no decision (a false flag, ``z=None``) before ``history`` holds ``min_history`` values."""
    if len(history) < min_history:
        return torch.zeros((), dtype=torch.bool, device=value.device), None
    mean, std = window_stats(history)
    wide = value.double() if value.device.type != "mps" else value  # compare in float64 where supported
    return torch.isfinite(value) & (wide > mean + threshold * std), (value - mean) / std


class LossSpikeDetector(LossWatch):
    """Detect loss (and gradient-norm) spikes with a rolling z-score and log, skip or roll back.

    Args:
        action: ``"log"``, ``"skip"`` or ``"rollback"``.
        window: number of past accepted steps the z-score is computed against.
        threshold: z above which a step is a spike (one-sided: only increases count).
        min_history: no decisions before the window holds this many values (default ``window // 2``).
        monitor_grad_norm: also score the global gradient norm.
        max_consecutive: ``skip``: give up after this many spikes in a row.
        max_rollbacks: ``rollback``: give up after this many rollbacks.
        lr_factor: ``rollback``: multiply the peak lr by this on each rollback.
        clip_factor: ``rollback``: tighten a GradientClipping callback by this factor (``None``: leave it).
        snapshot_every: ``rollback`` from memory: take a CPU snapshot every this many steps.
        rollback_source: ``"memory"`` or ``"checkpoint"`` (falls back to memory when no checkpoint exists yet).
        on_give_up: ``"raise"`` or ``"stop"``.
        snapshot_device: where snapshots live (``"cpu"``; ``None``: beside the tensors).
        enabled: ``False`` makes the callback do nothing at all.
    """

    priority = 10  # after NonFiniteGuard: a non-finite step is the guard's

    def __init__(
        self,
        action: str = "skip",
        window: int = 128,
        threshold: float = 6.0,
        min_history: int | None = None,
        monitor_grad_norm: bool = False,
        max_consecutive: int = 10,
        max_rollbacks: int = 3,
        lr_factor: float = 0.7,
        clip_factor: float | None = None,
        snapshot_every: int = 100,
        rollback_source: str = "memory",
        on_give_up: str = "raise",
        snapshot_device: str | None = "cpu",
        enabled: bool = True,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if max_consecutive < 1:
            raise ValueError(f"LossSpikeDetector: max_consecutive must be >= 1, got {max_consecutive}")
        if max_rollbacks < 0:
            raise ValueError(f"LossSpikeDetector: max_rollbacks must be >= 0, got {max_rollbacks}")
        if min_history is not None and min_history > window:
            raise ValueError(f"LossSpikeDetector: min_history ({min_history}) cannot exceed window ({window}): "
                             "the detector would never decide")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor}")
        if clip_factor is not None and not 0 < clip_factor <= 1:
            raise ValueError(f"clip_factor must be in (0, 1], got {clip_factor}")
        if rollback_source not in ("memory", "checkpoint"):
            raise ValueError(f"rollback_source must be 'memory' or 'checkpoint', got {rollback_source!r}")
        if on_give_up not in ("raise", "stop"):
            raise ValueError(f"on_give_up must be 'raise' or 'stop', got {on_give_up!r}")
        super().__init__(enabled=enabled)
        self.action = action
        self.window = window
        self.threshold = threshold
        self.min_history = max(2, window // 2 if min_history is None else min_history)
        self.monitor_grad_norm = monitor_grad_norm
        self.max_consecutive = max_consecutive
        self.max_rollbacks = max_rollbacks
        self.lr_factor = lr_factor
        self.clip_factor = clip_factor
        self.snapshot_every = snapshot_every
        self.rollback_source = rollback_source
        self.on_give_up = on_give_up
        self.snapshot_device = snapshot_device
        # state that survives a restart
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self.skipped = 0
        self.rollbacks = 0
        self.consecutive = 0
        self.lr_scale = 1.0
        self.events: list[dict[str, float]] = []  # last few events, for inspection
        # transient
        self._snapshot: Snapshot | None = None
        self._snapshot_step = -1
        self._dropped_this_step = False
        self._stepped = False
        self.stop_reason: str | None = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses), "grad_norms": list(self.grad_norms), "spikes": self.spikes,
            "skipped": self.skipped, "rollbacks": self.rollbacks, "consecutive": self.consecutive,
            "lr_scale": self.lr_scale, "events": list(self.events),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = deque((float(x) for x in state_dict.get("losses", [])), maxlen=self.window)
        self.grad_norms = deque((float(x) for x in state_dict.get("grad_norms", [])), maxlen=self.window)
        for key in ("spikes", "skipped", "rollbacks", "consecutive"):
            setattr(self, key, int(state_dict.get(key, 0)))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.events = list(state_dict.get("events", []))

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled and self.action == "rollback" and self._snapshot is None:
            self._take_snapshot(trainer, pl_module)

    # ---------------------------------------------------------------- the round
    def step_terms(self, trainer: Any, optimizer: torch.optim.Optimizer, norms: StepGradNorms) -> Terms | None:
        loss = self.take_loss()
        if loss is None:
            return None
        nonfinite = ~torch.isfinite(loss)
        spike, z_loss = self._device_test(loss, self.losses)
        values, extra = [loss], {"z_loss": z_loss, "z_grad": None}
        if self.monitor_grad_norm:
            gnorm = norms.before_clipping().to(loss.device)
            nonfinite = nonfinite | ~torch.isfinite(gnorm)
            spike_g, extra["z_grad"] = self._device_test(gnorm, self.grad_norms)
            spike = spike | spike_g
            values.append(gnorm)
        return Terms(flags=[nonfinite, spike], values=values, extra=extra)

    def _device_test(self, value: torch.Tensor, history: "deque[float]") -> tuple[torch.Tensor, torch.Tensor | None]:
        return spike_test(value, history, self.threshold, self.min_history)

    def claims(self, verdict: Verdict) -> bool:
        return verdict.claimed_by is None and self.action != "log" and (verdict.flags[0] > 0 or verdict.flags[1] > 0)

    def on_verdict(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer, verdict: Verdict) -> None:
        self._dropped_this_step = False
        self._stepped = True
        if verdict.claimed_by is not None or StepGate.dropping(optimizer):
            return  # another callback drops this step (a non-finite one is the guard's): not ours, not in the window
        loss = verdict.values[0]
        gnorm = verdict.values[1] if self.monitor_grad_norm else None
        z_loss = self._z(loss, self.losses)
        z_grad = self._z(gnorm, self.grad_norms) if gnorm is not None else None
        spike = verdict.flags[0] > 0 or verdict.flags[1] > 0

        if z_loss is not None:  # device tensors: logging them costs no host sync
            pl_module.log("stability/loss_z", verdict.extra["z_loss"], on_step=True, on_epoch=False)
        if z_grad is not None:
            pl_module.log("stability/grad_norm_z", verdict.extra["z_grad"], on_step=True, on_epoch=False)

        if not spike or self.action == "log":
            self.consecutive = self.consecutive + 1 if spike else 0
            if spike:
                self._record(trainer, loss, z_loss, z_grad, "logged")
            if math.isfinite(loss):
                self.losses.append(loss)
            if gnorm is not None and math.isfinite(gnorm):
                self.grad_norms.append(gnorm)
            return

        self.consecutive += 1
        self._dropped_this_step = True
        gate = StepGate.of(optimizer, self.snapshot_device)
        if self.action == "skip":
            self.skipped += 1
            self._record(trainer, loss, z_loss, z_grad, "skipped")
            gate.drop()
            if self.consecutive >= self.max_consecutive:
                self._give_up(trainer, f"{self.consecutive} spikes in a row (the last at step {trainer.global_step})")
            return
        # rollback
        if self.rollbacks >= self.max_rollbacks:
            gate.drop()
            self._give_up(trainer, f"a spike at step {trainer.global_step} after {self.rollbacks} rollbacks")
            return
        self.rollbacks += 1
        self._record(trainer, loss, z_loss, z_grad, "rollback")
        gate.drop(then=lambda: self._rollback(trainer, pl_module))

    def after_batch(self, trainer: Any, pl_module: Any) -> None:
        if self._stepped:
            self._stepped = False
            if self.spikes:
                self.log_count(pl_module, "stability/spikes", float(self.spikes))
                self.log_count(pl_module, "stability/skipped_steps", float(self.skipped))
                self.log_count(pl_module, "stability/rollbacks", float(self.rollbacks))
            if (self.action == "rollback" and not self._dropped_this_step and self.snapshot_every > 0
                    and trainer.global_step % self.snapshot_every == 0 and trainer.global_step != self._snapshot_step):
                self._take_snapshot(trainer, pl_module)

    # ---------------------------------------------------------------- internals
    def _z(self, value: float | None, history: "deque[float]") -> float | None:
        if value is None or len(history) < self.min_history or not math.isfinite(value):
            return None
        return one_sided_z(value, history)

    def _record(self, trainer: Any, loss: float, z_loss: float | None, z_grad: float | None, action: str) -> None:
        self.spikes += 1
        event = {"step": float(trainer.global_step), "loss": loss, "z_loss": z_loss if z_loss is not None else math.nan,
                 "z_grad_norm": z_grad if z_grad is not None else math.nan}
        self.events = (self.events + [event])[-32:]
        rank_zero_warn(
            f"LossSpikeDetector: spike at step {trainer.global_step} (loss {loss:.4g} on rank 0, z={event['z_loss']:.2f}"
            + (f", grad-norm z={z_grad:.2f}" if z_grad is not None else "")
            + f", threshold {self.threshold}; flagged on at least one rank): {action}",
            category=RuntimeWarning,
        )

    def _model_buffers(self, pl_module: Any) -> list[torch.Tensor]:
        return [b for b in pl_module.buffers() if b.is_floating_point()]

    def _take_snapshot(self, trainer: Any, pl_module: Any) -> None:
        if self.rollback_source != "memory" and self._snapshot is not None:
            return  # only the initial snapshot is kept as the fallback for checkpoint rollbacks
        opt = trainer.optimizers[0]
        self._snapshot = Snapshot(opt, self.snapshot_device, extra=self._model_buffers(pl_module))
        self._snapshot_step = trainer.global_step

    def _last_checkpoint(self, trainer: Any) -> str | None:
        import os

        paths = []
        for cb in trainer.checkpoint_callbacks:
            for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
                if path and os.path.exists(path):
                    paths.append(path)
        if not paths:
            return None
        return max(paths, key=os.path.getmtime)

    def _rollback(self, trainer: Any, pl_module: Any) -> None:
        source = "memory snapshot"
        path = self._last_checkpoint(trainer) if self.rollback_source == "checkpoint" else None
        if path is not None:
            checkpoint = trainer.strategy.load_checkpoint(path)
            trainer.strategy.load_model_state_dict(checkpoint, strict=True)
            trainer.strategy.load_optimizer_state_dict(checkpoint)
            source = f"checkpoint {path}"
        elif self._snapshot is not None:
            self._snapshot.restore(extra=self._model_buffers(pl_module))
            source = f"memory snapshot of step {self._snapshot_step}"
        else:
            rank_zero_warn("LossSpikeDetector: no snapshot to roll back to; the step was skipped instead")
        scale_peak_lr(trainer, self.lr_factor)
        self.lr_scale *= self.lr_factor
        clip = find_callback(trainer, "GradientClipping")
        if self.clip_factor is not None and clip is not None:
            clip.tighten(self.clip_factor)
        self.consecutive = 0
        rank_zero_info(
            f"LossSpikeDetector: rolled back to the {source} at step {trainer.global_step} "
            f"(rollback {self.rollbacks}/{self.max_rollbacks}); peak lr now x{self.lr_scale:.3g} of the original"
            + (f", clipping tightened by x{self.clip_factor}" if self.clip_factor is not None and clip is not None else "")
        )

    def _give_up(self, trainer: Any, what: str) -> None:
        self.stop_reason = (
            f"LossSpikeDetector: giving up after {what}; the last update was dropped, so the weights are those "
            f"before it. Spikes so far: {self.spikes}, skipped: {self.skipped}, rollbacks: {self.rollbacks}, "
            f"peak lr x{self.lr_scale:.3g}. Lower the learning rate, tighten clipping or inspect the data."
        )
        if self.on_give_up == "raise":
            StepGate.finish_all(list(trainer.optimizers))  # raising inside the closure skips the post-hook
            raise TrainingUnstableError(self.stop_reason)
        rank_zero_warn(self.stop_reason, category=RuntimeWarning)
        trainer.should_stop = True

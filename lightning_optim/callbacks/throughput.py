"""``TokenThroughput``: tokens per second (and MFU where the device's peak is known), in the logger and the
progress bar.

Usage::

    trainer = L.Trainer(callbacks=[TokenThroughput(log_every_n_steps=10)])

Counts the tokens of every training micro-batch (``batch[0].numel()``, times the world size), measures the
wall clock between logs (validation time left out) and logs, at optimizer-step granularity:

* ``throughput/tokens_per_sec`` (all devices) — also in the progress bar as ``tok/s``;
* ``throughput/tokens_per_sec_per_device``;
* ``throughput/mfu`` = tokens/s per device × ``pl_module.flops_per_token`` / the device's peak FLOP/s, when
  Lightning knows the peak for the device and precision (CUDA and TPU chips; not CPUs).

The device is synchronised only at log steps. ``mean_tokens_per_sec`` holds the average since the first log.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["TokenThroughput"]


def _precision_dtype(precision: str) -> torch.dtype:
    p = str(precision)
    if "bf16" in p:
        return torch.bfloat16
    if "16" in p:
        return torch.float16
    if "64" in p:
        return torch.float64
    return torch.float32


class TokenThroughput(L.Callback):
    """Tokens/s and MFU every ``log_every_n_steps`` optimizer steps (see the module docstring)."""

    def __init__(self, log_every_n_steps: int = 10, warmup_steps: int = 1) -> None:
        if log_every_n_steps < 1:
            raise ValueError("log_every_n_steps must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self._t0: float | None = None
        self._tokens = 0
        self._paused = 0.0
        self._val_start: float | None = None
        self._last_step = -1
        self._peak: float | None = None
        self._total_tokens = 0
        self._total_time = 0.0
        self.mean_tokens_per_sec: float | None = None

    def _sync(self, trainer: L.Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            from lightning.fabric.utilities.throughput import get_available_flops

            self._peak = get_available_flops(trainer.strategy.root_device, _precision_dtype(trainer.precision))
        except Exception:  # pragma: no cover - unknown device
            self._peak = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._t0 is None:
            if step >= self.warmup_steps and step != self._last_step:
                self._sync(trainer)
                self._t0, self._tokens, self._paused = time.perf_counter(), 0, 0.0
            self._last_step = step
            return
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._tokens += int(inputs.numel()) * trainer.world_size
        if step == self._last_step:  # still accumulating gradients
            return
        self._last_step = step
        if step % self.log_every_n_steps:
            return
        self._sync(trainer)
        now = time.perf_counter()
        elapsed = now - self._t0 - self._paused
        if elapsed <= 0 or self._tokens == 0:
            return
        tps = self._tokens / elapsed
        self._total_tokens += self._tokens
        self._total_time += elapsed
        self.mean_tokens_per_sec = self._total_tokens / self._total_time
        per_device = tps / trainer.world_size
        metrics = {"throughput/tokens_per_sec": tps, "throughput/tokens_per_sec_per_device": per_device}
        fpt = getattr(pl_module, "flops_per_token", None)
        if fpt:
            metrics["throughput/tflops_per_device"] = per_device * fpt / 1e12
            if self._peak:
                metrics["throughput/mfu"] = per_device * fpt / self._peak
        self._log(trainer, metrics, step)
        pl_module.log("tok/s", float(tps), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                      rank_zero_only=True)
        self._t0, self._tokens, self._paused = now, 0, 0.0

    @rank_zero_only
    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None:
            self._paused += time.perf_counter() - self._val_start
            self._val_start = None

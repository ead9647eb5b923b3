"""StabilityGuard: the stability callbacks' tricks for a Fabric loop (or a plain PyTorch loop), in two lines.

The Trainer callbacks (``NonFiniteGuard``, ``LossSpikeDetector(action="skip")``, ``GradientClipping``) hook into
Lightning's optimizer closure. A Fabric loop has no closure and no callbacks; :class:`StabilityGuard` does the
same work in one call after the backward::

    import lightning as L
    from lightning_optim import create_optimizer, create_scheduler
    from lightning_optim.fabric import StabilityGuard

    fabric = L.Fabric(accelerator="cuda", devices=8, strategy="ddp")
    optimizer = create_optimizer("muon", model, lr=0.02)
    scheduler = create_scheduler("wsd", optimizer, total_steps=10_000, warmup_steps=500)
    model, optimizer = fabric.setup(model, optimizer)
    guard = StabilityGuard(optimizer, scheduler, fabric=fabric, max_norm=1.0, log_every=50)
    for batch in loader:
        loss = model(batch)
        fabric.backward(loss)
        fabric.log_dict(guard.step(loss), step=guard.steps)   # the two lines: backward, then guard.step

:meth:`StabilityGuard.step` does, in this order (the math is that of the callbacks, by the same functions):

1. **unscale** the gradients when Fabric's precision has a ``GradScaler`` (fp16; ``scaler.unscale_``, which also
   serves fused optimizers such as the registry's AdamW, where ``fabric.clip_gradients`` refuses), so every norm is a
   true one and the scaler's own inf check sees the real gradients: it still skips an overflowing step and lowers
   its scale when the guard drops that step;
2. **measure once**: ``s_i = ‖g_i‖²`` for every gradient with one ``torch._foreach_norm`` per (device, dtype),
   summed across ranks for sharded parameters (FSDP/FSDP2; one ``all_reduce``), ``‖g‖ = sqrt(Σ s_i)``
   (:func:`~lightning_optim.callbacks._norms.squared_norms`, :func:`~lightning_optim.callbacks._norms.reduce_squared`);
3. **decide on device**: *non-finite* is ``not isfinite(loss) or not isfinite(Σ s_i)`` (a finite gradient whose
   squared norm overflows float32 counts); *spike* is ``loss > mean + threshold·std`` over the last ``window``
   accepted losses of this rank, population std, no decision before ``min_history`` of them
   (:func:`~lightning_optim.callbacks.loss_spike.spike_test`; with ``monitor_grad_norm`` the same test on ``‖g‖``).
   The flags are **summed over the ranks** (``fabric.all_reduce``, or ``torch.distributed`` in a plain loop), so a
   step dropped on one rank is dropped on all and replicas never diverge;
4. the clip factor ``c = min(1, max_norm / (‖g‖ + 1e-6))`` where ``‖g‖ > max_norm``, else 1
   (:func:`~lightning_optim.callbacks.gradient_clipping.clip_coefficient`, as ``torch.nn.utils.clip_grad_norm_``);
5. **one host read** of flags, loss, ``‖g‖`` and ``c·‖g‖`` together (``tolist``) — the step's only sync, made
   only when a decision is needed (non-finite or spike checks on) or metrics are due (``log_every``);
6. **act**: a clean step scales the gradients in place by ``c`` (``torch._foreach_mul_``) and steps the optimizer
   through Fabric (its precision plugin and strategy); a dropped step goes through
   :class:`~lightning_optim.callbacks._decisions.StepGate`: parameters, every optimizer-state tensor and the group
   hyperparameters are copied, the gradients zeroed, the optimizer stepped (so a ``GradScaler`` still updates its
   scale) and everything copied back: **bitwise the pre-step state, for any optimizer** (hybrid Muon+AdamW
   included). Then the scheduler steps (a dropped batch is not seen again, as with the callbacks) and the
   gradients are zeroed (``set_to_none``);
7. after ``max_consecutive`` dropped steps in a row it raises
   :class:`~lightning_optim.callbacks._decisions.TrainingUnstableError` without stepping: the weights and the
   optimizer state are those before the first of these steps.

Returned metrics (floats, on steps where ``steps % log_every == 0``; otherwise ``{}``): ``train/loss``,
``train/grad_norm`` (before clipping), ``train/grad_norm_clipped``, ``train/lr`` (group 0, after the scheduler
step), ``stability/skipped`` (1.0 if this step was dropped), ``stability/nonfinite_steps`` and
``stability/spike_steps`` (totals); with ``layer_norms=model`` also ``norms/grad/<layer>``, the gradient norm of each
layer before clipping (a layer is a module owning parameters directly, a Linear's weight and bias together, as in
``LayerNormMonitor``; summed per layer on device with ``index_add_`` from the same squared norms, read in the same
host read). :meth:`state_dict` / :meth:`load_state_dict` keep the loss window and the
counters for ``fabric.save`` / ``fabric.load``.

With gradient accumulation call ``guard.step`` once per optimizer step, after the last micro-batch's backward,
with the loss of the whole step (the mean of the micro-batch losses, detached), as the Trainer callbacks see it.
One guard per optimizer. DeepSpeed (whose engine steps itself) is not supported.

Under fp16 a ``GradScaler`` produces inf gradients on purpose while it searches its scale; those steps count as
non-finite here as they do for ``NonFiniteGuard`` (raise ``max_consecutive`` accordingly).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_optim.callbacks._decisions import StepGate, TrainingUnstableError
from lightning_optim.callbacks._norms import LayerIndex, local, reduce_squared, squared_norms
from lightning_optim.callbacks._step_norms import step_grads
from lightning_optim.callbacks.gradient_clipping import clip_coefficient
from lightning_optim.callbacks.loss_spike import spike_test
from lightning_optim.registry import create_optimizer, create_scheduler

__all__ = ["StabilityGuard", "TrainingUnstableError", "create_optimizer", "create_scheduler"]


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Fabric's ``_FabricOptimizer`` (the object itself when it is not wrapped)."""
    try:
        from lightning.fabric.wrappers import _FabricOptimizer
    except ImportError:  # pragma: no cover - lightning is a dependency
        return optimizer
    return optimizer.optimizer if isinstance(optimizer, _FabricOptimizer) else optimizer


def _unwrap_module(module: Any) -> Any:
    """The module inside Fabric's ``_FabricModule`` (the object itself when it is not wrapped)."""
    try:
        from lightning.fabric.wrappers import _FabricModule
    except ImportError:  # pragma: no cover
        return module
    return module.module if isinstance(module, _FabricModule) else module


def _is_flat_sharded(fabric: Any) -> bool:
    """Fabric's FSDPStrategy (FSDP1): gradients are local pieces of flat shards held as plain tensors."""
    if fabric is None:
        return False
    try:
        from lightning.fabric.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover
        return False
    return isinstance(getattr(fabric, "strategy", None), FSDPStrategy)


class StabilityGuard:
    """Measure, decide, clip, step (or drop the step bit-exactly), schedule and zero grads: one call per step.

    Args:
        optimizer: the optimizer ``fabric.setup`` returned (or a plain ``torch.optim.Optimizer``).
        scheduler: stepped once per call (dropped steps included); ``None`` for none.
        fabric: the ``lightning.fabric.Fabric``; gives the unscaling, the optimizer step through the strategy and
            the cross-rank reduce. ``None`` in a plain loop (``torch.distributed`` is used when initialised).
        max_norm: global-norm clipping threshold; ``None`` turns clipping off.
        nonfinite: drop steps with a non-finite loss or gradient norm.
        spike: drop steps whose loss is a spike (z-score above ``threshold`` over the last ``window`` losses).
        window, threshold, min_history: the spike test (defaults as ``LossSpikeDetector``: 128, 6.0, window // 2).
        monitor_grad_norm: also test the gradient norm for spikes.
        max_consecutive: raise ``TrainingUnstableError`` after this many dropped steps in a row.
        log_every: return metrics on steps where ``steps % log_every == 0`` (``{}`` otherwise).
        snapshot_device: where the copy taken on a dropped step lives (``"cpu"``; ``None``: beside the tensors).
        layer_norms: a module (or Fabric's wrapper of it): also return its per-layer gradient norms on metric steps.
    """

    def __init__(self, optimizer: Any, scheduler: Any = None, *, fabric: Any = None, max_norm: float | None = 1.0,
                 nonfinite: bool = True, spike: bool = True, window: int = 128, threshold: float = 6.0,
                 min_history: int | None = None, monitor_grad_norm: bool = False, max_consecutive: int = 5,
                 log_every: int = 1, snapshot_device: str | None = "cpu", layer_norms: Any = None) -> None:
        if not isinstance(_unwrap(optimizer), torch.optim.Optimizer):
            raise TypeError(f"StabilityGuard: optimizer must be a torch.optim.Optimizer (or Fabric's wrapper of "
                            f"one), got {type(optimizer).__name__}")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"StabilityGuard: scheduler must have a step() method, got {type(scheduler).__name__}")
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm)
                                         and max_norm > 0):
            raise ValueError(f"StabilityGuard: max_norm must be a finite number > 0 or None, got {max_norm!r}")
        if window < 2:
            raise ValueError(f"StabilityGuard: window must be >= 2, got {window}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"StabilityGuard: threshold must be a finite number > 0, got {threshold}")
        min_history = window // 2 if min_history is None else min_history
        if not 1 <= min_history <= window:
            raise ValueError(f"StabilityGuard: min_history must be in [1, window={window}], got {min_history}")
        if max_consecutive < 1:
            raise ValueError(f"StabilityGuard: max_consecutive must be >= 1, got {max_consecutive}")
        if log_every < 1:
            raise ValueError(f"StabilityGuard: log_every must be >= 1, got {log_every}")
        if layer_norms is not None and not isinstance(_unwrap_module(layer_norms), torch.nn.Module):
            raise TypeError(f"StabilityGuard: layer_norms must be a torch.nn.Module, got {type(layer_norms).__name__}")
        self._layers = None if layer_norms is None else LayerIndex(_unwrap_module(layer_norms))
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.fabric = fabric
        self.max_norm = None if max_norm is None else float(max_norm)
        self.nonfinite = bool(nonfinite)
        self.spike = bool(spike)
        self.threshold = float(threshold)
        self.min_history = int(min_history)
        self.monitor_grad_norm = bool(monitor_grad_norm)
        self.max_consecutive = int(max_consecutive)
        self.log_every = int(log_every)
        self.snapshot_device = snapshot_device
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.steps = 0
        self.consecutive = 0
        self.nonfinite_steps = 0
        self.spike_steps = 0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "steps": self.steps,
                "consecutive": self.consecutive, "nonfinite_steps": self.nonfinite_steps,
                "spike_steps": self.spike_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(float(x) for x in state.get("losses", []))
        self.grad_norms.clear()
        self.grad_norms.extend(float(x) for x in state.get("grad_norms", []))
        for key in ("steps", "consecutive", "nonfinite_steps", "spike_steps"):
            setattr(self, key, int(state.get(key, 0)))

    # ---------------------------------------------------------------- the step
    def step(self, loss: Tensor | float) -> dict[str, float]:
        """One optimizer step after ``backward(loss)`` (module docstring); returns the metrics due this step."""
        opt = _unwrap(self.optimizer)
        scaler = getattr(getattr(getattr(self.fabric, "strategy", None), "precision", None), "scaler", None)
        if scaler is not None:  # fp16: true norms; the scaler records its inf check now, before any drop zeroes
            scaler.unscale_(opt)  # the gradients, and skips the step and lowers its scale (fused optimizers too)
        grads = step_grads(opt)
        device = local(grads[0]).device if grads else torch.device("cpu")
        loss_t = torch.as_tensor(loss.detach() if isinstance(loss, Tensor) else loss).float().reshape(()).to(device)
        per_grad = (reduce_squared(squared_norms(grads), grads, sharded_plain=_is_flat_sharded(self.fabric))
                    if grads else torch.zeros(0, device=device))
        sq = per_grad.sum()
        norm = sq.sqrt()
        coef = clip_coefficient(norm, self.max_norm) if self.max_norm is not None else torch.ones_like(norm)
        bad = ~torch.isfinite(loss_t) | ~torch.isfinite(sq)
        spiked = torch.zeros((), dtype=torch.bool, device=device)
        if self.spike:
            spiked = spike_test(loss_t, self.losses, self.threshold, self.min_history)[0]
        if self.spike and self.monitor_grad_norm:
            spiked = spiked | spike_test(norm, self.grad_norms, self.threshold, self.min_history)[0]
        due = self.steps % self.log_every == 0
        layer_norm = self._layer_norms(opt, per_grad) if due and self._layers is not None else None
        if self.nonfinite or self.spike or due:  # the one host read of the step
            flags = self._reduce(torch.stack([bad.float(), spiked.float()]))
            parts = [flags, torch.stack([loss_t, norm, norm * coef])]
            host = torch.cat(parts + ([layer_norm.to(device)] if layer_norm is not None else [])).tolist()
            bad_any, spike_any, loss_v, norm_v, after_v = host[:5]
            layer_v = host[5:]
            is_bad, is_spike = bad_any > 0, spike_any > 0
        else:
            is_bad = is_spike = False
            loss_v = norm_v = after_v = math.nan
        drop = (self.nonfinite and is_bad) or (self.spike and (is_spike or is_bad))
        if drop:
            self._drop(opt, is_bad and self.nonfinite, loss_v)
        else:
            self.consecutive = 0
            if self.max_norm is not None and grads:
                torch._foreach_mul_([local(g) for g in grads], coef.to(local(grads[0]).device))
            self.optimizer.step()
            if math.isfinite(loss_v):
                self.losses.append(loss_v)
            if self.monitor_grad_norm and math.isfinite(norm_v):
                self.grad_norms.append(norm_v)
        if self.scheduler is not None:
            self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        self.steps += 1
        if not due:
            return {}
        metrics = {"train/loss": loss_v, "train/grad_norm": norm_v,
                   "train/grad_norm_clipped": norm_v if drop else after_v, "train/lr": float(opt.param_groups[0]["lr"]),
                   "stability/skipped": float(drop), "stability/nonfinite_steps": float(self.nonfinite_steps),
                   "stability/spike_steps": float(self.spike_steps)}
        if layer_norm is not None:
            metrics.update({f"norms/grad/{name}": v for name, v in zip(self._layers.layers, layer_v)})
        return metrics

    def _layer_norms(self, opt: torch.optim.Optimizer, per_grad: Tensor) -> Tensor:
        """Per-layer ``sqrt(Σ ‖g_i‖²)`` over the layer's parameters, on device (parameters outside the module are
        not reported; a parameter without a gradient counts 0)."""
        index = self._layers
        pos = {id(p): i for i, p in enumerate(index.params)}
        stepped = [pos.get(id(p)) for g in opt.param_groups for p in g["params"] if p.grad is not None]
        keep = [j for j, i in enumerate(stepped) if i is not None]
        vec = torch.zeros(len(index.params), device=per_grad.device)
        if keep:
            where = torch.tensor([stepped[j] for j in keep], device=per_grad.device)
            vec.index_copy_(0, where, per_grad[torch.tensor(keep, device=per_grad.device)])
        return index.per_layer(vec).sqrt()

    def _reduce(self, flags: Tensor) -> Tensor:
        """Sum the per-rank flags over the ranks: a condition on any rank holds on all."""
        if self.fabric is not None:
            return self.fabric.all_reduce(flags, reduce_op="sum") if self.fabric.world_size > 1 else flags
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return flags

    def _drop(self, opt: torch.optim.Optimizer, nonfinite: bool, loss: float) -> None:
        self.consecutive += 1
        kind = "non-finite loss or gradient" if nonfinite else "loss spike"
        if nonfinite:
            self.nonfinite_steps += 1
        else:
            self.spike_steps += 1
        if self.consecutive >= self.max_consecutive:
            opt.zero_grad(set_to_none=True)
            raise TrainingUnstableError(
                f"StabilityGuard: {self.consecutive} dropped optimizer steps in a row (the last, step {self.steps}, "
                f"a {kind}); training stopped without applying it. The weights and optimizer state are those "
                "before the first of these steps. Lower the learning rate, tighten clipping or check the data.")
        gate = StepGate.of(opt, self.snapshot_device)
        gate.drop()
        self.optimizer.step()
        StepGate.finish_all([opt])  # a GradScaler that skipped the step never ran the gate's post-hook
        warnings.warn(f"StabilityGuard: {kind} at step {self.steps} (loss {loss:.4g}); the step was dropped on every "
                      f"rank ({self.consecutive} in a row)", RuntimeWarning, stacklevel=3)

"""LayerNormMonitor: per-layer gradient, weight and update norms (and optimizer-state norms) every N steps.

Example::

    from lightning_optim.callbacks import LayerNormMonitor

    trainer = L.Trainer(callbacks=[LayerNormMonitor(every_n_steps=50, histograms=False)],
                        logger=L.pytorch.loggers.TensorBoardLogger("lightning_logs"))
    # TensorBoard: norms/grad/<layer>, norms/weight/<layer>, norms/update/<layer>, norms/update_ratio/<layer>,
    #              norms/state_<key>/<layer> (e.g. exp_avg), and the totals norms/grad/_total ...

A layer is a module that owns parameters directly (a Linear's weight and bias together; ``group_by="parameter"``
reports each parameter). On a logging step:

- ``on_before_optimizer_step`` (gradients complete, after any clipping callback placed before this one): the
  squared norms of the local gradients, weights and the optimizer's per-parameter state tensors named in
  ``state_keys`` that are present (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer`` by default) come from one
  ``torch._foreach_norm`` each; a copy of the weights is kept for this step only.
- ``on_train_batch_end`` (after the step, and after a skip or rollback restored the weights): the squared
  norms of ``w_after - w_before``; then the per-parameter squared norms are summed per layer with ``index_add_`` on device,
  stacked into one matrix, summed across ranks with one ``all_reduce`` when the parameters are sharded (FSDP2
  local shards; FSDP1 flat shards; DDP needs none: everything is replicated), brought to the host once, and
  written to every logger on rank zero (``logger.log_metrics``), with optional TensorBoard histograms of the
  per-layer norms.

Between logging steps the callback does nothing, so at ``every_n_steps=50`` its cost is a small fraction of a
percent of the step time (``benchmarks/monitor_overhead.py``). ``last_metrics`` holds the last logged values.
``state_dict``: nothing is needed to resume (the schedule is a function of ``global_step``); it stores the
settings for reference.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_optim.callbacks._norms import LayerIndex, is_fsdp1, local, reduce_squared, squared_norms

__all__ = ["LayerNormMonitor"]


class LayerNormMonitor(Callback):
    """Log per-layer grad / weight / update norms, update-to-weight ratios and optimizer-state norms.

    Args:
        every_n_steps: log on optimizer steps whose index (``global_step`` before the step) is a multiple of it.
        group_by: ``"module"`` (default) or ``"parameter"``.
        state_keys: optimizer state entries to report when present and shaped like the parameter.
        histograms: also write TensorBoard histograms of the per-layer norms (TensorBoardLogger only).
        prefix: the metric prefix (``norms``).
        enabled: ``False`` makes the callback do nothing at all (for recipes that add it by default).
    """

    def __init__(self, every_n_steps: int = 50, group_by: str = "module",
                 state_keys: Sequence[str] = ("exp_avg", "exp_avg_sq", "momentum_buffer"),
                 histograms: bool = False, prefix: str = "norms", enabled: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if group_by not in ("module", "parameter"):
            raise ValueError(f"group_by must be 'module' or 'parameter', got {group_by!r}")
        self.every_n_steps = every_n_steps
        self.group_by = group_by
        self.state_keys = tuple(state_keys)
        self.histograms = histograms
        self.prefix = prefix
        self.enabled = bool(enabled)
        self.last_metrics: dict[str, float] = {}
        self._index: LayerIndex | None = None
        self._pending: dict[str, Tensor] | None = None
        self._before: list[Tensor] | None = None
        self._step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "group_by": self.group_by}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # settings come from the constructor; nothing else is needed to resume

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled:
            self._index = LayerIndex(pl_module, by=self.group_by)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if not self.enabled:
            return
        self._step = trainer.global_step
        if self._step % self.every_n_steps != 0 or self._index is None:
            self._pending = None
            return
        params = self._index.params
        zeros = [torch.zeros_like(local(p)) for p in params if p.grad is None] if any(
            p.grad is None for p in params) else []
        it = iter(zeros)
        grads = [p.grad if p.grad is not None else next(it) for p in params]
        pending = {
            "grad": squared_norms(grads),
            "weight": squared_norms(params),
        }
        state = optimizer.state
        for key in self.state_keys:
            tensors, where = [], []
            for i, p in enumerate(params):
                value = state.get(p, {}).get(key) if p in state else None
                if isinstance(value, Tensor) and local(value).numel() == local(p).numel():
                    tensors.append(value)
                    where.append(i)
            if tensors:
                sq = torch.zeros(len(params), device=pending["grad"].device)
                sq.index_copy_(0, torch.tensor(where, device=sq.device), squared_norms(tensors).to(sq.device))
                pending[f"state_{key}"] = sq
        with torch.no_grad():
            self._before = [local(p.detach()).clone() for p in params]
        self._pending = pending

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pending, self._pending = self._pending, None
        before, self._before = self._before, None
        if pending is None:  # not a logging step, or disabled
            return
        with torch.no_grad():  # after the step (and after any restore by a skip or a rollback)
            pending["update"] = squared_norms(torch._foreach_sub([local(p.detach()) for p in self._index.params],
                                                                 before))
        params = self._index.params
        kinds = list(pending)
        device = pending["grad"].device
        per_param = torch.stack([pending[k].to(device) for k in kinds])             # (kinds, params)
        # one all-reduce for everything (sharded parameters only); replicated ones come back unchanged
        if _any_sharded(params, trainer):
            flat = reduce_squared(per_param.T.reshape(-1), _repeat_rows(params, len(kinds)),
                                  sharded_plain=is_fsdp1(trainer))
            per_param = flat.reshape(len(params), len(kinds)).T
        per_layer = self._index.per_layer(per_param)                                   # (kinds, layers)
        totals = per_param.sum(dim=1, keepdim=True)
        table = torch.cat([per_layer, totals], dim=1).sqrt().cpu()                     # one host transfer
        self._emit(trainer, kinds, table, step=self._step)

    @rank_zero_only
    def _emit(self, trainer: Any, kinds: list[str], table: Tensor, step: int) -> None:
        names = self._index.layers + ["_total"]
        values = table.tolist()
        metrics: dict[str, float] = {}
        for k, row in zip(kinds, values):
            for name, v in zip(names, row):
                metrics[f"{self.prefix}/{k}/{name}"] = v
        if "update" in kinds:
            upd, wgt = values[kinds.index("update")], values[kinds.index("weight")]
            for name, u, w in zip(names, upd, wgt):
                metrics[f"{self.prefix}/update_ratio/{name}"] = u / w if w > 0 else 0.0
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if self.histograms and hasattr(getattr(logger, "experiment", None), "add_histogram"):
                for k, row in zip(kinds, table[:, :-1]):
                    logger.experiment.add_histogram(f"{self.prefix}_hist/{k}", row, global_step=trainer.global_step)


def _any_sharded(params: list[Tensor], trainer: Any) -> bool:
    from lightning_optim.callbacks._norms import shard_group

    return is_fsdp1(trainer) or any(shard_group(p) is not None for p in params)


def _repeat_rows(params: list[Tensor], k: int) -> list[Tensor]:
    """The parameter list with each entry repeated k times, matching a (params, k) matrix flattened row-major."""
    return [p for p in params for _ in range(k)]

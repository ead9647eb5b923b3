"""``SophiaHessian``: Sophia-G's Gauss–Newton–Bartlett pass every ``hessian_interval`` optimizer steps.

After the optimizer step whose number (``trainer.global_step``) is a multiple of ``hessian_interval``, on the
batch just trained on (as Liuhong99/Sophia's ``train_sophiag.py``)::

    logits = pl_module.logits_for_batch(batch)          # forward with autograd (lightning_optim.protocols)
    ŷ ~ softmax(logits)                                  # labels sampled from the model itself
    CE(logits, ŷ).backward()                             # mean over tokens
    ĝ averaged over data-parallel ranks                  # DDP: one all-reduce of a flattened buffer
    optimizer.update_hessian(bs=tokens per step)         # h = β2·h + (1-β2)·ĝ²
    gradients zeroed again

The module's own forward is called directly, so DDP's gradient hooks do not run; the callback averages the
gradients itself (one all-reduce). Under FSDP2 (``fully_shard``) the forward and backward hooks belong to the
modules, so the gradients arrive as already-averaged ``DTensor`` shards and nothing more is needed.

``bs`` (tokens per optimizer step) is filled in at the first pass when the optimizer was built with
``bs=None``: tokens of the batch × data-parallel ranks × ``accumulate_grad_batches``.

The :class:`~lightning_optim.OptimizerMixin` adds this callback automatically for ``sophia``; by hand::

    trainer = L.Trainer(callbacks=[SophiaHessian()])   # interval read from the optimizer (default 10)

The callback marks every Sophia optimizer it drives in ``on_fit_start``; a Sophia optimizer stepped in a
Trainer without that mark raises at its first step (:mod:`lightning_optim.optim._needs_callback`).

Cost: one extra forward and backward every ``hessian_interval`` steps (``benchmarks/sophia_cost.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_optim._dtensor import is_dtensor
from lightning_optim.optim._needs_callback import mark_driven

__all__ = ["SophiaHessian"]


def _sophia_optimizers(trainer: Any) -> list[Any]:
    found = []
    for opt in trainer.optimizers:
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer wraps the real one
        if callable(getattr(opt, "update_hessian", None)):
            found.append(opt)
    return found


class SophiaHessian(Callback):
    """Runs the Gauss–Newton–Bartlett Hessian pass of every optimizer with ``update_hessian`` (Sophia-G).

    Args:
        hessian_interval: steps between passes; ``None`` reads the optimizer's ``hessian_interval``.
        sample_fn: ``logits (N, vocab) -> labels (N,)``; default samples ``ŷ ~ softmax(logits)``
            (``torch.multinomial``). A deterministic one (argmax) makes runs comparable across world sizes.
    """

    def __init__(self, hessian_interval: int | None = None, sample_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if hessian_interval is not None and (int(hessian_interval) != hessian_interval or hessian_interval < 1):
            raise ValueError(f"hessian_interval must be an integer >= 1, got {hessian_interval!r}")
        self.hessian_interval = hessian_interval
        self.sample_fn = sample_fn
        self._last_step = -1
        self.passes: list[int] = []  # global steps after which a pass ran (this process)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = _sophia_optimizers(trainer)
        if optimizers and not callable(getattr(pl_module, "logits_for_batch", None)):
            raise TypeError(
                f"{type(pl_module).__name__} must implement logits_for_batch(batch) -> logits (batch, ..., vocab) "
                "for Sophia-G's Hessian pass (see lightning_optim.protocols.LogitsModel)"
            )
        for opt in optimizers:
            mark_driven(opt, type(self).__name__)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step <= 0 or step == self._last_step:
            return  # no optimizer step since the last call (gradient accumulation) or none yet
        optimizers = _sophia_optimizers(trainer)
        if not optimizers:
            return
        interval = self.hessian_interval or int(getattr(optimizers[0], "hessian_interval", 10))
        if step % interval != 0:
            return
        self._last_step = step
        self.hessian_pass(trainer, pl_module, batch, optimizers)
        self.passes.append(step)

    def hessian_pass(self, trainer: Any, pl_module: Any, batch: Any, optimizers: list[Any]) -> None:
        if not callable(getattr(pl_module, "logits_for_batch", None)):
            raise TypeError(
                f"{type(pl_module).__name__} must implement logits_for_batch(batch) for Sophia-G's Hessian pass "
                "(see lightning_optim.protocols.LogitsModel)"
            )
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        plugin = getattr(trainer, "precision_plugin", None) or getattr(trainer.strategy, "precision_plugin", None)
        ctx = plugin.forward_context() if plugin is not None else torch.enable_grad()
        was_training = pl_module.training
        pl_module.train()
        from lightning_optim.callbacks.z_loss import z_loss_paused  # the estimate is of the CE Hessian alone

        with torch.enable_grad(), ctx, z_loss_paused():
            logits = pl_module.logits_for_batch(batch)
            flat = logits.reshape(-1, logits.shape[-1]).float()
            with torch.no_grad():
                if self.sample_fn is not None:
                    sampled = self.sample_fn(flat.detach())
                else:
                    sampled = torch.multinomial(torch.softmax(flat, dim=-1), 1).squeeze(-1)
            loss = F.cross_entropy(flat, sampled)
        loss.backward()
        pl_module.train(was_training)
        world = self._average_gradients(pl_module)
        tokens = flat.shape[0] * world * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        for opt in optimizers:
            opt.update_hessian(bs=tokens)
            opt.zero_grad(set_to_none=True)

    @staticmethod
    def _average_gradients(pl_module: Any) -> int:
        """Average plain-tensor gradients over the default process group (DTensor grads already are)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        world = torch.distributed.get_world_size()
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if world == 1 or not grads:
            return world
        if any(is_dtensor(g) for g in grads):
            return world  # FSDP2: reduce-scattered (averaged) by fully_shard's hooks
        flat = torch._utils._flatten_dense_tensors(grads)
        flat.div_(world)
        torch.distributed.all_reduce(flat)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
        return world

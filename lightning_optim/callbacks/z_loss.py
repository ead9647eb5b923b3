"""ZLoss: PaLM's auxiliary ``alpha·mean(logsumexp(logits)²)`` without touching ``training_step``.

Example::

    from lightning_optim.callbacks import ZLoss

    trainer = L.Trainer(callbacks=[ZLoss(alpha=1e-4)])   # OLMo 2 used 1e-5
    trainer.fit(model)                                   # logs train/z_loss and train/logsumexp

    # or, in your own loss:
    from lightning_optim.callbacks.z_loss import z_loss
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + z_loss(logits, alpha=1e-4)

How it works: a forward hook on the output head (:func:`lightning_optim.protocols.find_output_head`: the
module's ``output_head()`` or a child named ``lm_head``/``output``/``head``) passes the logits through an
identity autograd function. Its forward computes ``lse = logsumexp(logits)`` once in float32 (for logging, and
saved for backward); its backward adds the z-loss gradient to the incoming gradient::

    d/d logits [alpha · mean_tokens(lse²)] = alpha · 2·lse/N · softmax(logits)

with ``N`` the number of positions (all of them: the mean is over every row of the logits, padding included)
and an extra ``1/accumulate_grad_batches``, because Lightning divides the loss of each micro-batch by that.
The gradient equals that of ``cross_entropy + alpha·mean(lse²)`` written by hand. The hook acts only during
training forward passes with autograd on (not validation, not ``no_grad``), and not inside
:func:`z_loss_paused` (which an extra forward pass, such as Sophia's Hessian estimate, can use).
If the logits come out of the head in several calls per step (several forward passes), each call gets the
z-loss of its own positions.

``state_dict``: ``alpha`` (so a resumed run keeps the value it was started with unless changed explicitly).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_optim.protocols import find_output_head

__all__ = ["ZLoss", "z_loss", "z_loss_paused"]

_state = threading.local()


@contextlib.contextmanager
def z_loss_paused() -> Iterator[None]:
    """Forward passes inside this block get no z-loss (for extra passes such as a Hessian estimate)."""
    depth = getattr(_state, "paused", 0)
    _state.paused = depth + 1
    try:
        yield
    finally:
        _state.paused = depth


def _paused() -> bool:
    return getattr(_state, "paused", 0) > 0


def z_loss(logits: Tensor, alpha: float = 1e-4) -> Tensor:
    """``alpha · mean(logsumexp(logits, -1)²)`` in float32, for adding to a loss by hand."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    return alpha * lse.pow(2).mean()


class _AddZLossGrad(torch.autograd.Function):
    """Identity in forward; backward adds ``scale · 2·lse · softmax(logits)`` (``scale = alpha/(N·accum)``)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, lse: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(logits, lse)
        ctx.scale = scale
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        logits, lse = ctx.saved_tensors
        lse = lse.unsqueeze(-1)
        extra = torch.exp(logits.float() - lse).mul_(lse * (2.0 * ctx.scale))
        if grad_output is None:
            return extra.to(logits.dtype), None, None
        return (grad_output.float() + extra).to(grad_output.dtype), None, None


class ZLoss(Callback):
    """Add ``alpha·mean(logsumexp(logits)²)`` to the training gradients through a hook on the output head.

    Args:
        alpha: the z-loss weight (PaLM 1e-4; OLMo 2 1e-5).
        log: log ``train/z_loss`` (the mean over the micro-batches of a step) and ``train/logsumexp``.
    """

    def __init__(self, alpha: float = 1e-4, log: bool = True) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.log = log
        self._handle: Any = None
        self._trainer: Any = None
        self._pl_module: Any = None
        self._sum_z: Tensor | None = None
        self._sum_lse: Tensor | None = None
        self._calls = 0

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alpha = float(state_dict.get("alpha", self.alpha))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._handle is not None:
            return
        self._trainer, self._pl_module = trainer, pl_module
        head = find_output_head(pl_module)
        self._handle = head.register_forward_hook(self._hook)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _active(self) -> bool:
        trainer, module = self._trainer, self._pl_module
        return (
            self.alpha > 0 and not _paused() and torch.is_grad_enabled()
            and module is not None and module.training and trainer is not None and trainer.training
        )

    def _hook(self, module: Any, inputs: Any, output: Any) -> Any:
        if not isinstance(output, Tensor) or not self._active() or not output.requires_grad:
            return None
        with torch.no_grad():
            lse = torch.logsumexp(output.detach().float(), dim=-1)
            lse_sq_mean = lse.pow(2).mean()
            z = self.alpha * lse_sq_mean
            self._sum_z = z if self._sum_z is None else self._sum_z + z
            mean_lse = lse.mean()
            self._sum_lse = mean_lse if self._sum_lse is None else self._sum_lse + mean_lse
            self._calls += 1
        positions = max(lse.numel(), 1)
        accumulate = max(int(getattr(self._trainer, "accumulate_grad_batches", 1) or 1), 1)
        return _AddZLossGrad.apply(output, lse, self.alpha / (positions * accumulate))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._calls and self.log:
            pl_module.log("train/z_loss", self._sum_z / self._calls, on_step=True, on_epoch=False)
            pl_module.log("train/logsumexp", self._sum_lse / self._calls, on_step=True, on_epoch=False)
        self._sum_z = self._sum_lse = None
        self._calls = 0

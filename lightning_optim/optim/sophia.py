"""Sophia-G: a clipped diagonal-Newton step with a Gauss–Newton–Bartlett Hessian estimate (``sophia``).

Liu, Li, Hall, Liang & Ma 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (arXiv 2305.14342); reference code Liuhong99/Sophia (``sophia.py``, ``train_sophiag.py``).

Every optimizer step (``t`` counts from 1)::

    p *= 1 - lr·wd
    m  = β1·m + (1-β1)·g
    p -= lr · sign(m) · min(|m| / (ρ·bs·h + 1e-15), 1)

and every ``hessian_interval`` steps, *after* the normal step, on a fresh backward pass of the loss
``CE(logits, ŷ)`` with labels sampled from the model's own predictions ``ŷ ~ softmax(logits)`` (mean over
tokens, gradient averaged over data-parallel ranks)::

    h = β2·h + (1-β2)·ĝ²          (Gauss–Newton–Bartlett: E[ĝ²] is the Gauss–Newton diagonal / bs)

:meth:`SophiaG.update_hessian` does the ``h`` update from ``p.grad``; in a Lightning run the
:class:`~lightning_optim.callbacks.SophiaHessian` callback (added automatically by the
:class:`~lightning_optim.OptimizerMixin`) drives the extra pass through the module's
``logits_for_batch(batch)`` (:mod:`lightning_optim.protocols`).

**A missing Hessian pass is an error, not a silent sign-SGD run.** Inside a Lightning Trainer the first
``step()`` raises ``RuntimeError`` when no :class:`~lightning_optim.callbacks.SophiaHessian` callback marked
the optimizer (:mod:`lightning_optim.optim._needs_callback`: LightningCLI's ``--optimizer`` and a hand-written
``configure_optimizers`` add none). In a plain loop (or Fabric), the step after this optimizer object has
taken ``hessian_interval`` steps with :meth:`SophiaG.update_hessian` never called on it warns once
(``RuntimeWarning``, naming what to call): a loop must call it every ``hessian_interval`` steps (a resumed object
gets ``hessian_interval`` steps again). It warns rather than raises because stepping with ``h = 0`` is a
well-defined first-order method (momentum sign steps) that generic harnesses use. A run driven by the callback
skips that count: the callback keeps its own cadence.

``bs`` is the number of tokens per optimizer step (the reference passes ``total_bs · block_size`` to
``step``). ``bs=None`` (default) lets the callback fill it in at the first Hessian pass (tokens of the batch
× data-parallel ranks × gradient-accumulation steps); it only matters once ``h`` is non-zero, and before the
first Hessian pass ``h = 0`` makes every coordinate take the full sign step ``lr·sign(m)``.

State per parameter: ``exp_avg`` (m) and ``hessian`` (h), both parameter-sized (float32 for low-precision
parameters), plus a scalar ``step``. Defaults are the benchmark's (Semenov et al. 2025): lr 1e-3, betas
(0.9, 0.999), ρ 0.04, weight decay 0.1, Hessian every 10 steps.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from lightning_optim.optim._closure import evaluate_closure
from lightning_optim.optim._needs_callback import is_driven, require_callback

__all__ = ["SophiaG"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


class SophiaG(torch.optim.Optimizer):
    """Sophia-G (see the module docstring for the math).

    Args:
        lr, betas, weight_decay: as torch.optim.AdamW (decoupled weight decay ``p *= 1 - lr·wd``); ``betas[1]``
            is the Hessian EMA's β2.
        rho: ρ, the clipping threshold scale (the reference's ``rho``).
        bs: tokens per optimizer step (``None``: filled in by the SophiaHessian callback).
        hessian_interval: steps between Gauss–Newton–Bartlett passes (read by the callback).
        maximize: ascend instead of descend.
        foreach: use the multi-tensor path (default: on, except when parameters are on different devices).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        bs: int | None = None,
        hessian_interval: int = 10,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not rho >= 0.0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if bs is not None and (isinstance(bs, bool) or not bs > 0):
            raise ValueError(f"bs (tokens per optimizer step) must be a positive number or None, got {bs!r}")
        if isinstance(hessian_interval, bool) or int(hessian_interval) != hessian_interval or hessian_interval < 1:
            raise ValueError(f"hessian_interval must be an integer >= 1, got {hessian_interval!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs,
            hessian_interval=int(hessian_interval), maximize=maximize, foreach=foreach,
        )
        super().__init__(params, defaults)
        self._steps_without_hessian = 0  # steps this object took before its first update_hessian (then None)

    # -- state ---------------------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            dtype = _state_dtype(p)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @property
    def hessian_interval(self) -> int:
        return int(self.param_groups[0]["hessian_interval"]) if self.param_groups else 10

    @torch.no_grad()
    def update_hessian(self, bs: int | None = None) -> None:
        """``h = β2·h + (1-β2)·ĝ²`` with ``ĝ = p.grad`` (the gradient of the sampled-label loss).

        ``bs`` (tokens per optimizer step) is stored in every group whose ``bs`` is still ``None``.
        """
        self._steps_without_hessian = None
        for group in self.param_groups:
            if bs is not None and group["bs"] is None:
                group["bs"] = bs
            if group["bs"] is None:
                raise ValueError(
                    "SophiaG needs bs (tokens per optimizer step) before the Hessian estimate is used: pass "
                    "bs=... to the optimizer or to update_hessian(bs=...)"
                )
            beta2 = group["betas"][1]
            hs, gs = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                g = p.grad
                if g.dtype != state["hessian"].dtype:
                    g = g.to(state["hessian"].dtype)
                hs.append(state["hessian"])
                gs.append(g)
            if not hs:
                continue
            if _use_foreach(group, hs):
                torch._foreach_mul_(hs, beta2)
                torch._foreach_addcmul_(hs, gs, gs, value=1 - beta2)
            else:
                for h, g in zip(hs, gs):
                    h.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_hessian_driven()
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params, grads, ms, hs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients")
                state = self._init_state(p)
                state["step"] += 1
                params.append(p)
                g = p.grad
                if g.dtype != state["exp_avg"].dtype:
                    g = g.to(state["exp_avg"].dtype)
                grads.append(g)
                ms.append(state["exp_avg"])
                hs.append(state["hessian"])
            if params:
                _sophia_update(params, grads, ms, hs, group, _use_foreach(group, params))
        return loss


    def _check_hessian_driven(self) -> None:
        """Refuse a Trainer run without SophiaHessian; warn on a loop that never updates h (module docstring)."""
        require_callback(self, "lightning_optim.callbacks.SophiaHessian",
                         "its Hessian estimate would stay 0 and every step would be a plain sign step")
        count = getattr(self, "_steps_without_hessian", None)  # absent on an object unpickled from before
        if count is None or is_driven(self):
            return
        if count >= self.hessian_interval:
            warnings.warn(
                f"SophiaG has taken {count} steps (hessian_interval={self.hessian_interval}) and update_hessian() "
                "was never called: its Hessian estimate is still 0, so every step is a plain sign step. In a "
                "plain loop, after every hessian_interval-th step, backpropagate the loss on labels sampled from "
                "the model (CE(logits, multinomial(softmax(logits)))) and call optimizer.update_hessian(bs=tokens "
                "per step); in Lightning add lightning_optim.callbacks.SophiaHessian", RuntimeWarning, stacklevel=3)
            self._steps_without_hessian = None  # warned once
            return
        self._steps_without_hessian = count + 1


def _use_foreach(group: dict[str, Any], tensors: list[torch.Tensor]) -> bool:
    if group.get("foreach") is not None:
        return bool(group["foreach"])
    return len({(t.device, type(t)) for t in tensors}) == 1


def _sophia_update(params, grads, ms, hs, group, foreach: bool) -> None:
    beta1 = group["betas"][0]
    lr, wd, rho = group["lr"], group["weight_decay"], group["rho"]
    bs = group["bs"] if group["bs"] is not None else 1.0  # h = 0 until the first Hessian pass sets bs
    if group["maximize"]:
        grads = torch._foreach_neg(grads) if foreach else [-g for g in grads]
    low = [p for p in params if p.dtype in _LOW_PRECISION]
    work = [p.float() if p.dtype in _LOW_PRECISION else p for p in params]
    if foreach:
        if wd != 0:
            torch._foreach_mul_(work, 1 - lr * wd)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1 - beta1)
        denom = torch._foreach_mul(hs, rho * bs)
        torch._foreach_add_(denom, 1e-15)
        ratio = torch._foreach_abs(ms)
        torch._foreach_div_(ratio, denom)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_addcmul_(work, torch._foreach_sign(ms), ratio, value=-lr)
    else:
        for p, g, m, h in zip(work, grads, ms, hs):
            if wd != 0:
                p.mul_(1 - lr * wd)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp_(max=1.0)
            p.addcmul_(m.sign(), ratio, value=-lr)
    if low:
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)


"""The closure convention of ``torch.optim``: ``step(closure)`` re-runs the forward and backward pass itself.

Every optimizer's ``step`` is decorated with ``@torch.no_grad()``, so the closure (which computes a loss and calls
``backward``) must run with gradients re-enabled; its return value is the loss ``step`` returns.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["evaluate_closure"]


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """``closure()`` with gradients enabled, or ``None`` without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()

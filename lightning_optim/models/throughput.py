"""Deprecated location of :class:`~lightning_optim.callbacks.TokenThroughput` (a callback, so it lives in
:mod:`lightning_optim.callbacks.throughput` now). Importing it from here still works for one release, with a
``DeprecationWarning`` naming the new path."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["TokenThroughput"]


def __getattr__(name: str) -> Any:
    if name == "TokenThroughput":
        warnings.warn(
            "lightning_optim.models.throughput.TokenThroughput (and lightning_optim.models.TokenThroughput) moved "
            "to lightning_optim.callbacks.TokenThroughput; the old import path goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from lightning_optim.callbacks.throughput import TokenThroughput

        return TokenThroughput
    raise AttributeError(f"module 'lightning_optim.models.throughput' has no attribute {name!r}")

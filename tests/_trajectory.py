"""Trajectory checks shared by the optimizer tests: an optimizer against its update written plainly in float64.

The gradients depend on the current weights (``g = 0.5·(x - target) + noise_t``), so a wrong step changes every
later gradient; the noise is a pure function of (step, tensor index), so both sides see the same data.
"""

from __future__ import annotations

from typing import Callable

import torch


def gradient(x: torch.Tensor, step: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + index)
    target = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
    return 0.5 * (x.double() - target) + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def run_optimizer(make: Callable, weights: list[torch.Tensor], steps: int, dtype=torch.float32,
                  groups: Callable | None = None) -> list[torch.Tensor]:
    """``make(params or groups(params))`` stepped ``steps`` times from ``weights``; the final weights in float64."""
    params = [torch.nn.Parameter(w.to(dtype)) for w in weights]
    opt = make(params if groups is None else groups(params))
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = gradient(p.detach(), t, i).to(dtype)
        opt.step()
    return [p.detach().double() for p in params]


def run_reference(update: Callable, weights: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """``update(i, x, g, state, t)`` returns the new ``x`` (float64); ``state`` is a dict per tensor."""
    xs = list(weights)
    states: list[dict] = [{} for _ in xs]
    for t in range(1, steps + 1):
        xs = [update(i, x, gradient(x, t, i), states[i], t) for i, x in enumerate(xs)]
    return xs


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))

"""Shared pieces of the per-tensor optimizers (LAMB, StableAdamW, Adam-mini, GaLore, APOLLO).

These optimizers update one parameter tensor at a time in float32 (``up``), write the result back in the
parameter's dtype (``write_back``) and keep a per-parameter step count ``state["step"]`` as a 0-d CPU float32
tensor, as torch.optim does, so every state entry is a plain tensor and a state dict round-trips through
``torch.save`` / ``torch.load(weights_only=True)``.

FSDP2 ``DTensor`` parameters: ``local`` returns the shard (a view sharing storage, so in-place writes reach
the DTensor) and ``shard_sum`` all-reduces a per-tensor sum over the mesh dimensions the parameter is
sharded on, which is what a rule needing a whole-tensor norm or mean (LAMB, StableAdamW) needs to be exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_optim._dtensor import DTensor, is_dtensor, is_sharded, local
from lightning_optim.param_groups import LARGE_ROWS

__all__ = ["is_dtensor", "local", "shard_sum", "up", "write_back", "next_step", "check_finite_number",
           "check_positive", "check_nonneg", "check_count", "check_betas", "is_matrix_param"]


def shard_sum(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``x`` (a float32 tensor of per-shard sums of ``p``) summed over every mesh dimension ``p`` is sharded on."""
    if not is_sharded(p):
        return x
    import torch.distributed as dist

    for dim, pl in enumerate(p.placements):
        if pl.is_shard():
            dist.all_reduce(x, group=p.device_mesh.get_group(dim))
    return x


def up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32: the tensor itself when it already is (so in-place ops write through)."""
    return t if t.dtype == torch.float32 else t.float()


def write_back(dst: torch.Tensor, value: torch.Tensor) -> None:
    """Store ``value`` into ``dst`` unless it is ``dst`` itself (the float32 case, already written)."""
    if value is not dst:
        dst.copy_(value)


def next_step(state: dict[str, Any]) -> int:
    """Advance and return the parameter's step count (1 at the first update)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["step"] += 1
    return int(state["step"].item())  # a CPU scalar: no device synchronisation


def is_matrix_param(group: dict[str, Any], p: torch.Tensor) -> bool:
    """A group's ``matrix`` flag (set by the default grouping) or, without one, the rule for unnamed tensors:
    >= 2 dimensions and fewer than ``LARGE_ROWS`` rows (an embedding- or head-sized matrix is not a hidden layer)."""
    flag = group.get("matrix")
    return bool(flag) if flag is not None else (p.ndim >= 2 and int(p.shape[0]) < LARGE_ROWS)


# ----------------------------------------------------------------------------------------------------------
# Hyperparameter checks: each error names the field


def check_finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive(**values: Any) -> None:
    for name, value in values.items():
        if check_finite_number(name, value) <= 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def check_nonneg(**values: Any) -> None:
    for name, value in values.items():
        if check_finite_number(name, value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_betas(betas: Any, n: int = 2, name: str = "betas") -> tuple[float, ...]:
    try:
        values = tuple(betas)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {n} numbers in [0, 1), got {betas!r}") from None
    if len(values) != n:
        raise ValueError(f"{name} must have {n} entries, got {betas!r}")
    for i, b in enumerate(values):
        if not 0.0 <= check_finite_number(f"{name}[{i}]", b) < 1.0:
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {b!r}")
    return tuple(float(b) for b in values)

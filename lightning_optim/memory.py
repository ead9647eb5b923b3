"""Memory estimator: bytes for parameters, gradients and each optimizer state tensor, from the registry specs.

For ``P`` parameters in dtype ``w`` with optimizer state in dtype ``s``::

    parameters = P·|w| / shard      gradients = P·|g| / shard      state = Σ_tensors numel·|s| / shard

where the state numel per parameter comes from the optimizer's :class:`~lightning_optim.registry.StateLayout`
(hybrids: matrices under the main rule, the rest under their internal AdamW; shape-dependent state such as
SOAP's preconditioners needs the shapes, so pass a module or a preset for the exact figure). ``shard`` is
the FSDP sharding factor (the number of ranks the state is split over). Units are decimal (1 GB = 10⁹ B):
7e9 parameters with AdamW in float32 → 28 GB each for weights, gradients, m and v, 112 GB in all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from lightning_optim.registry import OptimizerSpec, get_optimizer_spec

__all__ = ["MemoryEstimate", "estimate_memory", "dtype_bytes", "format_bytes", "shapes_of"]

_DTYPES = {
    "float32": 4, "fp32": 4, "float": 4, "tf32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float64": 8, "fp64": 8, "double": 8,
    "float8": 1, "fp8": 1, "int8": 1, "uint8": 1,
}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given as a torch dtype or a name (``fp32``, ``bf16``, ``float8`` ...)."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


@dataclass
class MemoryEstimate:
    """Bytes per rank. ``state`` maps each optimizer state tensor's name to its bytes."""

    optimizer: str
    n_params: int
    parameters: float
    gradients: float
    state: dict[str, float] = field(default_factory=dict)
    shard: int = 1
    exact: bool = True

    @property
    def state_total(self) -> float:
        return sum(self.state.values())

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.state_total

    def bytes_per_param(self) -> float:
        return self.total * self.shard / max(self.n_params, 1)

    def table(self) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients)]
        rows += [(f"state: {k}", v) for k, v in self.state.items()]
        rows.append(("total", self.total))
        width = max(len(r[0]) for r in rows)
        head = f"{self.optimizer}: {self.n_params:,} parameters" + (f", sharded {self.shard}-way (per rank)" if self.shard > 1 else "")
        lines = [head] + [f"  {name:<{width}}  {format_bytes(v):>12}" for name, v in rows]
        if not self.exact:
            lines.append("  (shape-dependent state left out or hybrid split assumed: pass a module or --preset for the exact figure)")
        return "\n".join(lines)


def shapes_of(module: nn.Module, split_matrices: bool = True) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, routed-as-matrix) for every trainable parameter of ``module`` under the default rules."""
    from lightning_optim.param_groups import classify_parameters

    return [(role.shape, role.matrix if split_matrices else True) for _, role in classify_parameters(module)]


def _state_names(spec: OptimizerSpec, is_matrix: bool) -> list[tuple[str, float]]:
    """(label, parameter-sized tensors) pairs: one row per named state tensor."""
    layout = spec.state if (is_matrix or spec.other_state is None) else spec.other_state
    names = list(getattr(layout, "names", ()) or ())
    n = layout.tensors
    if n != n:  # NaN: an external class whose state is unknown
        return []
    whole = int(n)
    if names and len(names) == whole:
        rows = [(name, 1.0) for name in names]
    else:
        rows = [(f"state[{i}]", 1.0) for i in range(whole)]
    if n - whole:
        rows.append(("state (fractional)", n - whole))
    return rows


def estimate_memory(
    optimizer: str,
    n_params: int | float | None = None,
    *,
    module: nn.Module | None = None,
    shapes: Iterable[tuple[tuple[int, ...], bool]] | None = None,
    weight_dtype: str | torch.dtype = "float32",
    grad_dtype: str | torch.dtype | None = None,
    state_dtype: str | torch.dtype | None = None,
    shard: int = 1,
) -> MemoryEstimate:
    """Estimate memory per rank for training with ``optimizer``.

    Give exactly one of ``n_params`` (all parameters treated as matrices of unknown shape), ``module`` or
    ``shapes`` (``(shape, is_matrix)`` pairs). Gradients default to the weight dtype, state to the weight dtype.
    """
    spec = get_optimizer_spec(optimizer)
    given = sum(x is not None for x in (n_params, module, shapes))
    if given != 1:
        raise ValueError("give exactly one of n_params, module or shapes")
    if shard < 1 or int(shard) != shard:
        raise ValueError(f"shard must be a positive integer, got {shard}")
    wb = dtype_bytes(weight_dtype)
    gb = dtype_bytes(grad_dtype) if grad_dtype is not None else wb
    sb = dtype_bytes(state_dtype) if state_dtype is not None else wb
    exact = True
    if module is not None:
        shapes = shapes_of(module, split_matrices=spec.hybrid)
    if shapes is None:
        if n_params is None or n_params <= 0:
            raise ValueError(f"n_params must be positive, got {n_params}")
        total = int(n_params)
        exact = spec.state.extra is None and not spec.hybrid
        per_shape = [((total,), True, False)]
    else:
        shapes = list(shapes)
        per_shape = [(tuple(s), bool(m), True) for s, m in shapes]
        total = sum(int(torch.Size(s).numel()) for s, _ in shapes)

    state: dict[str, float] = {}
    for shape, is_matrix, use_extra in per_shape:
        numel = int(torch.Size(shape).numel())
        layout = spec.state if (is_matrix or spec.other_state is None) else spec.other_state
        elem = layout.bytes_per_element if layout.bytes_per_element is not None else sb
        prefix = "" if spec.other_state is None else ("matrix " if is_matrix else "adamw ")
        for label, count in _state_names(spec, is_matrix):
            state[prefix + label] = state.get(prefix + label, 0.0) + count * numel * elem
        if use_extra and layout.extra is not None:
            key = prefix + "shape-dependent"
            state[key] = state.get(key, 0.0) + layout.extra(shape) * elem
    state = {k: v / shard for k, v in state.items()}
    return MemoryEstimate(
        optimizer=spec.name, n_params=total, parameters=total * wb / shard, gradients=total * gb / shard,
        state=state, shard=int(shard), exact=exact,
    )

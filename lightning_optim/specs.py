"""The records the registry is made of: :class:`StateLayout`, :class:`OptimizerSpec`, :class:`SchedulerSpec`.

A leaf module (it imports nothing from this package), so the algorithm table
(:mod:`lightning_optim.builtins`), the registry (:mod:`lightning_optim.registry`), validation and the
memory estimator can all use the records without importing one another.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

__all__ = ["StateLayout", "OptimizerSpec", "SchedulerSpec", "normalize_name", "signature_defaults"]


def normalize_name(name: str) -> str:
    """Registry keys are lower case with ``-`` separators: ``SF_AdamW`` → ``sf-adamw``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an optimizer or schedule name must be a non-empty string, got {name!r}")
    return name.strip().lower().replace("_", "-")


def signature_defaults(cls: type) -> tuple[dict[str, Any], bool]:
    """The hyperparameters ``cls(params, ...)`` accepts, with their defaults (``None`` where it has none),
    and whether it also takes ``**kwargs``. Read from ``cls.__init__``'s signature, skipping ``self`` and
    ``params``; ``*args`` is not a hyperparameter."""
    params = inspect.signature(cls.__init__).parameters
    defaults = {
        k: (None if p.default is inspect.Parameter.empty else p.default)
        for k, p in list(params.items())[2:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return defaults, any(p.kind is p.VAR_KEYWORD for p in params.values())


#: which part of an optimizer's state every FSDP2 rank keeps whole (:attr:`StateLayout.replicated`)
REPLICATED = ("none", "extra", "all")


@dataclass(frozen=True)
class StateLayout:
    """Optimizer state kept for one parameter, for memory accounting.

    ``tensors`` parameter-sized tensors (AdamW 2, Lion 1), plus ``extra(shape)`` elements that depend on the
    shape (SOAP's m²+n² preconditioners, NorMuon's per-row second moment), plus ``fixed`` scalar elements.
    ``bytes_per_element`` overrides the state dtype for quantised state (8-bit AdamW: 1 byte plus block
    scales); ``None`` means "the state dtype", usually the parameter's. ``names`` labels the
    parameter-sized tensors (``("exp_avg", "exp_avg_sq")``) for the memory report.

    ``replicated`` says which part every rank keeps whole when the parameters are FSDP2 shards
    (``fully_shard``), where the rest is sharded like the parameter: ``"none"`` (all sharded: AdamW, Muon),
    ``"extra"`` (the shape-dependent part is replicated: Dion's right factor ``Q``) or ``"all"`` (the optimizer
    gathers the gradient and keeps the full state on every rank: SOAP, Shampoo).
    """

    tensors: float = 0.0
    extra: Callable[[tuple[int, ...]], int] | None = None
    bytes_per_element: float | None = None
    names: tuple[str, ...] = ()
    replicated: str = "none"

    def __post_init__(self) -> None:
        if self.replicated not in REPLICATED:
            raise ValueError(f"StateLayout.replicated must be one of {', '.join(REPLICATED)}, got {self.replicated!r}")

    def numel(self, shape: Iterable[int]) -> float:
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape) if shape else 1
        return self.tensors * n + (self.extra(shape) if self.extra is not None else 0)

    def describe(self) -> str:
        text = "" if not self.tensors else f"{self.tensors:g}×P"
        if self.extra is not None:
            label = (getattr(self.extra, "__doc__", None) or "shape-dependent").strip().lstrip("+ ")
            text = f"{text} + {label}" if text else label
        text = text or "0"
        if self.bytes_per_element is not None:
            text += f" @ {self.bytes_per_element:g} B/elem"
        return text


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything known about one registered optimizer.

    ``factory(param_groups, **hyperparameters)`` builds it; ``defaults`` lists *every* accepted
    hyperparameter with its published default (the unknown-name check reads it). ``state`` is the state
    per parameter under the main rule; for hybrids ``other_state`` is the state of parameters routed to the
    internal AdamW. ``callbacks`` are ``"module:Class"`` paths the :class:`~lightning_optim.OptimizerMixin`
    adds to the Trainer (schedule-free switching, Sophia's Hessian pass). ``horizon_hyperparameters`` name
    hyperparameters whose published setting is "the run's length" (AdEMAMix's warmups): the mixin sets them
    to the schedule's total steps when the user left them ``None``. ``supports_dtensor=False`` makes
    :func:`create_optimizer` refuse FSDP2 ``DTensor`` parameters at construction, with ``dtensor_note`` saying
    why and what to use instead. ``low_precision_state`` names, for an optimizer with a ``state_dtype``
    option, the state tensors that option stores in low precision (``{True: matrix rule's, False: a hybrid's
    other part's}``; the rest keep the weight dtype), and ``quantized_if(shape)`` says which tensors get a
    quantised layout (torchao keeps small ones like the parameter); both are read by the memory estimator.
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    family: str = "elementwise"
    state: StateLayout = StateLayout()
    other_state: StateLayout | None = None
    hybrid: bool = False
    routing: str = "every parameter follows the same rule"
    paper: str = ""
    reference: str = ""
    description: str = ""
    aliases: tuple[str, ...] = ()
    callbacks: tuple[str, ...] = ()
    schedule_free: bool = False
    requires: str | None = None
    accepts_extra: bool = False
    horizon_hyperparameters: tuple[str, ...] = ()
    supports_dtensor: bool = True
    dtensor_note: str = ""
    low_precision_state: Mapping[bool, tuple[str, ...]] | None = None
    quantized_if: Callable[[tuple[int, ...]], bool] | None = None

    def state_numel(self, shape: Iterable[int], is_matrix: bool = True) -> float:
        """State elements for a parameter of ``shape`` (routed as a matrix or not, for hybrids)."""
        layout = self.state if (is_matrix or self.other_state is None) else self.other_state
        return layout.numel(shape)


@dataclass(frozen=True)
class SchedulerSpec:
    """A registered LR schedule: ``schedule_cls(total_steps, warmup_steps, **kw)`` is a pure function of step."""

    name: str
    schedule_cls: type
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    aliases: tuple[str, ...] = ()
    needs_total_steps: bool = True

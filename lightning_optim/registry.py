"""The registry: the tables of optimizer and LR-schedule records, their lookup, and the factories.

Where things live: the records (:class:`OptimizerSpec`, :class:`SchedulerSpec`, :class:`StateLayout`) are
defined in :mod:`lightning_optim.specs`; the built-in entries are listed in :mod:`lightning_optim.builtins`
(imported here on the first lookup); the algorithms are classes under :mod:`lightning_optim.optim`, which
import neither. Third parties add entries with :func:`register_optimizer` or entry points.

An :class:`OptimizerSpec` says everything the rest of the package needs to know about an optimizer without
building one: how to construct it, its published defaults, how much state it keeps per parameter (for the
memory estimator), how it routes parameters (hybrids send matrices to one rule and the rest to AdamW), which
callbacks it needs in a Lightning run, and where the algorithm comes from.

Usage::

    from lightning_optim import create_optimizer, create_scheduler
    opt = create_optimizer("adamw", model, lr=3e-4)           # default grouping rules applied to the module
    sched = create_scheduler("cosine", opt, total_steps=10_000, warmup_steps=500)

    @register_optimizer("my-adam", defaults={"lr": 1e-3, "betas": (0.9, 0.99)}, state=StateLayout(2))
    class MyAdam(torch.optim.Optimizer): ...

Names are case-insensitive and ``-``/``_`` are equivalent; a class path (``torch.optim.RAdam``) works too,
imported only from allowed modules (:mod:`lightning_optim.class_paths`: torch, well-known optimizer packages,
and those added with :func:`~lightning_optim.allow_optimizer_module`). Inputs are checked by
:mod:`lightning_optim.validation` before anything is built. Other packages add optimizers through the
entry-point group ``lightning_optim.optimizers``: each entry point names an :class:`OptimizerSpec` (or a
zero-argument callable returning one, or a module whose import registers its optimizers).
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from dataclasses import replace
from importlib import metadata
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lightning_optim._dtensor import is_dtensor
from lightning_optim.class_paths import import_optimizer_class
from lightning_optim.specs import OptimizerSpec, SchedulerSpec, StateLayout, normalize_name, signature_defaults
from lightning_optim.validation import (
    install_meta_guard,
    parameter_label,
    validate_hyperparameters,
    validate_param_groups,
)

__all__ = [
    "StateLayout",
    "OptimizerSpec",
    "SchedulerSpec",
    "register_optimizer",
    "register_optimizer_spec",
    "register_scheduler",
    "create_optimizer",
    "create_scheduler",
    "available_optimizers",
    "available_schedulers",
    "optimizer_info",
    "scheduler_info",
    "get_optimizer_spec",
    "get_scheduler_spec",
    "normalize_name",
]

ENTRY_POINT_GROUP = "lightning_optim.optimizers"


_OPTIMIZERS: dict[str, OptimizerSpec] = {}
_OPTIMIZER_ALIASES: dict[str, str] = {}
_SCHEDULERS: dict[str, SchedulerSpec] = {}
_SCHEDULER_ALIASES: dict[str, str] = {}
_loaded = False


def register_optimizer_spec(spec: OptimizerSpec, *, overwrite: bool = False) -> OptimizerSpec:
    """Add ``spec`` to the registry (its name and aliases). Re-registering a name needs ``overwrite=True``.

    The built-ins are loaded first, so a name clash with one is found whenever the registration happens."""
    _ensure_loaded()
    key = normalize_name(spec.name)
    spec = replace(spec, name=key)
    for alias in map(normalize_name, spec.aliases):
        owner = alias if alias in _OPTIMIZERS else _OPTIMIZER_ALIASES.get(alias)
        if owner is not None and owner != key and not overwrite:
            raise ValueError(f"optimizer name {alias!r} is already registered (by {owner!r})")
    if key in _OPTIMIZERS and not overwrite and _OPTIMIZERS[key].factory is not spec.factory:
        raise ValueError(f"optimizer {key!r} is already registered; pass overwrite=True to replace it")
    _OPTIMIZERS[key] = spec
    for alias in map(normalize_name, spec.aliases):
        _OPTIMIZER_ALIASES[alias] = key
    return spec


def register_optimizer(name: str, **spec_fields: Any) -> Callable:
    """Decorator form of :func:`register_optimizer_spec`; decorates the factory (a class or a function)."""

    overwrite = spec_fields.pop("overwrite", False)

    def decorate(factory: Callable) -> Callable:
        register_optimizer_spec(OptimizerSpec(name=name, factory=factory, **spec_fields), overwrite=overwrite)
        return factory

    return decorate


def register_scheduler(spec: SchedulerSpec) -> SchedulerSpec:
    """Add a schedule (its name and aliases); a name already taken is replaced."""
    _ensure_loaded()
    key = normalize_name(spec.name)
    spec = replace(spec, name=key)
    _SCHEDULERS[key] = spec
    for alias in map(normalize_name, spec.aliases):
        _SCHEDULER_ALIASES[alias] = key
    return spec


def _load_entry_points() -> None:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # pragma: no cover - broken metadata must not break the registry
        return
    for ep in eps:
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin is reported, not fatal for the built-ins
            warnings.warn(f"lightning-optim: entry point {ep.name!r} failed to load: {err}", stacklevel=2)
            continue
        if callable(obj) and not isinstance(obj, OptimizerSpec) and not inspect.isclass(obj):
            obj = obj()
        if isinstance(obj, OptimizerSpec) and normalize_name(obj.name) not in _OPTIMIZERS:
            register_optimizer_spec(obj)


def _ensure_loaded() -> None:
    """Add the built-in table (:mod:`lightning_optim.builtins`), then third-party entry points (once).

    Imported here, on the first lookup, so that importing the package does not import every algorithm; the
    built-ins do not import this module, so the import graph stays acyclic."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: the registrations below call back into this function
    try:
        from lightning_optim.builtins import OPTIMIZERS, SCHEDULERS

        for spec in OPTIMIZERS:
            register_optimizer_spec(spec)
        for schedule in SCHEDULERS:
            register_scheduler(schedule)
    except BaseException:
        _loaded = False  # the next lookup tries again and raises again, rather than finding an empty table
        raise
    _load_entry_points()


def available_optimizers() -> list[str]:
    _ensure_loaded()
    return sorted(_OPTIMIZERS)


def available_schedulers() -> list[str]:
    _ensure_loaded()
    return sorted(_SCHEDULERS)


def _unknown(kind: str, name: str, known: Iterable[str]) -> ValueError:
    known = sorted(known)
    close = difflib.get_close_matches(normalize_name(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(known)}.")


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The spec for a registry key, alias or importable optimizer class path."""
    _ensure_loaded()
    key = normalize_name(name)
    key = _OPTIMIZER_ALIASES.get(key, key)
    if key in _OPTIMIZERS:
        return _OPTIMIZERS[key]
    if "." in name:  # a class path: imported only from allowed modules (lightning_optim.class_paths)
        cls = import_optimizer_class(name)
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"{name!r} is not a torch.optim.Optimizer subclass")
        return _spec_from_class(name.strip(), cls)
    names = list(_OPTIMIZERS) + list(_OPTIMIZER_ALIASES)
    raise _unknown("optimizer", name, names)


def _spec_from_class(path: str, cls: type) -> OptimizerSpec:
    defaults, accepts_extra = signature_defaults(cls)
    return OptimizerSpec(
        name=path, factory=cls, defaults=defaults, family="external", reference=path,
        description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        accepts_extra=accepts_extra, state=StateLayout(float("nan")),
    )


def get_scheduler_spec(name: str) -> SchedulerSpec:
    _ensure_loaded()
    key = normalize_name(name)
    key = _SCHEDULER_ALIASES.get(key, key)
    if key not in _SCHEDULERS:
        raise _unknown("schedule", name, list(_SCHEDULERS) + list(_SCHEDULER_ALIASES))
    return _SCHEDULERS[key]


#: The public names (``lightning_optim.optimizer_info``, ``lightning_optim.scheduler_info``): the same lookups.
optimizer_info = get_optimizer_spec
scheduler_info = get_scheduler_spec


# ----------------------------------------------------------------------------------------------------------
# Factories


def _as_param_groups(params_or_module: Any, spec: OptimizerSpec) -> list[dict[str, Any]]:
    from lightning_optim.param_groups import param_groups

    if isinstance(params_or_module, nn.Module):
        groups = param_groups(params_or_module, split_matrices=spec.hybrid)
    elif isinstance(params_or_module, torch.Tensor):
        raise TypeError(
            "params must be an iterable of tensors, parameter groups or an nn.Module, not a single tensor; "
            "wrap it in a list"
        )
    else:
        items = list(params_or_module)
        if items and all(isinstance(g, dict) for g in items):
            groups = []
            for i, g in enumerate(items):
                if "params" not in g:
                    raise ValueError(f"parameter group {i} has no 'params' key: {sorted(g)}")
                g = dict(g)
                ps = g["params"]
                g["params"] = [ps] if isinstance(ps, torch.Tensor) else list(ps)
                groups.append(g)
        elif any(isinstance(g, dict) for g in items):
            raise TypeError("params mixes parameter groups (dicts) and tensors; use one or the other")
        else:
            groups = [{"params": items}] if items else []
        groups = [_split_named_parameters(g, gi) for gi, g in enumerate(groups)]
    total = sum(len(g["params"]) for g in groups)
    if total == 0:
        raise ValueError(
            f"optimizer {spec.name!r} got an empty parameter list (are all parameters frozen with "
            "requires_grad=False?)"
        )
    validate_param_groups(spec, groups)
    return groups


def _split_named_parameters(group: dict[str, Any], gi: int) -> dict[str, Any]:
    """``(name, tensor)`` pairs (``model.named_parameters()``, as torch optimizers accept) become ``params``
    plus ``param_names``, so messages can name the parameter; plain tensors pass through unchanged."""
    items = group["params"]
    named = [isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items]
    if not any(named):
        return group
    if not all(named):
        raise TypeError(f"parameter group {gi} mixes (name, tensor) pairs and plain tensors; use one or the other")
    if "param_names" in group:
        raise ValueError(f"parameter group {gi} has both (name, tensor) pairs and 'param_names'; use one or the other")
    return {**group, "params": [t for _, t in items], "param_names": [n for n, _ in items]}


def _refuse_dtensor(spec: OptimizerSpec, groups: list[dict[str, Any]]) -> None:
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            if is_dtensor(p):
                raise ValueError(
                    f"optimizer {spec.name!r} does not support FSDP2 DTensor parameters "
                    f"(parameter {parameter_label(g, gi, pi)}): "
                    f"{spec.dtensor_note or 'it has no sharded implementation'}"
                )


def create_optimizer(name: str, params_or_module: Any, **hyperparameters: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` over a module (default grouping rules) or parameters / groups.

    Hyperparameters not given take the spec's published defaults. A group may carry ``lr_scale``: its lr is
    the optimizer lr times that factor (schedules multiply each group's own lr, so the ratio holds).
    Raises ``ValueError`` for an unknown name (with close matches), an unknown hyperparameter (with the
    accepted ones), a value out of range, non-finite or given as a string, betas of the wrong length, a
    tensor listed twice, before anything is allocated (rules: :mod:`lightning_optim.validation`). A step
    pre-hook refuses to step parameters still on the meta device, naming them.
    """
    spec = get_optimizer_spec(name)
    validate_hyperparameters(spec, hyperparameters)
    groups = _as_param_groups(params_or_module, spec)
    if not spec.supports_dtensor:
        _refuse_dtensor(spec, groups)
    hp = {k: v for k, v in {**spec.defaults, **hyperparameters}.items()}
    if spec.family == "external":  # pass only what the user gave; the class has its own defaults
        hp = dict(hyperparameters)
    try:
        optimizer = spec.factory(groups, **hp)
    except ImportError as err:
        if spec.requires:
            raise ImportError(
                f"optimizer {spec.name!r} needs {spec.requires}: pip install 'lightning-optim[{spec.requires}]'"
                f" ({err})"
            ) from err
        raise
    for group in optimizer.param_groups:  # lr_scale was checked (finite, >= 0) with the groups
        scale = group.get("lr_scale")
        if scale is not None:
            group["lr"] = group["lr"] * scale
    install_meta_guard(optimizer)
    return optimizer


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    **kwargs: Any,
):
    """A :class:`~lightning_optim.schedules.ScheduledLR` multiplying each group's own lr by the schedule.

    ``total_steps`` may be ``None`` for schedules that do not need a horizon (constant, inverse-sqrt) or
    when the horizon is filled in later (``scheduler.set_total_steps``), as the mixin does when the Trainer
    has no ``max_steps``.
    """
    from lightning_optim.schedules import ScheduledLR

    spec = get_scheduler_spec(name)
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for schedule {spec.name!r}. "
            f"Accepted: total_steps, warmup_steps, {', '.join(sorted(spec.defaults)) or '(none)'}."
        )
    schedule = spec.schedule_cls(total_steps=total_steps, warmup_steps=warmup_steps, **{**spec.defaults, **kwargs})
    return ScheduledLR(optimizer, schedule)

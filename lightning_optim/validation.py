"""Checked inputs: hyperparameter values, parameter groups and parameters, refused before training starts.

Every refusal is a ``ValueError`` (``TypeError`` for a wrong container type) whose message names the field,
the group or the parameter, and says what was expected. Nothing is coerced: ``lr="1e-3"`` is refused, not
parsed, so a config typo is found where it was made.

**Rules implied by a hyperparameter's name** (the last dotted component, so ``param_groups[1].lr`` follows
``lr``):

- ``lr``, ``*_lr``, ``lr_scale``: a finite number ``>= 0``;
- ``betas``, ``*_betas``: a tuple of finite numbers in ``[0, 1)`` (``None`` entries allowed), as many as the
  optimizer's registered default has (one source of truth: ``OptimizerSpec.defaults``);
- ``beta``, ``beta1``, ``beta2``, ``beta3`` ..., ``momentum``, ``mu``: a finite number in ``[0, 1)``;
- ``eps``, ``*_eps``: a finite number ``> 0``, or, where the default is a tuple (Adafactor's
  ``(None, 1e-3)``), a tuple of them as long as the default (``None`` entries allowed);
- ``weight_decay``, ``*_weight_decay``: a finite number ``>= 0``;
- ``*_steps``, ``*_interval``, ``*_frequency``, ``*_warmup``, ``*_dim``, ``*_size``: a count, an integer
  ``>= 0`` (not a float, not a bool).

**Rules implied by the registered default** (``OptimizerSpec.defaults``): a field whose default is a number
takes a number (not a string, not a bool), never NaN, and never infinity unless the default itself is
that infinity (Prodigy's ``growth_rate=inf``). A field whose default is a string (``adjust_lr="original"``)
is a mode and one whose default is a bool (``safeguard_warmup=False``) a switch, whatever their names say:
both are left to the optimizer to check. ``None`` always means "the default" and is not checked.

**Parameter groups** (:func:`validate_param_groups`): every entry is a floating-point tensor, no tensor
appears twice (within a group or across groups: it would be stepped twice per step), and every group value
follows the rules above, ``lr_scale`` included.

**Meta-device parameters** (:func:`install_meta_guard`): building an optimizer over parameters on the meta
device is legitimate when they are materialised in place before training (FSDP2's ``fully_shard`` then
``to_empty``, or ``torch.__future__.set_swap_module_params_on_conversion(True)``), so it is not refused at
construction. A step pre-hook refuses the first ``step()`` that would run on a parameter still on the meta
device (where every update is a silent no-op), naming it. Once one step has passed the check the hook
returns at once: its cost per step is one attribute read.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from lightning_optim.specs import OptimizerSpec

__all__ = [
    "check_value",
    "validate_hyperparameters",
    "validate_param_groups",
    "parameter_label",
    "install_meta_guard",
    "MetaParameterGuard",
]

_NO_DEFAULT = object()

_COUNT_SUFFIXES = ("_steps", "_interval", "_frequency", "_warmup", "_dim", "_size")
_BETA_NAMES = re.compile(r"beta\d*|momentum|mu")


# ----------------------------------------------------------------------------------------------------------
# One value


def _kind(name: str) -> str:
    """The rule a hyperparameter's name implies: count, rate, betas, beta, eps, weight_decay or other."""
    if name.endswith(_COUNT_SUFFIXES):
        return "count"
    if name in ("lr", "lr_scale") or name.endswith("_lr"):
        return "rate"
    if name == "betas" or name.endswith("_betas"):
        return "betas"
    if _BETA_NAMES.fullmatch(name):
        return "beta"
    if name == "eps" or name.endswith("_eps"):
        return "eps"
    if name == "weight_decay" or name.endswith("_weight_decay"):
        return "weight_decay"
    return "other"


def _is_plain_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A real number or a one-element real tensor (torch optimizers accept a tensor lr)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and v.dtype is not torch.bool
    return _is_plain_number(v)


def _number(label: str, v: Any, finite: bool = True) -> float:
    """``v`` as a float for range checks, refusing strings, bools, NaN and (when ``finite``) infinity."""
    if isinstance(v, str):
        raise ValueError(f"{label} must be a number: got the string {v!r}; pass a number")
    if not _is_number(v):
        raise ValueError(f"{label} must be a number, got {type(v).__name__} {v!r}")
    x = float(v)
    if math.isnan(x):
        raise ValueError(f"{label} must not be NaN, got {x}")
    if finite and math.isinf(x):
        raise ValueError(f"{label} must be finite, got {x}")
    return x


def _check_sequence(label: str, value: Any, default: Any, what: str) -> Sequence[Any]:
    """A tuple/list of the registered default's length (when the default is one)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{label} must be a tuple of {what}, got {value!r}")
    if isinstance(default, (tuple, list)) and len(value) != len(default):
        raise ValueError(
            f"{label} must have {len(default)} entries (like its default {tuple(default)!r}), "
            f"got {len(value)}: {value!r}"
        )
    return value


def check_value(name: str, value: Any, default: Any = _NO_DEFAULT, *, label: str | None = None) -> None:
    """Refuse ``value`` for hyperparameter ``name`` if it breaks the rule its name or default implies.

    ``name`` selects the rule (its last dotted component is used); ``default`` is the optimizer's
    registered default for it, when known (betas/eps lengths, numeric type, whether infinity is allowed);
    ``label`` is how the message names the field (default ``name``). See the module docstring for the rules.
    """
    label = label or name
    if value is None:
        return
    leaf = name.split(".")[-1]
    kind = _kind(leaf)
    if isinstance(default, (str, bool)) or (isinstance(value, str) and kind == "other" and not _is_plain_number(default)):
        return  # a mode (adjust_lr="original") or a switch (safeguard_warmup=False): the optimizer checks it

    if kind == "count":
        if isinstance(value, str):
            raise ValueError(f"{label} must be an integer: got the string {value!r}; pass a number")
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{label} must be an integer >= 0 (a count), got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
    elif kind == "rate":
        if _number(label, value) < 0:
            raise ValueError(f"{label} must be >= 0 (a negative learning rate ascends the loss), got {value}")
    elif kind == "betas":
        for i, b in enumerate(_check_sequence(label, value, default, "numbers in [0, 1)")):
            if b is None:
                continue
            b = _number(f"{label}[{i}]", b)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{label}[{i}] must be in [0, 1), got {b}")
    elif kind == "beta":
        b = _number(label, value)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {b}")
    elif kind == "eps":
        if isinstance(value, (tuple, list)) or isinstance(default, (tuple, list)):
            for i, e in enumerate(_check_sequence(label, value, default, "numbers > 0")):
                if e is not None and _number(f"{label}[{i}]", e) <= 0:
                    raise ValueError(f"{label}[{i}] must be > 0, got {e}")
        elif _number(label, value) <= 0:
            raise ValueError(f"{label} must be > 0, got {value}")
    elif kind == "weight_decay":
        if _number(label, value) < 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
    elif _is_plain_number(default):
        x = _number(label, value, finite=False)
        if math.isinf(x) and x != float(default):
            raise ValueError(f"{label} must be finite (its default is {default}), got {x}")
    elif _is_number(value):
        _number(label, value, finite=False)  # NaN is never a setting


def validate_hyperparameters(spec: "OptimizerSpec", hp: Mapping[str, Any]) -> None:
    """Refuse unknown names (listing the accepted ones) and bad values (naming the field), for ``spec``."""
    import difflib

    if not spec.accepts_extra:
        unknown = sorted(set(hp) - set(spec.defaults))
        if unknown:
            accepted = ", ".join(sorted(spec.defaults)) or "(none)"
            close = {u: difflib.get_close_matches(u, list(spec.defaults), n=1) for u in unknown}
            hints = "".join(f" ({u!r}: did you mean {c[0]!r}?)" for u, c in close.items() if c)
            raise ValueError(
                f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for optimizer {spec.name!r}.{hints} "
                f"Accepted: {accepted}."
            )
    for k, v in hp.items():
        check_value(k, v, spec.defaults.get(k, _NO_DEFAULT))


# ----------------------------------------------------------------------------------------------------------
# Parameter groups


def parameter_label(group: Mapping[str, Any], gi: int, pi: int) -> str:
    """How messages name parameter ``pi`` of group ``gi``: ``'fc.weight' (group 0 item 3)`` when the group
    carries ``param_names``, else ``group 0 item 3``."""
    names = group.get("param_names")
    where = f"group {gi} item {pi}"
    if isinstance(names, (list, tuple)) and len(names) == len(group["params"]) and isinstance(names[pi], str):
        return f"{names[pi]!r} ({where})"
    return where


def _group_label(group: Mapping[str, Any], gi: int) -> str:
    name = group.get("name")
    return f"param_groups[{gi}]" + (f" ({name!r})" if isinstance(name, str) else "")


def validate_param_groups(spec: "OptimizerSpec", groups: Sequence[Mapping[str, Any]]) -> None:
    """Each parameter a floating-point tensor and present once; each group value valid (``lr_scale`` too).

    ``groups`` are normalised groups (``params`` a list). Messages name the parameter by ``param_names``
    when the group carries them, else by group and index; group values are named ``param_groups[i].key``.
    """
    seen: dict[int, str] = {}
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter group {gi} item {pi} is a {type(p).__name__}, not a tensor")
            if not p.is_floating_point() and not p.is_complex():
                raise ValueError(
                    f"parameter {parameter_label(g, gi, pi)} has dtype {p.dtype}; only floating point trains"
                )
            label = parameter_label(g, gi, pi)
            if id(p) in seen:
                raise ValueError(
                    f"parameter {label} is the same tensor as {seen[id(p)]}: a parameter may appear only once "
                    "in the parameter groups (it would be stepped twice per step)"
                )
            seen[id(p)] = label
        for k, v in g.items():
            if k in ("params", "param_names", "name"):
                continue
            check_value(k, v, spec.defaults.get(k, _NO_DEFAULT), label=f"{_group_label(g, gi)}.{k}")


# ----------------------------------------------------------------------------------------------------------
# Parameters still on the meta device at step time


class MetaParameterGuard:
    """Optimizer step pre-hook: refuse to step while a parameter is on the meta device, naming it.

    Checks every parameter until one step passes, then only reads ``self.clean`` (O(1) per step).
    """

    def __init__(self) -> None:
        self.clean = False

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.clean:
            return None
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                if p.is_meta:
                    raise ValueError(
                        f"parameter {parameter_label(g, gi, pi)} is on the meta device, so step() would not "
                        "change it: materialise the model first (module.to_empty(device=...) with "
                        "torch.__future__.set_swap_module_params_on_conversion(True), or FSDP2 fully_shard "
                        "then to_empty) or build the optimizer after materialising"
                    )
        self.clean = True
        return None


def install_meta_guard(optimizer: torch.optim.Optimizer) -> MetaParameterGuard | None:
    """Register a :class:`MetaParameterGuard` on ``optimizer`` (a torch optimizer); return it (``None`` for
    objects without ``register_step_pre_hook``)."""
    register = getattr(optimizer, "register_step_pre_hook", None)
    if not callable(register):
        return None
    guard = MetaParameterGuard()
    register(guard)
    return guard

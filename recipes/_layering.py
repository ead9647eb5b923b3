"""How a recipe's optimizer settings are layered: registry defaults → recipe → YAML → flags.

A recipe names one optimizer (AdamW for every preset) and the settings it tuned *for that optimizer*
(lr, betas, eps, weight decay). Those settings must not leak into another optimizer: Muon takes no
``betas``, Lion no ``eps``. So the recipe's parser leaves every optimizer hyperparameter of ``--optim.*``
unset (``null``) and :func:`layer_optim_settings` fills them after parsing:

1. the chosen optimizer's registered (published) defaults, for everything still unset;
2. on top of those, the recipe's own settings, only when the chosen optimizer is the one they were
   written for;
3. values from a ``--config`` YAML and then ``--optim.*`` flags were already set by the parser and are never
   overwritten. A value set explicitly that the chosen optimizer does not take is refused, naming it.

The schedule is not optimizer-specific, except that a schedule-free optimizer gets ``constant`` when no
schedule was named. Warmup (the schedule's ``warmup_steps`` and a schedule-free optimizer's own
``warmup_steps``) longer than ``max_warmup_fraction`` of the run's horizon is capped at that fraction, with a
message, so ``--trainer.max_steps 3`` works on every recipe without touching the warmup.

The result holds the *effective* value of every hyperparameter, so the saved ``config.yaml`` and the
TensorBoard hyperparameters show what the run used.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from lightning_optim.mixin import default_scheduler
from lightning_optim.registry import get_optimizer_spec, normalize_name

__all__ = ["TORCH_FIELDS", "layer_optim_settings"]

TORCH_FIELDS = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov")
_PLAIN = (int, float, str, bool, list, tuple)
# Implementation switches, not hyperparameters of the algorithm: left to the optimizer unless the user sets them.
_IMPLEMENTATION = frozenset({"maximize", "capturable", "differentiable", "foreach", "fused", "compiled"})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _fits_field(key: str, value: Any) -> bool:
    """Whether a default fits ``OptimConfig``'s typed field (Adafactor's ``eps`` is a pair: it goes to ``extra``)."""
    if key == "nesterov":
        return isinstance(value, bool)
    if key == "betas":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(b, (int, float)) for b in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def layer_optim_settings(
    optim: Mapping[str, Any],
    recipe_optimizer: str,
    recipe_settings: Mapping[str, Any],
    recipe_scheduler: str,
    horizon: int | None,
    max_warmup_fraction: float,
) -> tuple[dict[str, Any], list[str]]:
    """The effective ``--optim`` section and the messages to print (see the module docstring).

    ``optim`` is the parsed section (unset hyperparameters are ``None``, ``extra`` holds only what the user
    gave); ``recipe_settings`` are the recipe's values for ``recipe_optimizer``; ``horizon`` is the run's
    length in optimizer steps (``None`` when unknown).
    """
    out = dict(optim)
    out["extra"] = dict(out.get("extra") or {})
    messages: list[str] = []
    spec = get_optimizer_spec(out["name"])
    if normalize_name(out["name"]) == normalize_name(recipe_optimizer):
        for key, value in recipe_settings.items():
            if key in TORCH_FIELDS:
                if out.get(key) is None:
                    out[key] = _plain(value)
            elif key not in out["extra"]:
                out["extra"][key] = _plain(value)
    if spec.family != "external":  # a class path's own defaults are its business
        for key, value in spec.defaults.items():
            if value is None or not isinstance(value, _PLAIN) or key in _IMPLEMENTATION:
                continue
            if key in TORCH_FIELDS and _fits_field(key, value):
                if out.get(key) is None:
                    out[key] = _plain(value)
            elif key not in out["extra"] and (key not in TORCH_FIELDS or out.get(key) is None):
                out["extra"][key] = _plain(value)
    if out.get("scheduler") is None:
        out["scheduler"] = default_scheduler(spec.name) if spec.schedule_free else recipe_scheduler
    if horizon is not None and horizon > 0:
        cap = int(math.floor(max_warmup_fraction * horizon))
        if (out.get("warmup_steps") or 0) > cap:
            messages.append(f"warmup_steps {out['warmup_steps']} is more than {max_warmup_fraction:g} of the run's "
                            f"{horizon} steps: using {cap} (set --optim.warmup_steps or --max_warmup_fraction)")
            out["warmup_steps"] = cap
        own = out["extra"].get("warmup_steps")
        if spec.schedule_free and isinstance(own, int) and own > cap:
            messages.append(f"{spec.name}'s own warmup_steps {own} is more than {max_warmup_fraction:g} of the run's "
                            f"{horizon} steps: using {cap} (set --optim.extra.warmup_steps or --max_warmup_fraction)")
            out["extra"]["warmup_steps"] = cap
    return out, messages

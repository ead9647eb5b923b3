"""``OptimizerMixin``: a LightningModule's ``configure_optimizers`` built from the registry.

Usage::

    import lightning as L
    from lightning_optim import OptimConfig, OptimizerMixin

    class MyLM(OptimizerMixin, L.LightningModule):
        def __init__(self, optim: OptimConfig | None = None):
            super().__init__()
            # a fresh default per instance (an OptimConfig(...) default argument would share one `extra` dict)
            self.save_hyperparameters({"optim": optim or OptimConfig(name="adamw", lr=1e-3, scheduler="cosine")})
            ...
        # no configure_optimizers: the mixin builds one optimizer and a per-step schedule

Flat hyperparameters work too (``optimizer="muon", lr=0.02, scheduler="wsd", warmup_steps=2000``); the
mixin reads ``self.hparams.optim`` first, then the flat names. With LightningCLI,
``--optim.name ademamix --optim.lr 1e-3`` sets the fields.

The schedule's horizon is ``OptimConfig.total_steps``, else ``trainer.max_steps``, else
``trainer.estimated_stepping_batches`` read lazily at the first step after warmup — never inside
``configure_optimizers``, which would break stateful-dataloader resume (Lightning issue #20550).

The config is built and validated once: an ``OptimConfig`` in the hyperparameters is used as it is (it is
saved in checkpoints as itself and loads with ``torch.load(weights_only=True)``; ``hparams.yaml`` shows it as a
plain mapping); one given as a dict or flat names is built once and kept until the hyperparameters change.

Override :meth:`optimizer_param_groups` to change the grouping; the groups it returns go to
:func:`~lightning_optim.create_optimizer` as they are. Callbacks an optimizer needs (schedule-free
switching, Sophia's Hessian pass) are added through ``configure_callbacks``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import yaml

from lightning_optim.class_paths import import_object
from lightning_optim.mup import find_mup_model, mup_param_groups, optimizer_rule
from lightning_optim.param_groups import GroupingRules, param_groups
from lightning_optim.validation import check_value
from lightning_optim.registry import (
    create_optimizer,
    create_scheduler,
    get_optimizer_spec,
    get_scheduler_spec,
    validate_hyperparameters,
)

__all__ = ["OptimConfig", "OptimizerMixin", "default_scheduler"]

_TORCH_NAMES = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov")
_SCHEDULE_FIELDS = ("decay_fraction", "final_fraction", "cooldown_shape", "cooldown_start", "timescale")


@dataclass
class OptimConfig:
    """Which optimizer and schedule, with what settings. ``None`` means "the registered default".

    Args:
        name: registry key (``adamw``, ``muon``, ``sf-adamw`` ...) or an optimizer class path.
        lr, betas, eps, weight_decay, momentum, nesterov: torch.optim names.
        extra: the algorithm's own hyperparameters by their paper names (``{"alpha": 8, "beta3": 0.9999}``
            for AdEMAMix, ``{"ns_steps": 5}`` for Muon ...).
        scheduler: ``constant | cosine | linear | wsd | inverse-sqrt``; ``None`` (the default) picks the
            optimizer's own: ``constant`` for schedule-free optimizers (they need no decay), else ``cosine``.
            A schedule-free optimizer with a decaying schedule warns.
        warmup_steps: linear warmup from 0.
        total_steps: schedule horizon; default ``trainer.max_steps`` (or the Trainer's estimate).
        decay_fraction, cooldown_shape, cooldown_start: WSD's cooldown (fraction of the run, shape
            ``linear|cosine|sqrt``, or an explicit start step to branch a cooldown from a checkpoint).
        final_fraction: final lr as a fraction of the peak.
        timescale: inverse-sqrt's τ.
            The schedule fields left ``None`` take the schedule's own defaults (``lightning-optim info wsd``:
            WSD decay_fraction 0.2, cooldown_shape sqrt, final 0; cosine final 0.01; linear final 0.001);
            one set for a schedule that does not take it is refused.
        decay_embeddings, decay_norms, decay_biases, no_decay_patterns, other_patterns, lr_scales:
            the grouping rules (see :mod:`lightning_optim.param_groups`).
        mup_base_width: muP (:mod:`lightning_optim.mup`): the width whose hyperparameters (``lr`` ...) were
            tuned. The groups get muP's per-layer lr multipliers (``lr_multiplier``; Adam rule: hidden matrices
            ``lr / m_in``; Muon: its own shape factor) and the model must be built with the same base width
            (``LanguageModel`` does it from this field: init, readout multiplier, attention ``1/head_dim``).
            Refused for optimizers where muP is not defined here (:func:`lightning_optim.mup.optimizer_rule`).
    """

    name: str = "adamw"
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    warmup_steps: int = 0
    total_steps: int | None = None
    decay_fraction: float | None = None
    final_fraction: float | None = None
    cooldown_shape: str | None = None
    cooldown_start: int | None = None
    timescale: int | None = None
    decay_embeddings: bool = False
    decay_norms: bool = False
    decay_biases: bool = False
    no_decay_patterns: list[str] = field(default_factory=list)
    other_patterns: list[str] = field(default_factory=list)
    lr_scales: dict[str, float] = field(default_factory=dict)
    mup_base_width: int | None = None

    def __post_init__(self) -> None:
        if self.betas is not None:
            self.betas = tuple(self.betas)
        if self.scheduler is None:
            self.scheduler = default_scheduler(self.name)
        self.validate()

    # -- what goes where ------------------------------------------------------------------------------------

    def optimizer_kwargs(self) -> dict[str, Any]:
        kwargs = {k: getattr(self, k) for k in _TORCH_NAMES if getattr(self, k) is not None}
        clash = set(kwargs) & set(self.extra)
        if clash:
            raise ValueError(f"OptimConfig sets {sorted(clash)} both as fields and in extra; use one")
        return {**kwargs, **dict(self.extra)}

    def scheduler_kwargs(self) -> dict[str, Any]:
        """The schedule fields that are set (the schedule's defaults fill the rest); refuses one it does not take."""
        accepted = get_scheduler_spec(self.scheduler).defaults
        kwargs = {}
        for name in _SCHEDULE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in accepted:
                raise ValueError(
                    f"OptimConfig.{name}={value!r} does not apply to schedule {self.scheduler!r} "
                    f"(it takes {', '.join(sorted(accepted)) or 'no extra arguments'})"
                )
            kwargs[name] = value
        return kwargs

    def grouping_rules(self) -> GroupingRules:
        return GroupingRules(
            decay_embeddings=self.decay_embeddings, decay_norms=self.decay_norms, decay_biases=self.decay_biases,
            no_decay_patterns=tuple(self.no_decay_patterns), other_patterns=tuple(self.other_patterns),
            lr_scales=dict(self.lr_scales),
        )

    def validate(self) -> None:
        """Refuse an unknown optimizer/schedule, unknown or out-of-range settings, before training starts."""
        spec = get_optimizer_spec(self.name)
        validate_hyperparameters(spec, self.optimizer_kwargs())
        sched = get_scheduler_spec(self.scheduler)
        kwargs = self.scheduler_kwargs()
        sched.schedule_cls(total_steps=self.total_steps, warmup_steps=self.warmup_steps, **{**sched.defaults, **kwargs})
        for k, v in self.lr_scales.items():
            check_value("lr_scale", v, label=f"OptimConfig.lr_scales[{k!r}]")
        if self.mup_base_width is not None:
            base = self.mup_base_width
            if isinstance(base, bool) or not isinstance(base, int) or base <= 0:
                raise ValueError(f"OptimConfig.mup_base_width must be a positive integer (a width), got {base!r}")
            if spec.family == "external":
                raise ValueError(f"OptimConfig.mup_base_width: muP is not defined for the class path {self.name!r}; "
                                 "use a registry optimizer with a muP rule")
            optimizer_rule(spec.name, {**spec.defaults, **self.optimizer_kwargs()})  # refuses, naming the rules
        if spec.schedule_free and sched.name != "constant":
            warnings.warn(
                f"optimizer {spec.name!r} is schedule-free (it averages its iterates instead of decaying the lr) but "
                f"scheduler={sched.name!r} decays the lr; the published recipe uses scheduler='constant' "
                "(the default for schedule-free optimizers when scheduler is left unset)", UserWarning, stacklevel=3)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> "OptimConfig":
        """From ``hparams.optim`` (an OptimConfig, dict or namespace) or flat names (``optimizer``, ``lr`` ...)."""
        optim = hparams.get("optim") if hasattr(hparams, "get") else None
        if isinstance(optim, OptimConfig):
            return optim
        if optim is not None:
            data = dict(vars(optim)) if not isinstance(optim, Mapping) else dict(optim)
            return cls(**_known_fields(data))
        flat = _known_fields(hparams)
        name = hparams.get("optimizer", hparams.get("optimizer_name"))
        if isinstance(name, str):
            flat["name"] = name
        return cls(**flat)


def default_scheduler(optimizer_name: str) -> str:
    """The schedule an optimizer gets when none is named: ``constant`` if it is schedule-free, else ``cosine``."""
    return "constant" if get_optimizer_spec(optimizer_name).schedule_free else "cosine"


# Checkpoints store the hyperparameters, an OptimConfig among them; allow it under torch.load(weights_only=True)
# (Lightning's and the user's), since it holds only plain data.
torch.serialization.add_safe_globals([OptimConfig])


def _snapshot(data: Any) -> Any:
    """A comparable copy of hyperparameters (a dict, a namespace, or anything else as itself)."""
    if isinstance(data, Mapping):
        return copy.deepcopy(dict(data))
    if hasattr(data, "__dict__"):
        return copy.deepcopy(dict(vars(data)))
    return copy.deepcopy(data)


def _represent_optim_config(dumper: yaml.Dumper, config: OptimConfig) -> Any:
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return dumper.represent_dict(plain(dataclasses.asdict(config)))


# hparams.yaml (Lightning dumps hyperparameters with yaml.dump) shows an OptimConfig as a plain mapping that
# yaml.safe_load reads back, instead of a python/object tag.
for _dumper in (yaml.Dumper, yaml.SafeDumper):
    yaml.add_representer(OptimConfig, _represent_optim_config, Dumper=_dumper)


def _known_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(OptimConfig)}
    return {k: v for k, v in dict(data).items() if k in names and not k.startswith("_")}


class OptimizerMixin:
    """Gives a LightningModule a registry-backed ``configure_optimizers`` (see the module docstring)."""

    def optim_config(self) -> OptimConfig:
        """The module's :class:`OptimConfig`: the one in ``hparams.optim`` as it is, else built (and validated) once
        from a dict / namespace / flat hyperparameters and kept until those change."""
        hparams = getattr(self, "hparams", {}) or {}
        optim = hparams.get("optim") if hasattr(hparams, "get") else None
        if isinstance(optim, OptimConfig):
            return optim
        source = _snapshot(optim if optim is not None else hparams)
        cached = self.__dict__.get("_lo_optim_config")
        if cached is None or cached[0] != source:
            cached = (source, OptimConfig.from_hparams(hparams))
            self.__dict__["_lo_optim_config"] = cached
        return cached[1]

    def optim_spec(self) -> Any:
        """The registry spec of the configured optimizer (looked up once per optimizer name)."""
        config = self.optim_config()
        cached = self.__dict__.get("_lo_optim_spec")
        if cached is None or cached[0] != config.name:
            cached = (config.name, get_optimizer_spec(config.name))
            self.__dict__["_lo_optim_spec"] = cached
        return cached[1]

    def optimizer_param_groups(self, config: OptimConfig, split_matrices: bool) -> list[dict[str, Any]]:
        """The parameter groups handed to the optimizer. Override to change the grouping."""
        return param_groups(self, split_matrices=split_matrices, rules=config.grouping_rules())

    def model_hyperparameters(self) -> dict[str, Any]:
        """Facts about the model that optimizers may take as hyperparameters (e.g. ``{"n_heads": 12}`` for
        Adam-mini's per-head blocks). Each fills only a hyperparameter the chosen optimizer accepts and the user left
        ``None``. Override to provide them; the default provides none."""
        return {}

    def _check_mup_model(self, base_width: int) -> None:
        built = getattr(find_mup_model(self).config, "mup_base_width", None)
        if built != base_width:
            raise ValueError(f"OptimConfig.mup_base_width={base_width} but the model was built with "
                             f"mup_base_width={built}: build it with the same base width (LanguageModel takes it "
                             "from its optim config)")

    def _optim_horizon(self, config: OptimConfig) -> int | None:
        if config.total_steps is not None:
            return config.total_steps
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        return None

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optim_config()
        spec = self.optim_spec()
        groups = self.optimizer_param_groups(config, split_matrices=spec.hybrid)
        hyperparameters = config.optimizer_kwargs()
        if config.mup_base_width is not None:
            self._check_mup_model(config.mup_base_width)
            groups = mup_param_groups(self, groups, spec.name, {**spec.defaults, **hyperparameters})
        horizon = self._optim_horizon(config)
        for name, value in self.model_hyperparameters().items():  # e.g. Adam-mini's n_heads from the model
            if name in spec.defaults and hyperparameters.get(name, spec.defaults.get(name)) is None:
                hyperparameters[name] = value
        for name in spec.horizon_hyperparameters:  # e.g. AdEMAMix's alpha/beta3 warmups = the run's length
            if hyperparameters.get(name, spec.defaults.get(name)) is None and horizon is not None:
                hyperparameters[name] = horizon
        optimizer = create_optimizer(config.name, groups, **hyperparameters)
        scheduler = create_scheduler(
            config.scheduler, optimizer, horizon, config.warmup_steps, **config.scheduler_kwargs(),
        )
        if scheduler.schedule.total_steps is None:
            scheduler.total_steps_fn = self._estimated_total_steps
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _estimated_total_steps(self) -> float:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            raise RuntimeError("the schedule needs a horizon: set OptimConfig.total_steps or Trainer(max_steps=...)")
        return trainer.estimated_stepping_batches

    def configure_callbacks(self) -> list[Any]:
        """Callbacks the chosen optimizer needs (``OptimizerSpec.callbacks``), added once."""
        parent = super()
        callbacks = list(parent.configure_callbacks()) if hasattr(parent, "configure_callbacks") else []
        spec = self.optim_spec()
        trainer = getattr(self, "_trainer", None)
        present = {type(cb) for cb in (trainer.callbacks if trainer is not None else [])} | {type(c) for c in callbacks}
        for path in spec.callbacks:
            cls = import_object(path)
            if cls not in present:
                callbacks.append(cls())
        return callbacks

"""lightning-optim: optimizers, LR schedules and stability callbacks for LLM pretraining with Lightning.

Public API (stable names; see README.md)::

    create_optimizer(name, params_or_module, **hp)        create_scheduler(name, optimizer, total_steps, warmup_steps)
    available_optimizers()  available_schedulers()        optimizer_info(name)
    register_optimizer(name, ...)  (decorator)            OptimizerMixin, OptimConfig
    param_groups(module, split_matrices=...)              estimate_memory(...)
    allow_optimizer_module(module)  (class paths from modules beyond the built-in allow-list)

Where an optimizer lives, from definition to step::

    defined     lightning_optim/optim/<name>.py          the algorithm class (its signature holds the defaults)
    registered  lightning_optim/builtins.py              one record per name: state layout, paper, overrides
    grouped     lightning_optim/param_groups.py          decay / no-decay / matrix groups of a module
    built       lightning_optim/registry.py              create_optimizer: lookup, checks, factory(groups, **hp)
    stepped     optim/<name>.py step(), on the shared bases in optim/_elementwise.py (elementwise) and
                optim/_hybrid.py (Muon family)
"""

from lightning_optim.class_paths import allow_optimizer_module
from lightning_optim.memory import MemoryEstimate, estimate_memory
from lightning_optim.mixin import OptimConfig, OptimizerMixin
from lightning_optim.param_groups import GroupingRules, param_groups, routing_table
from lightning_optim.registry import (
    OptimizerSpec,
    SchedulerSpec,
    StateLayout,
    available_optimizers,
    available_schedulers,
    create_optimizer,
    create_scheduler,
    optimizer_info,
    register_optimizer,
    register_optimizer_spec,
    scheduler_info,
)

__version__ = "0.1.0"

__all__ = [
    "OptimizerMixin",
    "OptimConfig",
    "create_optimizer",
    "create_scheduler",
    "available_optimizers",
    "available_schedulers",
    "optimizer_info",
    "scheduler_info",
    "register_optimizer",
    "register_optimizer_spec",
    "OptimizerSpec",
    "SchedulerSpec",
    "StateLayout",
    "GroupingRules",
    "param_groups",
    "routing_table",
    "estimate_memory",
    "MemoryEstimate",
    "allow_optimizer_module",
]

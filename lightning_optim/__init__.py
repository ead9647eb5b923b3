"""lightning-optim: optimizers, LR schedules and stability callbacks for LLM pretraining with Lightning.

Public API (stable names; see README.md)::

    create_optimizer(name, params_or_module, **hp)        create_scheduler(name, optimizer, total_steps, warmup_steps)
    available_optimizers()  available_schedulers()        optimizer_info(name)
    register_optimizer(name, ...)  (decorator)            OptimizerMixin, OptimConfig
    param_groups(module, split_matrices=...)              estimate_memory(...)
    allow_optimizer_module(module)  (class paths from modules beyond the built-in allow-list)
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

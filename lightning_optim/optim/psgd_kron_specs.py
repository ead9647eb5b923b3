"""Registry records of psgd-kron: one :class:`~lightning_optim.specs.OptimizerSpec` per registry name.

The algorithm module knows nothing of the registry; :mod:`lightning_optim.builtins` splices :data:`SPECS`
into the built-in table.
"""

from __future__ import annotations

from lightning_optim.specs import OptimizerSpec

__all__ = ["SPECS"]

SPECS: tuple[OptimizerSpec, ...] = ()

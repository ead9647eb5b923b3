"""Built-in optimizers. Importing a module registers its optimizers with the registry.

One file per algorithm family; shared kernels (Newton–Schulz, foreach helpers) live beside them in
files starting with ``_`` or named for the kernel.
"""

from lightning_optim.optim import torch_builtin  # noqa: F401  adamw adam sgd adafactor

# elementwise family (issue 3): one import line per module
from lightning_optim.optim import lion  # noqa: F401
from lightning_optim.optim import signum  # noqa: F401
from lightning_optim.optim import adopt  # noqa: F401
from lightning_optim.optim import ademamix  # noqa: F401
from lightning_optim.optim import mars  # noqa: F401
from lightning_optim.optim import prodigy  # noqa: F401
from lightning_optim.optim import sf_adamw  # noqa: F401
from lightning_optim.optim import adamw8bit  # noqa: F401

# matrix family (issue 4): one import line per module
from lightning_optim.optim import soap  # noqa: F401  soap
from lightning_optim.optim import sophia  # noqa: F401  sophia (sophia-g)
from lightning_optim.optim import muon  # noqa: F401  muon d-muon
from lightning_optim.optim import normuon  # noqa: F401  normuon
from lightning_optim.optim import sf_normuon  # noqa: F401  sf-normuon

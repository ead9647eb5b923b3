"""Built-in optimizers. Importing a module registers its optimizers with the registry.

One file per algorithm family; shared kernels (Newton–Schulz, foreach helpers) live beside them in
files starting with ``_`` or named for the kernel.
"""

from lightning_optim.optim import torch_builtin  # noqa: F401  adamw adam sgd adafactor

# elementwise family (issue 3): one import line per module

# matrix family (issue 4): one import line per module

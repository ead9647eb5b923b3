"""Registry records of psgd-kron: one :class:`~lightning_optim.specs.OptimizerSpec` per registry name.

The algorithm module knows nothing of the registry; :mod:`lightning_optim.builtins` splices :data:`SPECS`
into the built-in table. The record's ``defaults`` are the class's ``__init__`` defaults (kron_torch's
published settings live in the signature, written once) but for ``max_size_triangular`` (:data:`_DEFAULTS`); the state layout counts the factors with the same
layout function the optimizer uses (:func:`~lightning_optim.optim.psgd_kron.factor_numel`) at those defaults.
"""

from __future__ import annotations

from lightning_optim.optim import psgd_kron
from lightning_optim.specs import OptimizerSpec, StateLayout, signature_defaults

__all__ = ["SPECS"]

#: kron-torch 0.3.3's settings (the class signature), except ``max_size_triangular``: 2048, the earlier Kron
#: default (kron_torch / psgd_jax before 8192), instead of 8192. With 8192 the tiny preset's 4096-token
#: embedding and head get dense 4096×4096 factors whose d³ update took 9.1 s per optimizer step on CPU (AdamW:
#: 0.8 ms); with 2048 that dimension gets a diagonal factor. The Llama 124M–210M matrices (768, 2048) keep
#: triangular factors on both sides; a 50304-row vocabulary is diagonal either way. Pass
#: ``max_size_triangular=8192`` for kron-torch's setting exactly.
_DEFAULTS = {**signature_defaults(psgd_kron.PSGDKron)[0], "max_size_triangular": 2048}
_LAYOUT_KEYS = ("max_size_triangular", "min_ndim_triangular", "memory_save_mode", "merge_dims")


def _factors(shape: tuple[int, ...]) -> int:
    """+ Σ d² (triangular factors, dims <= 2048) + Σ d (diagonal: vectors, larger dims)"""
    return psgd_kron.factor_numel(shape, **{k: _DEFAULTS[k] for k in _LAYOUT_KEYS})


SPECS: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="psgd-kron", factory=psgd_kron.PSGDKron, defaults=_DEFAULTS, family="matrix",
        state=StateLayout(1, extra=_factors, names=("momentum_buffer",), replicated="all"),
        routing="every parameter follows the same rule: one Kronecker factor per dimension of its work shape "
        "(> 2 dims merged to a matrix), triangular for dims <= max_size_triangular of tensors with >= "
        "min_ndim_triangular dims, diagonal otherwise (vectors, 0-d, larger dims, memory_save_mode)",
        paper="Li 2018, Preconditioner on Matrix Lie Group for SGD (arXiv 1809.10232); Li 2015, Preconditioned "
        "Stochastic Gradient Descent (arXiv 1512.04202)",
        reference="https://github.com/evanatyourservice/kron_torch (kron_torch/kron.py, PyPI kron-torch 0.3.3: "
        "defaults, update schedule, RMS clip); https://github.com/lixilinx/psgd_torch",
        description="debiased momentum preconditioned by P = QᵀQ, Q a Kronecker product of triangular/diagonal "
        "factors fitted online to whiten it (random probe v); update RMS clipped to 1.1",
        supports_dtensor=True,
        dtensor_note="the gradient is gathered (one all-gather per parameter per step); the state is replicated, "
        "not sharded, and every rank computes the full update (as SOAP)",
    ),
)

"""Lightning callbacks, one concern per file. Names resolve lazily so importing one does not import all."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ScheduleFreeSwitch": "lightning_optim.callbacks.schedule_free",
    "SophiaHessian": "lightning_optim.callbacks.sophia_hessian",
    "LossSpikeDetector": "lightning_optim.callbacks.loss_spike",
    "NonFiniteGuard": "lightning_optim.callbacks.non_finite",
    "GradientClipping": "lightning_optim.callbacks.gradient_clipping",
    "ZLoss": "lightning_optim.callbacks.z_loss",
    "LayerNormMonitor": "lightning_optim.callbacks.layer_norms",
    "TokenThroughput": "lightning_optim.callbacks.throughput",
    "QKClip": "lightning_optim.callbacks.qk_clip",
    "TrainingUnstableError": "lightning_optim.callbacks._decisions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_optim.callbacks' has no attribute {name!r}")

"""GradientClipping: global-norm, per-layer and adaptive (ZClip) clipping that also works under FSDP/FSDP2.

Example::

    from lightning_optim.callbacks import GradientClipping

    trainer = L.Trainer(callbacks=[GradientClipping(max_norm=1.0)])                 # global norm
    trainer = L.Trainer(callbacks=[GradientClipping(mode="per_layer", max_norm=0.5)])
    trainer = L.Trainer(callbacks=[GradientClipping(mode="adaptive")])              # ZClip defaults
    # leave Trainer(gradient_clip_val=None): this callback replaces Lightning's clipping

It runs in ``on_before_optimizer_step`` (gradients complete and unscaled; under DDP already all-reduced).
All arithmetic stays on the device: squared norms from ``torch._foreach_norm``, one ``all_reduce`` of the
sharded part for FSDP2 ``DTensor`` shards (equal to ``vector_norm(g).full_tensor()``) or FSDP1 flat shards, and
the clip coefficient applied with ``torch._foreach_mul_`` as a device tensor — no host sync at all. The squared
norms are the step's shared ones (:mod:`~lightning_optim.callbacks._step_norms`): ``NonFiniteGuard`` and
``LossSpikeDetector`` use the same measurement, so the three callbacks together make one ``_foreach_norm`` pass
per step, in any order; after scaling, the clipped norms (``c²‖g‖²``) are handed back to the cache, and gradients
changed in place by anything else are measured again. The norms are logged through ``pl_module.log`` as device
tensors: Lightning stores them and converts them to numbers (``.item()``) only on the steps it writes to the
loggers (every ``log_every_n_steps``), so logging every step costs no host sync. Lightning's own
``gradient_clip_algorithm="norm"`` refuses FSDP; this works there.

Modes:

- ``"global"``: ``g ← g · min(1, max_norm / (‖g‖ + 1e-6))`` with ``‖g‖`` over all gradients.
- ``"per_layer"``: the same per layer (all parameters of one module, e.g. a Linear's weight and bias).
- ``"adaptive"``: ZClip (Kumar et al. 2025, arXiv 2504.02507; reference bluorion-com/ZClip). The first
  ``warmup_steps`` norms are collected (no adaptive clipping; ``max_norm`` applies if set) and give the initial
  ``μ`` and ``σ²`` (population variance). Then, with ``z = (‖g‖ - μ)/(σ + eps)``: if ``z > z_thresh`` the norm is
  clipped to ``(μ + z_thresh·σ / (z / z_thresh)) · clip_factor`` (the paper's reciprocal rule,
  ``clip_option="adaptive_scaling"``) or to ``μ`` (``clip_option="mean"``); ``max_norm``, when set, caps it
  further. The EMA is then updated with ``n``, the norm after the adaptive clipping:
  ``μ ← α·μ + (1-α)·n``, ``σ² ← α·σ² + (1-α)·(n - μ)²`` (with the new ``μ``). Defaults ``α = 0.97``,
  ``z_thresh = 2.5``, 25 warm-up steps. (As in the reference code, the EMA is fed the adaptive clip value
  on a spike and the raw norm otherwise, before the optional ``max_norm`` cap.) Non-finite norms leave the gradients and the statistics untouched.

Logged every step: ``train/grad_norm`` (global norm before clipping) and ``train/grad_norm_clipped`` (after);
per-layer mode also logs ``train/grad_norm_clipped_layers`` (how many layers were clipped), adaptive mode
``train/grad_norm_ema_mean`` and ``train/grad_norm_ema_std``. ``state_dict`` keeps ``max_norm``,
``clip_factor`` (both tightened by rollbacks) and the ZClip statistics. ``enabled=False`` turns the callback into
a no-op (it then does not clip and does not object to ``Trainer(gradient_clip_val=...)``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_optim.callbacks._norms import LayerIndex, local
from lightning_optim.callbacks._step_norms import StepGradNorms

__all__ = ["GradientClipping", "clip_coefficient", "zclip_threshold"]

MODES = ("global", "per_layer", "adaptive")


def clip_coefficient(norm: Tensor, threshold: Tensor | float) -> Tensor:
    """The global-norm clip factor ``min(1, threshold / (‖g‖ + 1e-6))`` where ``‖g‖ > threshold``, else 1 (also 1
    when ``‖g‖`` is not finite: such gradients are left as they are). A device tensor; no host read."""
    finite = torch.isfinite(norm)
    threshold = torch.as_tensor(threshold, dtype=norm.dtype, device=norm.device)
    coef = torch.where(finite & (norm > threshold), threshold / (norm + 1e-6), torch.ones_like(norm))
    return coef.clamp(max=1.0)


def zclip_threshold(norm: Tensor, mean: Tensor, var: Tensor, z_thresh: float, eps: float, clip_option: str,
                    clip_factor: float) -> tuple[Tensor, Tensor]:
    """ZClip's clip value for ``norm`` given the EMA statistics: ``(threshold, clipped?)`` as device tensors.

    ``threshold`` equals ``norm`` when no clipping is due.
    """
    std = var.clamp_min(0).sqrt()
    z = (norm - mean) / (std + eps)
    spike = z > z_thresh
    if clip_option == "mean":
        value = mean
    else:
        value = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
    return torch.where(spike, value, norm), spike


class GradientClipping(Callback):
    """Clip gradients by global norm, per layer, or adaptively (ZClip), on device and under any strategy.

    Args:
        max_norm: the threshold for ``global`` / ``per_layer``; an optional extra cap for ``adaptive``.
        mode: ``"global"``, ``"per_layer"`` or ``"adaptive"``.
        alpha, z_thresh, warmup_steps, eps, clip_option, clip_factor: ZClip settings (adaptive mode).
        log: log the norms before and after clipping.
        enabled: ``False`` makes the callback do nothing at all.
    """

    def __init__(
        self,
        max_norm: float | None = 1.0,
        mode: str = "global",
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        eps: float = 1e-6,
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        log: bool = True,
        enabled: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "adaptive" and (max_norm is None or max_norm <= 0):
            raise ValueError(f"mode {mode!r} needs max_norm > 0, got {max_norm}")
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.mode = mode
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = warmup_steps
        self.eps = eps
        self.clip_option = clip_option
        self.clip_factor = clip_factor
        self.log = log
        self.enabled = bool(enabled)
        # ZClip statistics (device tensors once training runs)
        self._warmup: list[Tensor] = []
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self._index: LayerIndex | None = None
        self.last_norm: Tensor | None = None          # global norm before clipping (device tensor)
        self.last_clipped_norm: Tensor | None = None  # after

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "max_norm": self.max_norm, "clip_factor": self.clip_factor,
            "warmup": [float(x) for x in self._warmup],
            "mean": None if self.mean is None else float(self.mean),
            "var": None if self.var is None else float(self.var),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.max_norm = state_dict.get("max_norm", self.max_norm)
        self.clip_factor = float(state_dict.get("clip_factor", self.clip_factor))
        self._warmup = [torch.tensor(float(x)) for x in state_dict.get("warmup", [])]
        mean, var = state_dict.get("mean"), state_dict.get("var")
        self.mean = None if mean is None else torch.tensor(float(mean))
        self.var = None if var is None else torch.tensor(float(var))

    def tighten(self, factor: float) -> None:
        """Multiply the threshold by ``factor`` (called by LossSpikeDetector on a rollback)."""
        if self.max_norm is not None:
            self.max_norm *= factor
        if self.mode == "adaptive":
            self.clip_factor *= factor

    # ---------------------------------------------------------------- hook
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if not self.enabled:
            return
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise ValueError("GradientClipping replaces Trainer(gradient_clip_val=...): set only one of them")
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        norms = StepGradNorms.of(trainer, optimizer)
        grads, sq = norms.squared([p.grad for p in params])
        norm = sq.sum().sqrt()
        finite = torch.isfinite(norm)
        if self.mode == "per_layer":
            after = self._clip_per_layer(pl_module, params, grads, sq, finite)
        else:
            coef = clip_coefficient(norm, self._threshold(norm, finite))
            torch._foreach_mul_([local(g) for g in grads], coef.to(local(grads[0]).device))
            after = sq * coef * coef
        norms.rescaled(grads, after)
        after_norm = after.sum().sqrt()
        self.last_norm, self.last_clipped_norm = norm, after_norm
        if self.log:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
            pl_module.log("train/grad_norm_clipped", after_norm, on_step=True, on_epoch=False)
            if self.mode == "adaptive" and self.mean is not None:
                pl_module.log("train/grad_norm_ema_mean", self.mean, on_step=True, on_epoch=False)
                pl_module.log("train/grad_norm_ema_std", self.var.clamp_min(0).sqrt(), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.enabled:  # a step that never ran (GradScaler skipped it) leaves no cached norms behind
            StepGradNorms.clear_all(list(getattr(trainer, "optimizers", [])))

    def _threshold(self, norm: Tensor, finite: Tensor) -> Tensor:
        cap = torch.full_like(norm, float("inf") if self.max_norm is None else self.max_norm)
        if self.mode == "global":
            return cap
        # adaptive (ZClip)
        if self.mean is None:
            if len(self._warmup) < self.warmup_steps:
                self._warmup.append(torch.where(finite, norm, torch.full_like(norm, float("nan"))).detach())
            if len(self._warmup) >= self.warmup_steps:
                buf = torch.stack([w.to(norm.device) for w in self._warmup])
                ok = torch.isfinite(buf)
                n = ok.sum().clamp_min(1)
                vals = torch.where(ok, buf, torch.zeros_like(buf))
                self.mean = vals.sum() / n
                self.var = (torch.where(ok, (buf - self.mean) ** 2, torch.zeros_like(buf))).sum() / n
                self._warmup = []
            return cap
        self.mean, self.var = self.mean.to(norm.device), self.var.to(norm.device)
        value, _spike = zclip_threshold(norm, self.mean, self.var, self.z_thresh, self.eps, self.clip_option,
                                        self.clip_factor)
        threshold = torch.minimum(value, cap)
        # as the reference: the EMA sees the adaptive clip value on a spike, the raw norm otherwise
        new_mean = self.alpha * self.mean + (1 - self.alpha) * value
        new_var = self.alpha * self.var + (1 - self.alpha) * (value - new_mean) ** 2
        self.mean = torch.where(finite, new_mean, self.mean)
        self.var = torch.where(finite, new_var, self.var)
        return threshold

    def _clip_per_layer(self, pl_module: Any, params: list[Tensor], grads: list[Tensor], sq: Tensor,
                        finite: Tensor) -> Tensor:
        if self._index is None or len(self._index.params) < len(params):
            self._index = LayerIndex(pl_module)
        pos = {id(p): i for i, p in enumerate(self._index.params)}
        ids_list = [self._layer_of(pos, p) for p in params]
        ids = torch.tensor(ids_list, device=sq.device)
        layer_sq = torch.zeros(len(self._index.layers) + 1, device=sq.device).index_add_(0, ids, sq)
        layer_norm = layer_sq.sqrt()
        coef = (self.max_norm / (layer_norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(layer_norm), coef, torch.ones_like(coef))
        per_param = coef.index_select(0, ids)
        device = local(grads[0]).device
        torch._foreach_mul_([local(g) for g in grads], list(per_param.to(device).unbind()))
        if self.log:
            pl_module.log("train/grad_norm_clipped_layers", (coef < 1).sum().float(), on_step=True, on_epoch=False)
        return sq * per_param ** 2

    def _layer_of(self, pos: dict[int, int], p: Tensor) -> int:
        i = pos.get(id(p))
        if i is None:  # a parameter the module does not list: its own layer at the end
            return len(self._index.layers)
        return self._index._ids[i]

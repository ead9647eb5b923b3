"""QK-clip (the "Clip" of MuonClip): after each optimizer step, shrink the query/key projections of every
attention head whose largest logit of the step went over a threshold.

Kimi Team 2025, "Kimi K2: Open Agentic Intelligence" (arXiv 2507.20534), Section 2.1 and Algorithm 1. For
head ``h``, over the step's batch (every micro-batch of an accumulated step, every rank)::

    S_max^h = max_{batch} max_{j <= i} softmax_scale · q_i^h · k_j^h          (causal positions, after RoPE)
    if S_max^h > τ:   γ_h = τ / S_max^h
                      W_q^h ← sqrt(γ_h) · W_q^h,    W_k^h ← sqrt(γ_h) · W_k^h        (multi-head attention)

so the same batch through the new weights has ``S_max^h = τ`` (published ``τ = 100``). Only heads over ``τ`` are
touched; the others keep their weights bit for bit. The forward and backward passes are not changed, nor is
the optimizer's state. The rule is optimizer-agnostic (Kimi pair it with Muon).

Choices where the rule needs one:

* **Grouped-query attention** (``n_kv_head < n_head``: one key head read by several query heads): the shared key
  rows are left alone and the query rows of a clipped head get the whole ``γ_h`` — the paper's rule for the
  key part that its MLA shares across heads (the rotary key ``k^R``, left untouched while ``q^R`` takes ``γ_h``).
  Scaling a shared key would change the logits of the group's other heads, which may be under ``τ``.
* **Biases**: ``q = W_q·x + b_q``, so scaling the bias rows with the weight rows scales ``q`` (and ``k``) exactly;
  the bias rows of a head are scaled with its weight rows.
* **Non-finite logits** (a step that a ``NonFiniteGuard`` drops): a head whose maximum is ``inf``/``NaN`` is not
  clipped (``γ = τ/inf = 0`` would erase it); it is counted in the log as it is.
* **Validation / eval forwards** are not recorded (the observer reads ``module.training``).

Models: every module exposing ``qk_observer`` (a callable slot ``observer(module, q, k)`` called in each forward
with ``q`` ``(B, n_head, T, head_dim)`` and ``k`` ``(B, n_kv_head, T, head_dim)``), ``qk_head_rows(h)`` (the row
slices of ``qkv.weight`` for query head ``h`` and its key head), ``softmax_scale``, ``n_head``, ``n_kv_head`` and a
fused ``qkv`` linear: :class:`lightning_optim.models.gpt.Attention` does. A model with none is refused, naming
its class.

Distributed: the per-head maxima of all layers are stacked and max-all-reduced once per step (one collective),
so every DDP replica / FSDP2 rank applies the same factors. Under FSDP2 ``qkv.weight`` is a ``DTensor`` sharded
on dim 0 (``Shard(0)``, or ``(Replicate(), Shard(0))`` under HSDP): each rank rescales the rows its shard holds
(``torch.chunk`` row offsets); other layouts (column shards, tensor-parallel strided shards) are refused naming
the parameter. The clip itself runs on device, with no host synchronisation.

Cost: the observer computes ``q·kᵀ`` once more per attention layer and training forward (in float32, a few
sequences at a time: at most 2^25 logits held, ``chunk``), and the clip multiplies each ``qkv`` weight by a
per-row factor (exactly 1.0 for rows left alone). The forward+backward of the tiny preset (16 × 256 tokens) took
1.02–1.04× as long with the observer on a loaded 2-core machine (1.19× with one sequence at a time).

Usage::

    trainer = L.Trainer(callbacks=[QKClip(threshold=100.0)])      # logs train/qk_max_logit, train/qk_clipped_heads

    clipper = QKClipper(threshold=100.0).attach(model)            # a Fabric or plain loop
    for batch in loader:
        loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
        stats = clipper.clip()                                    # {"qk_max_logit": ..., "qk_clipped_heads": ...}
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_optim._dtensor import DTensor, Replicate, local, shard_dim
from lightning_optim.optim._matrix_dist import shard_rows

__all__ = ["QKClip", "QKClipper", "max_causal_logits"]

_REQUIRED = ("qk_observer", "qk_head_rows", "softmax_scale", "n_head", "n_kv_head", "qkv")


#: logits held at once by :func:`max_causal_logits` when ``chunk`` is left ``None`` (2^25 float32 = 128 MiB)
AUTO_CHUNK_ELEMENTS = 2 ** 25


def max_causal_logits(q: Tensor, k: Tensor, scale: float, chunk: int | None = None) -> Tensor:
    """Per query head, ``max_{b, j <= i} scale · q[b, h, i] · k[b, h // g, j]`` in float32 (``g = n_head /
    n_kv_head``); ``q`` ``(B, H, T, d)``, ``k`` ``(B, H_kv, T, d)``. ``chunk`` sequences at a time bound the
    ``(chunk, H, T, T)`` logits held at once (``None``: as many as fit in :data:`AUTO_CHUNK_ELEMENTS`)."""
    B, H, T, _ = q.shape
    if chunk is None:
        chunk = max(1, AUTO_CHUNK_ELEMENTS // max(1, H * T * T))
    group = H // k.shape[1]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    out = torch.full((H,), -math.inf, dtype=torch.float32, device=q.device)
    for start in range(0, B, chunk):
        qs = q[start:start + chunk].float()
        ks = k[start:start + chunk].float()
        if group > 1:
            ks = ks.repeat_interleave(group, dim=1)
        logits = torch.matmul(qs, ks.transpose(-1, -2)).mul_(scale).masked_fill_(future, -math.inf)
        out = torch.maximum(out, logits.amax(dim=(0, 2, 3)))
    return out


def _rows_of(param: Tensor, label: str) -> tuple[Tensor, int]:
    """The tensor this rank holds of ``param`` and the global index of its first row."""
    if not isinstance(param, DTensor):
        return param, 0
    dims = [(i, shard_dim(p)) for i, p in enumerate(param.placements) if shard_dim(p) is not None]
    bad = [p for p in param.placements if shard_dim(p) is None and not isinstance(p, Replicate)]
    if bad or len(dims) > 1 or any(d != 0 for _, d in dims) or any(type(p).__name__ == "_StridedShard"
                                                                  for p in param.placements):
        raise ValueError(f"QKClip: {label} is a DTensor with placements {param.placements}; only row shards "
                         "(Shard(0), FSDP2) and replicas can be rescaled per head")
    loc = local(param)
    if not dims:
        return loc, 0
    mesh_dim = dims[0][0]
    sizes = shard_rows(param.shape[0], param.device_mesh.size(mesh_dim))
    rank = param.device_mesh.get_local_rank(mesh_dim)
    if loc.shape[0] != sizes[rank]:
        raise ValueError(f"QKClip: {label}: the local shard has {loc.shape[0]} rows, torch.chunk would give "
                         f"{sizes[rank]}; unknown row layout")
    return loc, sum(sizes[:rank])


class QKClipper:
    """Records the per-head maximum logit of every attention module of a model and rescales its query/key rows
    (see the module docstring). :meth:`attach` once, :meth:`clip` after every optimizer step.

    Args:
        threshold: τ, the largest logit allowed (published 100).
        process_group: the ranks whose maxima are combined (default: the whole job when it is distributed).
        chunk: sequences per logit computation (memory: ``chunk · n_head · T²`` float32 values); ``None``: as
            many as fit in 2^25 values (128 MiB).
    """

    def __init__(self, threshold: float = 100.0, process_group: Any = None, chunk: int | None = None) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold <= 0:
            raise ValueError(f"QKClip: threshold must be a finite number > 0, got {threshold!r}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"QKClip: chunk must be a positive integer or None, got {chunk!r}")
        self.threshold = float(threshold)
        self.process_group = process_group
        self.chunk = chunk
        self.modules: list[tuple[str, nn.Module]] = []
        self._max: dict[int, Tensor] = {}

    # -- recording ------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> "QKClipper":
        """Install the observer on every module of ``model`` that exposes ``qk_observer``; returns ``self``."""
        found = [(n, m) for n, m in model.named_modules() if hasattr(m, "qk_observer")]
        if not found:
            raise TypeError(f"QKClip: {type(model).__name__} has no attention module exposing qk_observer (with "
                            "qk_head_rows, softmax_scale and a fused qkv projection), as "
                            "lightning_optim.models.gpt.Attention does; nothing to clip")
        for name, m in found:
            missing = [a for a in _REQUIRED if not hasattr(m, a)]
            if missing:
                raise TypeError(f"QKClip: {name or type(model).__name__} ({type(m).__name__}) exposes qk_observer "
                                f"but not {', '.join(missing)}")
            if m.qk_observer is not None and m.qk_observer != self._observe:
                raise ValueError(f"QKClip: {name} ({type(m).__name__}) already has a qk_observer "
                                 f"({m.qk_observer!r}); detach it first")
        for _, m in found:
            m.qk_observer = self._observe
        self.modules = found
        self.reset()
        return self

    def detach(self) -> None:
        """Remove the observers this clipper installed."""
        for _, m in self.modules:
            if m.qk_observer == self._observe:
                m.qk_observer = None
        self.modules = []
        self.reset()

    def reset(self) -> None:
        """Forget the maxima recorded since the last clip."""
        self._max = {}

    @torch.no_grad()
    def _observe(self, module: nn.Module, q: Tensor, k: Tensor) -> None:
        if not module.training:
            return
        m = max_causal_logits(q.detach(), k.detach(), float(module.softmax_scale), self.chunk)
        prev = self._max.get(id(module))
        self._max[id(module)] = m if prev is None else torch.maximum(prev, m)

    def max_logits(self) -> list[Tensor]:
        """Per attached module, the ``(n_head,)`` maxima recorded on this rank since the last clip
        (``-inf`` for a module with no training forward)."""
        out = []
        for _, m in self.modules:
            rec = self._max.get(id(m))
            out.append(rec if rec is not None else
                       torch.full((m.n_head,), -math.inf, device=m.qkv.weight.device))
        return out

    # -- clipping -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def clip(self) -> dict[str, Tensor]:
        """Combine the maxima over the ranks, rescale the rows of the heads over the threshold and reset.

        Returns device tensors: ``qk_max_logit`` (the largest logit of the step over all heads, before clipping)
        and ``qk_clipped_heads`` (how many heads were rescaled)."""
        if not self.modules:
            raise RuntimeError("QKClip: clip() before attach(model)")
        maxima = self.max_logits()
        sizes = [t.numel() for t in maxima]
        stacked = torch.cat(maxima).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=self.process_group)
        over = torch.isfinite(stacked) & (stacked > self.threshold)
        gamma = torch.where(over, self.threshold / stacked.clamp_min(self.threshold), torch.ones_like(stacked))
        for (name, m), g in zip(self.modules, gamma.split(sizes)):
            self._rescale(name, m, g)
        self.reset()
        return {"qk_max_logit": stacked.max(), "qk_clipped_heads": over.sum()}

    def _rescale(self, name: str, m: nn.Module, gamma: Tensor) -> None:
        """Multiply the rows of ``m.qkv`` (weight and bias) by per-row factors built from the heads' ``γ``
        (exactly 1.0 for rows of heads not clipped and for the value rows)."""
        weight = m.qkv.weight
        factor = torch.ones(weight.shape[0], dtype=torch.float32, device=gamma.device)
        shared = m.n_kv_head != m.n_head
        for h in range(m.n_head):
            q_rows, k_rows = m.qk_head_rows(h)
            if shared:
                factor[q_rows] = gamma[h]
            else:
                factor[q_rows] = gamma[h].sqrt()
                factor[k_rows] = gamma[h].sqrt()
        for label, param in ((f"{name}.qkv.weight", weight), (f"{name}.qkv.bias", m.qkv.bias)):
            if param is None:
                continue
            rows, offset = _rows_of(param, label)
            f = factor[offset:offset + rows.shape[0]].to(rows.dtype)
            rows.mul_(f.view(-1, *([1] * (rows.dim() - 1))))


class QKClip(Callback):
    """Lightning callback around :class:`QKClipper`: observers installed at the start of fitting, the clip
    after every optimizer step (once per accumulated step), ``train/qk_max_logit`` and
    ``train/qk_clipped_heads`` logged at each step.

    Args:
        threshold: τ (published 100).
        log: log the two values through ``pl_module.log``.
        chunk: as :class:`QKClipper`.
        enabled: ``False`` makes the callback do nothing at all (no observers, no clip): for recipes that list it
            as an opt-in group.
    """

    def __init__(self, threshold: float = 100.0, log: bool = True, chunk: int | None = None,
                 enabled: bool = True) -> None:
        super().__init__()
        if not isinstance(enabled, bool):
            raise ValueError(f"QKClip: enabled must be True or False, got {enabled!r}")
        self.clipper = QKClipper(threshold, chunk=chunk)
        self.log = log
        self.enabled = enabled
        self._pending = False

    @property
    def threshold(self) -> float:
        return self.clipper.threshold

    def state_dict(self) -> dict[str, Any]:
        return {}  # the maxima are reset at every optimizer step: nothing outlives a step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled:
            self.clipper.attach(pl_module)  # after configure_model: FSDP2 parameters are already DTensors

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.clipper.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.clipper.detach()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._pending = self.enabled

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._pending:  # a micro-batch of an accumulated step: keep recording
            return
        self._pending = False
        stats = self.clipper.clip()
        if self.log:
            pl_module.log("train/qk_max_logit", stats["qk_max_logit"], on_step=True, on_epoch=False)
            pl_module.log("train/qk_clipped_heads", stats["qk_clipped_heads"].float(), on_step=True, on_epoch=False)

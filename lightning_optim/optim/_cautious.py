"""The cautious mask (Liang, Chen, Liu & Liu 2024, "Cautious Optimizers: Improving Training with One Line of
Code", arXiv 2411.16085; reference code github.com/kyleliang919/C-Optim), shared by every optimizer with a
``cautious`` option.

Let ``u_t`` be the update a base optimizer would apply to a tensor (``p ← p − lr·u_t``, weight decay aside)
and ``g_t`` the gradient at the current weights. The cautious update of that tensor is::

    φ_t = 1[u_t ⊙ g_t > 0]                       elementwise: 0 where the signs disagree or either is 0
    ū_t = u_t ⊙ φ_t / max(mean(φ_t), 1e-3)       mean over *every* entry of the tensor (d entries)
    p  ← p − lr·ū_t

The rescale is the mean of the mask floored at ``1e-3`` (``CAUTIOUS_FLOOR``), as in the official C-AdamW and
C-Muon code (``mask.div_(mask.mean().clamp_(min=1e-3))``) and timm's ``caution`` flag; the paper's one-line
listing writes ``m.mean() + eps`` and the first release (and the C-Lion file) ``d / (nnz + 1)``. All three agree
when most signs agree; they differ only near an all-zero mask, where the floor form gives a zero update.

Which vector is ``u_t`` follows the paper's recipes: for C-AdamW the first moment ``m_t`` (the numerator: the
positive denominator ``sqrt(v̂_t) + ε`` and the bias corrections do not change its sign), for C-Lion the sign
update ``sign(β1·m + (1-β1)·g)``, for C-Muon the orthogonalised update. Decoupled weight decay is applied to
every entry, as the base method applies it, and is **not** masked (the reference code decays ``p`` separately;
masking the decay is a different method, Cautious Weight Decay, arXiv 2510.12402).

The mean is per tensor over the whole (global) tensor. For an FSDP2 ``DTensor`` each rank holds a shard: the
mask is computed on the local shard, its count of ones (an exact int64) is summed over the mesh dimensions on
which the tensor is sharded (one ``all_reduce`` of the stacked counts per mesh dimension and bucket of tensors
with the same mesh and placements; replicated dimensions already hold the whole tensor and are not reduced),
and divided by the global ``numel``. So a sharded run masks and rescales exactly as one process would.

Two forms:

* :func:`cautious_` / :func:`cautious` take lists of tensors (the eager foreach paths; with ``param_objs``,
  the possibly-DTensor parameters, for the global count), no host synchronisation;
* :func:`cautious_tensor` is the rule on one whole tensor in plain torch ops, for use inside the compiled
  kernels of :mod:`lightning_optim.optim._elementwise` (one tensor is the whole tensor there; sharded tensors
  take the eager path, see :func:`needs_global_count`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_optim._dtensor import is_sharded

__all__ = ["CAUTIOUS_FLOOR", "cautious_", "cautious", "cautious_tensor", "cautious_masks", "mask_means",
           "needs_global_count", "check_cautious"]

#: the floor of the mask's mean in the rescale (the reference code's ``clamp_(min=1e-3)``)
CAUTIOUS_FLOOR = 1e-3


def check_cautious(value: Any, owner: str) -> bool:
    """``value`` as a bool; anything but ``True``/``False`` raises ``ValueError`` naming ``owner`` and
    ``cautious`` (a string such as ``"false"`` would otherwise be truthy)."""
    if value is True or value is False:
        return value
    raise ValueError(f"{owner}: cautious must be True or False, got {value!r}")


def cautious_masks(updates: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """``φ = 1[u ⊙ g > 0]`` per tensor, as bool tensors (NaN products give 0)."""
    return [x > 0 for x in torch._foreach_mul(list(updates), list(grads))]


def needs_global_count(param_objs: Sequence[Any] | None) -> bool:
    """Whether any of ``param_objs`` is a sharded ``DTensor``: its mask count needs an all-reduce, which the
    compiled per-tensor kernels do not do, so such buckets take the eager path."""
    return param_objs is not None and any(is_sharded(p) for p in param_objs)


def _reduce_counts(counts: list[Tensor], param_objs: Sequence[Any]) -> list[Tensor]:
    """``counts`` (0-d int64, one per tensor) summed over the shards of the sharded DTensors among ``param_objs``:
    one all-reduce of the stacked counts per (mesh, sharded mesh dims) class and sharded mesh dimension; no
    host-device copy."""
    classes: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(param_objs):
        if is_sharded(p):
            dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
            classes[(id(p.device_mesh), dims)].append(i)
    if not classes:
        return counts
    import torch.distributed as dist

    counts = list(counts)
    for (_, dims), idx in classes.items():
        mesh = param_objs[idx[0]].device_mesh
        part = torch.stack([counts[i] for i in idx])
        for d in dims:
            dist.all_reduce(part, group=mesh.get_group(d))
        for j, i in enumerate(idx):
            counts[i] = part[j]
    return counts


def mask_means(masks: Sequence[Tensor], param_objs: Sequence[Any] | None = None) -> list[Tensor]:
    """``mean(φ)`` of each tensor as 0-d float64 tensors (float32 on MPS): the exact count of ones over the whole
    tensor divided by its ``numel``; ``param_objs[i]`` (the parameter, possibly a ``DTensor``) gives the global
    count and ``numel``."""
    if not masks:
        return []
    counts = [m.sum(dtype=torch.int64) for m in masks]
    if param_objs is not None:
        counts = _reduce_counts(counts, param_objs)
        numels = [p.numel() for p in param_objs]
    else:
        numels = [m.numel() for m in masks]
    dtype = torch.float32 if masks[0].device.type == "mps" else torch.float64
    return [c.to(dtype) / max(n, 1) for c, n in zip(counts, numels)]


def cautious_(updates: list[Tensor], grads: Sequence[Tensor], param_objs: Sequence[Any] | None = None) -> list[Tensor]:
    """In place: ``u ← u ⊙ φ / max(mean(φ), 1e-3)`` for each of ``updates`` (temporaries of the caller, never
    optimizer state); ``grads`` aligned with them; ``param_objs`` the parameters (for DTensor shards: the
    global mean). Returns ``updates``."""
    if not updates:
        return updates
    masks = cautious_masks(updates, grads)
    means = mask_means(masks, param_objs)
    torch._foreach_mul_(updates, masks)
    dens = [m.clamp_min(CAUTIOUS_FLOOR).to(dtype=u.dtype if u.dtype == torch.float64 else torch.float32)
            for m, u in zip(means, updates)]
    torch._foreach_div_(updates, dens)
    return updates


def cautious(updates: Sequence[Tensor], grads: Sequence[Tensor],
             param_objs: Sequence[Any] | None = None) -> list[Tensor]:
    """As :func:`cautious_`, into new tensors (``updates`` is left as it is: use it on optimizer state, e.g.
    C-AdamW's ``m_t``)."""
    return cautious_([u.clone() for u in updates], grads, param_objs)


def cautious_tensor(u: Tensor, g: Tensor) -> Tensor:
    """The rule on one whole, non-empty tensor in plain torch ops (for the compiled kernels):
    ``u ⊙ φ / max(mean(φ), 1e-3)``, the mean taken in float32 (float64 for float64 ``u``)."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    phi = (u * g > 0).to(acc)
    return u * phi.to(u.dtype) / phi.mean().clamp_min(CAUTIOUS_FLOOR).to(u.dtype)

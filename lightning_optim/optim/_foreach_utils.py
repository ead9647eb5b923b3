"""Shared machinery of the elementwise optimizers: lazy state, grouping for ``torch._foreach_*`` ops, DTensor.

Every elementwise optimizer here is a subclass of :class:`ElementwiseOptimizer`. ``step()`` collects the
parameters of a group that have a gradient (a parameter without one is left untouched, its state too),
creates their state on first use, and hands *buckets* of plain local tensors to the subclass's ``_update``:
one bucket per (device, dtype, per-parameter step count), so one foreach call updates a whole bucket and
bias corrections are Python floats computed on the host from host-side counters — no ``.item()`` on a
device tensor, no per-parameter host sync.

FSDP2 parameters are ``DTensor`` shards; state tensors are created with ``zeros_like(p)`` so they are DTensors
with the same placement (``torch.distributed.checkpoint.state_dict`` saves them sharded), and the arithmetic
runs on the local shards (``to_local()``), which is exact for elementwise rules. Rules that need a global
reduction (Prodigy's sums, MARS's per-tensor norm) say so and reduce explicitly.

Compiled path (``compiled=True``, off by default): a subclass that defines ``kernel`` — its update rule on
*one* tensor, written with plain torch ops, mutating the parameter and its state in place — gets that rule
run through ``torch.compile(kernel, dynamic=True)``: one fused loop per tensor that reads and writes each
stream once, where the eager foreach chain makes one pass over memory per op. Contiguous tensors are passed
as 1-D views, so the kernel is compiled once per (dtype, device), not per shape or rank, and is shared by every instance (about 10 s on CPU the first
time, cached on disk by Inductor afterwards). Hyperparameters reach it as 0-d tensors, so a changing lr
does not recompile. Tensors below ``COMPILED_MIN_NUMEL`` elements (biases, norms) stay on the eager foreach
path, where one call covers them all; the call overhead of a compiled function (~0.1 ms) would cost more
than it saves. Both paths compute the same formula; they agree to rounding (the compiled one rounds
intermediates less).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover
    DTensor = None  # type: ignore[assignment]

__all__ = ["ElementwiseOptimizer", "Bucket", "local", "is_dtensor", "compiled_kernel", "COMPILED_MIN_NUMEL"]

COMPILED_MIN_NUMEL = 1 << 16
_COMPILED: dict[Callable, Callable] = {}


def compiled_kernel(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)``, built once per function and shared by every optimizer."""
    c = _COMPILED.get(fn)
    if c is None:
        c = _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return c


def plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor sharing its storage: torch.compile keeps the shapes of ``nn.Parameter`` inputs
    static (one recompile per shape), not those of plain tensors."""
    return t.detach() if isinstance(t, torch.nn.Parameter) else t


def flat_args(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's tensor arguments as 1-D views when all are contiguous (then one compiled kernel serves
    every shape and rank, with no recompiles for square matrices or size-1 dims), else as they are."""
    if all(t.is_contiguous() for t in tensors):
        return [_flat_alias(t) for t in tensors]
    return [plain(t) for t in tensors]


def _flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor on ``t``'s storage that is not a *view* of ``t``: Dynamo traces a view together with its
    base (guarding on the base's shape, which would bring the per-shape recompiles back)."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def scalar_tensors(values: Iterable[float | torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    """Hyperparameters as 0-d tensors on ``like``'s device (float64 for float64 tensors, float32 otherwise),
    so the compiled kernel sees data, not constants it would specialise (and recompile) on."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return [v.to(device=like.device, dtype=dtype) if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), dtype=dtype, device=like.device) for v in values]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing storage), the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


class Bucket:
    """Local tensors of the parameters of one group that share device, dtype and step count."""

    __slots__ = ("params", "grads", "state", "step", "param_objs")

    def __init__(self, step: int) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.state: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.step = step  # the count *before* this step (0 on a parameter's first step)
        self.param_objs: list[torch.Tensor] = []  # the (possibly DTensor) parameters themselves

    def subset(self, idx: list[int]) -> "Bucket":
        """The bucket restricted to the entries ``idx`` (same step)."""
        b = Bucket(self.step)
        b.params = [self.params[i] for i in idx]
        b.grads = [self.grads[i] for i in idx]
        b.param_objs = [self.param_objs[i] for i in idx]
        for name, ts in self.state.items():
            b.state[name] = [ts[i] for i in idx]
        return b


class ElementwiseOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set ``state_names`` and implement ``_init_state`` and ``_update``.

    ``counts_steps=True`` keeps ``state["step"]`` per parameter (a CPU float32 tensor, as torch.optim does,
    so checkpoints look familiar) and splits buckets by it; the subclass increments nothing itself.
    """

    state_names: tuple[str, ...] = ()
    counts_steps: bool = True
    #: the update of one tensor for the compiled path: ``kernel(p, g, *state (state_names order), *scalars)``
    kernel: Callable[..., None] | None = None

    def __init__(self, params: Any, defaults: dict[str, Any], compiled: bool = False) -> None:
        if not isinstance(compiled, bool):
            raise ValueError(f"compiled must be True or False, got {compiled!r}")
        super().__init__(params, defaults)
        self.compiled = compiled

    def _kernel_scalars(self, group: dict[str, Any], bucket: Bucket) -> tuple | None:
        """The kernel's scalar arguments for this bucket; ``None``: take the eager path for it."""
        return None

    # -- to implement --------------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in self.state_names}

    def _update(self, group: dict[str, Any], bucket: Bucket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- machinery -----------------------------------------------------------------------------------------

    def _run_kernel(self, bucket: Bucket, kernel: Callable[..., None] | None, scalars: tuple | None,
                    state_names: tuple[str, ...] | None = None, results: list | None = None) -> Bucket:
        """Update the large tensors of ``bucket`` with the compiled ``kernel``; return the rest (to be updated
        eagerly). Without ``compiled=True``, a kernel or scalars, the whole bucket is returned. A kernel that
        returns something (Prodigy's sums) has its return values appended to ``results``."""
        if not (self.compiled and kernel is not None and scalars is not None):
            return bucket
        big = [i for i, p in enumerate(bucket.params) if p.numel() >= COMPILED_MIN_NUMEL]
        if not big:
            return bucket
        fn = compiled_kernel(kernel)
        names = self.state_names if state_names is None else state_names
        sc = scalar_tensors(scalars, bucket.params[big[0]])
        for i in big:
            out = fn(*flat_args(bucket.params[i], bucket.grads[i], *[bucket.state[n][i] for n in names]), *sc)
            if results is not None:
                results.append(out)
        taken = set(big)
        return bucket.subset([i for i in range(len(bucket.params)) if i not in taken])

    def _step_bucket(self, group: dict[str, Any], bucket: Bucket) -> None:
        rest = self._run_kernel(bucket, type(self).kernel, self._kernel_scalars(group, bucket) if self.compiled else None)
        if rest.params:
            self._update(group, rest)

    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        buckets: dict[tuple, Bucket] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                if self.counts_steps:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state.update(self._init_state(p, group))
            step = int(state["step"].item()) if self.counts_steps else 0  # CPU tensor: no device sync
            lp = local(p)
            key = (lp.device, lp.dtype, step)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(step)
            b.params.append(lp)
            b.grads.append(local(p.grad))
            b.param_objs.append(p)
            for name in self.state_names:
                b.state[name].append(local(state[name]))
        return list(buckets.values())

    def _advance_steps(self, bucket: Bucket) -> None:
        if self.counts_steps:
            for p in bucket.param_objs:
                self.state[p]["step"] += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for bucket in self._buckets(group):
                self._step_bucket(group, bucket)
                self._advance_steps(bucket)
        return loss


def check_betas(betas: Iterable[float], n: int, name: str = "betas") -> tuple[float, ...]:
    betas = tuple(float(b) for b in betas)
    if len(betas) != n:
        raise ValueError(f"{name} must have {n} entries, got {betas}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {b}")
    return betas


def check_nonneg(**values: float | None) -> None:
    for k, v in values.items():
        if v is not None and (not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"{k} must be a number >= 0, got {v!r}")

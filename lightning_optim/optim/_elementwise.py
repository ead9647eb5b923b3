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

Compiled path (``compiled="auto"``, the default): a subclass that defines ``kernel`` — its update rule on
*one* tensor, written with plain torch ops, mutating the parameter and its state in place — gets that rule
run through ``torch.compile(kernel, dynamic=True)``: one fused loop per tensor that reads and writes each
stream once, where the eager foreach chain makes one pass over memory per op. Contiguous tensors are passed
as 1-D views, so the kernel is compiled once per (dtype, device), not per shape or rank, and is shared by every
instance (about 10 s on CPU the first time, cached on disk by Inductor afterwards; announced once per process
by a log line). Hyperparameters reach it as 0-d tensors, so a changing lr does not recompile. Tensors below
``COMPILED_MIN_NUMEL`` elements (biases, norms) stay on the eager foreach path, where one call covers them all;
the call overhead of a compiled function (~0.1 ms) would cost more than it saves. Both paths compute the same
formula; they agree to rounding (the compiled one rounds intermediates less).

``compiled`` is ``"auto"`` (compile where a working compiler is present: a C++ compiler for CPU Inductor,
Triton for CUDA; checked once per process, and a compile that fails at run time falls back to the same
formula uncompiled, with one warning for the process), ``True`` (compile, errors propagate) or ``False``
(the eager foreach path). The environment variable ``LIGHTNING_OPTIM_COMPILE=0`` makes ``"auto"`` eager
without a warning (the test suite sets it for speed); ``=1`` leaves it as ``"auto"``.

Cautious updates (``cautious=True`` on a subclass that offers it; Liang et al. 2024, the rule and its sources in
:mod:`lightning_optim.optim._cautious`): the eager ``_update`` masks its update with ``cautious_``/``cautious``
(``param_objs`` give FSDP2 shards the global mask mean); the compiled path runs the subclass's ``cautious_kernel``
(the same rule on one whole tensor). A bucket holding a sharded DTensor takes the eager path when cautious, as its
mask mean needs an all-reduce. ``cautious=False`` (the default) runs exactly the code it ran before.

Low-precision state (``state_dtype="bfloat16"``): the tensors named in ``lowp_names`` (default: all) are allocated in
bfloat16; every update reads them as float32 and writes them back with stochastic rounding
(:mod:`lightning_optim.optim._low_precision`), on both paths. The eager path does so in chunks of tensors
(fp32 copies of at most ``LOWP_CHUNK_NUMEL`` elements per state at a time).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from lightning_optim.optim._cautious import check_cautious, needs_global_count
from lightning_optim.optim._closure import evaluate_closure
from lightning_optim._dtensor import is_dtensor, local
from lightning_optim.optim._low_precision import (SR_SLOT_STRIDE, check_state_dtype, mix_seed, seed_tensor, sr_copy_,
                                                  state_torch_dtype)

__all__ = ["ElementwiseOptimizer", "Bucket", "local", "is_dtensor", "compiled_kernel", "COMPILED_MIN_NUMEL",
           "check_compiled", "compile_available", "COMPILE_ENV"]

COMPILED_MIN_NUMEL = 1 << 16
#: the eager low-precision path upcasts at most this many elements of one state at a time
LOWP_CHUNK_NUMEL = 1 << 24
COMPILE_ENV = "LIGHTNING_OPTIM_COMPILE"
_COMPILED: dict[Callable, Callable] = {}
_log = logging.getLogger("lightning_optim")
#: device type -> (compiler usable, reason when not); filled once per process
_COMPILE_OK: dict[str, tuple[bool, str]] = {}
_announced = False


def check_compiled(value: Any) -> bool | str:
    """``True``, ``False`` or ``"auto"``; anything else raises ``ValueError`` naming ``compiled``."""
    if value is True or value is False:
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    raise ValueError(f"compiled must be True, False or 'auto', got {value!r}")


def _env_disables_compile() -> bool:
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("0", "false", "no", "off")


def _probe(device_type: str) -> tuple[bool, str]:
    """Is there a compiler Inductor can use for ``device_type``? (No compile is run: a failure at the first
    real compile is caught by the caller.)"""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python/platform"
    except Exception as err:  # pragma: no cover - a broken torch install
        return False, f"torch._dynamo failed to import ({err})"
    if device_type == "cpu":
        cxx = os.environ.get("CXX")
        if (cxx and shutil.which(cxx)) or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return True, ""
        return False, "no C++ compiler (g++, c++ or clang++) for CPU Inductor"
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton

            return (True, "") if has_triton() else (False, "Triton is not installed or does not support this GPU")
        except Exception as err:  # pragma: no cover
            return False, f"Triton check failed ({err})"
    return False, f"no compiled path for device type {device_type!r}"


def compile_available(device_type: str) -> tuple[bool, str]:
    """(usable, reason) for ``compiled="auto"`` on ``device_type``; checked once per process and device type.
    The first time it says no, one warning names the reason (not for ``LIGHTNING_OPTIM_COMPILE=0``)."""
    if _env_disables_compile():
        return False, f"{COMPILE_ENV}=0"
    got = _COMPILE_OK.get(device_type)
    if got is None:
        got = _COMPILE_OK[device_type] = _probe(device_type)
        if not got[0]:
            _warn_eager(got[1])
    return got


def _warn_eager(reason: str) -> None:
    warnings.warn(f"lightning-optim: compiled='auto' runs the eager optimizer path: {reason}. Pass compiled=False "
                  "to choose it explicitly.", RuntimeWarning, stacklevel=4)


def _disable_after_failure(device_type: str, err: BaseException) -> None:
    if _COMPILE_OK.get(device_type, (True, ""))[0]:
        _COMPILE_OK[device_type] = (False, f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        _warn_eager(_COMPILE_OK[device_type][1])


def _announce(fn: Callable) -> None:
    global _announced
    if _announced or os.environ.get("RANK", "0") != "0":
        return
    _announced = True
    _log.warning("lightning-optim: compiling the optimizer update kernels with torch.compile (one-time per "
                 "process and kernel, ~10 s each on CPU, cached on disk by Inductor; first: %s). Pass "
                 "compiled=False or set %s=0 for the eager path.", getattr(fn, "__name__", fn), COMPILE_ENV)


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


class Bucket:
    """Local tensors of the parameters of one group that share device, dtype and step count."""

    __slots__ = ("params", "grads", "state", "step", "param_objs", "origin")

    def __init__(self, step: int) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.state: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.step = step  # the count *before* this step (0 on a parameter's first step)
        self.param_objs: list[torch.Tensor] = []  # the (possibly DTensor) parameters themselves
        self.origin: list[int] | None = None  # positions in the bucket this one was cut from (None: itself)

    def positions(self) -> list[int]:
        """Each entry's position in the original bucket (rounding seeds follow it, whatever the path)."""
        return list(range(len(self.params))) if self.origin is None else self.origin

    def subset(self, idx: list[int]) -> "Bucket":
        """The bucket restricted to the entries ``idx`` (same step)."""
        b = Bucket(self.step)
        pos = self.positions()
        b.origin = [pos[i] for i in idx]
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
    #: the update of one tensor for the compiled path: ``kernel(p, g, *state (state_names order), *scalars[,
    #: seed])``; ``seed`` (a 0-d int64 tensor) is passed only when the group keeps bf16 state: stochastic rounding,
    #: the state at index k of ``state_names + extra_state_names`` stored with ``store(..., seed, k)``
    kernel: Callable[..., None] | None = None
    #: state tensors that ``state_dtype="bfloat16"`` stores in bfloat16 (``None``: every one)
    lowp_names: tuple[str, ...] | None = None
    #: state created outside ``state_names`` (MARS's ``last_grad``); with them, the rounding slot order
    extra_state_names: tuple[str, ...] = ()
    #: ``kernel`` with the cautious mask (:mod:`lightning_optim.optim._cautious`) on its update, same arguments;
    #: used for groups with ``cautious=True`` (``None``: such groups take the eager path)
    cautious_kernel: Callable[..., None] | None = None

    def __init__(self, params: Any, defaults: dict[str, Any], compiled: bool | str = "auto",
                 state_dtype: str | None = None) -> None:
        compiled = check_compiled(compiled)
        defaults = {**defaults, "state_dtype": check_state_dtype(state_dtype)}
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            group["state_dtype"] = check_state_dtype(group["state_dtype"], f"param_groups[{i}].state_dtype")
            if "cautious" in group:
                group["cautious"] = check_cautious(group["cautious"], f"{type(self).__name__} param_groups[{i}]")
        self.compiled = compiled

    def use_compiled(self, device: torch.device) -> bool:
        """Whether updates of tensors on ``device`` take the compiled path (``compiled`` resolved)."""
        if self.compiled == "auto":
            return compile_available(device.type)[0]
        return bool(self.compiled)

    def is_lowp(self, name: str) -> bool:
        return self.lowp_names is None or name in self.lowp_names

    def _state_zeros(self, p: torch.Tensor, group: dict[str, Any], name: str) -> torch.Tensor:
        """A zero state tensor for ``p``: bfloat16 for low-precision names when the group asks for it."""
        dt = state_torch_dtype(group.get("state_dtype"))
        if dt is not None and self.is_lowp(name):
            return torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def _sr_seeds(self, group: dict[str, Any], bucket: "Bucket") -> list[int] | None:
        """One seed per tensor of ``bucket`` for stochastic rounding this step, or ``None`` (no bf16 state)."""
        if group.get("state_dtype") is None:
            return None
        gi = next((i for i, g in enumerate(self.param_groups) if g is group), 0)
        step = int(group.get("sr_step", 0))
        return [mix_seed(step, gi, bucket.step, i) for i in bucket.positions()]

    def _advance_sr(self, group: dict[str, Any]) -> None:
        if group.get("state_dtype") is not None:
            group["sr_step"] = int(group.get("sr_step", 0)) + 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to the parameter's dtype; bf16 state is put back in bf16 (exactly)."""
        super().load_state_dict(state_dict)
        for i, group in enumerate(self.param_groups):
            group["state_dtype"] = check_state_dtype(group.get("state_dtype"), f"param_groups[{i}].state_dtype")
            dt = state_torch_dtype(group["state_dtype"])
            if dt is None:
                continue
            for p in group["params"]:
                st = self.state.get(p, {})
                for name, value in list(st.items()):
                    if (name != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()
                            and self.is_lowp(name) and value.dtype != dt):
                        st[name] = value.to(dt)

    def _kernel_scalars(self, group: dict[str, Any], bucket: Bucket) -> tuple | None:
        """The kernel's scalar arguments for this bucket; ``None``: take the eager path for it."""
        return None

    # -- to implement --------------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {name: self._state_zeros(p, group, name) for name in self.state_names}

    def _update(self, group: dict[str, Any], bucket: Bucket) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- machinery -----------------------------------------------------------------------------------------

    def _run_kernel(self, bucket: Bucket, kernel: Callable[..., None] | None, scalars: tuple | None,
                    state_names: tuple[str, ...] | None = None, results: list | None = None,
                    seeds: list[int] | None = None) -> Bucket:
        """Update the large tensors of ``bucket`` with the compiled ``kernel``; return the rest (to be updated
        eagerly). Without the compiled path (see :meth:`use_compiled`), a kernel or scalars, the whole bucket is
        returned. A kernel that returns something (Prodigy's sums) has its return values appended to
        ``results``. ``seeds`` (one per tensor) turn on stochastic rounding of bf16 state writes.

        Under ``compiled="auto"`` a compile that fails runs this tensor through the same kernel uncompiled,
        warns once, and sends the rest of the bucket (and later steps) to the eager path."""
        if not (kernel is not None and scalars is not None and bucket.params
                and self.use_compiled(bucket.params[0].device)):
            return bucket
        big = [i for i, p in enumerate(bucket.params) if p.numel() >= COMPILED_MIN_NUMEL]
        if not big:
            return bucket
        fn = compiled_kernel(kernel)
        names = self.state_names if state_names is None else state_names
        sc = scalar_tensors(scalars, bucket.params[big[0]])
        sd = seed_tensor([seeds[i] for i in big], bucket.params[big[0]].device) if seeds is not None else None
        taken: set[int] = set()
        for j, i in enumerate(big):
            args = flat_args(bucket.params[i], bucket.grads[i], *[bucket.state[n][i] for n in names])
            seed = (sd[j],) if sd is not None else ()  # kernels without low-precision support take no seed
            if kernel not in _CALLED:
                _announce(kernel)
            try:
                out = fn(*args, *sc, *seed)
            except Exception as err:
                if self.compiled != "auto":
                    raise
                _disable_after_failure(args[0].device.type, err)
                out = kernel(*args, *sc, *seed)  # the same formula, uncompiled; nothing was written by the failure
                taken.add(i)
                if results is not None:
                    results.append(out)
                break
            _CALLED.add(kernel)
            taken.add(i)
            if results is not None:
                results.append(out)
        return bucket.subset([i for i in range(len(bucket.params)) if i not in taken])

    def _kernel_for(self, group: dict[str, Any], bucket: Bucket, kernel: Callable[..., Any] | None,
                    cautious_kernel: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """The compiled kernel for ``bucket``: ``kernel``, or ``cautious_kernel`` for a group with
        ``cautious=True`` — ``None`` (the eager path) when a tensor is a sharded DTensor, whose mask mean needs
        the all-reduce that only the eager path does (every rank then takes the same path, so collectives match)."""
        if not group.get("cautious"):
            return kernel
        return None if needs_global_count(bucket.param_objs) else cautious_kernel

    def _step_bucket(self, group: dict[str, Any], bucket: Bucket) -> None:
        compiled = bucket.params and self.use_compiled(bucket.params[0].device)
        seeds = self._sr_seeds(group, bucket)
        kernel = self._kernel_for(group, bucket, type(self).kernel, type(self).cautious_kernel)
        rest = self._run_kernel(bucket, kernel, self._kernel_scalars(group, bucket) if compiled else None,
                                seeds=seeds)
        if rest.params:
            self._update_eager(group, rest, self._update)

    def _update_eager(self, group: dict[str, Any], bucket: Bucket, update: Callable[[dict[str, Any], Bucket], Any],
                      names: Iterable[str] | None = None) -> list:
        """``update(group, bucket)`` on the eager path. Low-precision state (and bf16/fp16 parameters of a group
        with ``state_dtype`` set) is given to ``update`` as float32 copies, a chunk of tensors at a time, and
        written back afterwards (state with stochastic rounding); returns ``update``'s results per chunk."""
        if group.get("state_dtype") is None:
            return [update(group, bucket)]
        seeds = self._sr_seeds(group, bucket) or []
        names = list(bucket.state if names is None else names)
        out = []
        for chunk in _chunks(bucket, LOWP_CHUNK_NUMEL):
            sub = bucket.subset(chunk)
            lowp = {n: sub.state[n] for n in names
                    if sub.state[n] and sub.state[n][0].dtype in (torch.bfloat16, torch.float16)}
            for n, ts in lowp.items():
                sub.state[n] = [t.float() for t in ts]
            params = sub.params
            if params[0].dtype in (torch.bfloat16, torch.float16):
                sub.params = [t.float() for t in params]
                sub.grads = [t.float() for t in sub.grads]
            out.append(update(group, sub))
            for n, ts in lowp.items():
                if not self.is_lowp(n):  # a state kept like a bf16 parameter (Prodigy's p0): round to nearest
                    torch._foreach_copy_(ts, sub.state[n])
                    continue
                slot = (self.state_names + self.extra_state_names).index(n)
                for k, (dst, src) in enumerate(zip(ts, sub.state[n])):  # the kernels' seeds: same rounding
                    sr_copy_(dst, src, seeds[chunk[k]] + slot * SR_SLOT_STRIDE)
            if sub.params is not params:
                torch._foreach_copy_(params, sub.params)
        return out

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
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            buckets = self._buckets(group)
            for bucket in buckets:
                self._step_bucket(group, bucket)
                self._advance_steps(bucket)
            if buckets:
                self._advance_sr(group)
        return loss


_CALLED: set[Callable] = set()


def _chunks(bucket: Bucket, max_numel: int) -> list[list[int]]:
    """Index lists covering ``bucket`` in order, each of at most ``max_numel`` elements (or one tensor)."""
    chunks: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(bucket.params):
        if chunks[-1] and size + p.numel() > max_numel:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += p.numel()
    return chunks


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

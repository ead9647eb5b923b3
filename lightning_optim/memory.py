"""Memory estimator: bytes for parameters, gradients and each optimizer state tensor, from the registry specs.

For ``P`` parameters with weights in dtype ``w``, gradients in ``g`` and optimizer state in ``s``::

    parameters = P·|w|      gradients = P·|g|      master weights = P·|m| (only when asked for)
    state      = Σ_parameters Σ_state-tensors numel·|s|      (|s| overridden by quantised layouts)

each divided by the sharding factor for the pieces the chosen sharding splits (``full`` = FSDP / ZeRO-3:
everything; ``grad_op`` = ZeRO-2: gradients and state; ``optimizer`` = ZeRO-1: state only). Under ``full``
(FSDP2 ``fully_shard``: the optimizer sees DTensor shards) the state an optimizer keeps whole on every rank
(:attr:`~lightning_optim.specs.StateLayout.replicated`: SOAP's and Shampoo's full state, Dion's ``Q``) is not
divided.

The state per parameter comes from the optimizer's :class:`~lightning_optim.registry.StateLayout`:
``tensors`` parameter-sized tensors, plus ``extra(shape)`` shape-dependent elements (Adafactor's row and
column factors, SOAP's preconditioners, NorMuon's per-row second moment). Hybrids (Muon, D-Muon, MARS, ...)
send matrices to the main rule and everything else to their internal AdamW (``other_state``); which
parameters are matrices needs the model, so pass ``module=`` or ``preset=`` for the exact figure. With only
``n_params`` every parameter is treated as a matrix of unknown shape and shape-dependent state is left out
(the estimate says so: ``exact=False``).

Quantised layouts (``bytes_per_element`` set) whose spec has a ``min_8bit_size`` default (bitsandbytes) keep
float32 state for parameters with fewer elements than that, as bitsandbytes does; torchao's low-bit AdamW
(``OptimizerSpec.quantized_if``) keeps state like the parameter for tensors under 4096 elements or not a
multiple of the block size; with only ``n_params`` every parameter is assumed large enough.

``state_dtype`` for an optimizer of this package that has a ``state_dtype`` option (Lion, Signum, ADOPT,
AdEMAMix, MARS, Prodigy, the Muon family) applies to the state tensors that option stores in low precision —
the ones its spec lists in ``low_precision_state`` — and the others keep the weight dtype, as the optimizer does:
``prodigy`` with ``--state-dtype bf16`` is ``s``, ``exp_avg``, ``exp_avg_sq`` in bf16 and ``p0`` in the weight
dtype (10 B/parameter with fp32 weights instead of 16); ``muon`` stores only the matrices' momentum in bf16.
For other optimizers ``state_dtype`` is the dtype of all their state (torch's follow the parameter).

What it counts is what an optimizer allocates per parameter: scalar step counters (0-dim tensors or Python
numbers) are left out, and so are activations, temporary buffers of the step and allocator overhead.

Units are decimal (1 GB = 10⁹ B). 7e9 parameters with AdamW in float32 → 28 GB each for weights,
gradients, m and v, 112 GB in all::

    >>> estimate_memory("adamw", 7e9).total / 1e9
    112.0
    $ lightning-optim memory --params 7e9 --optimizer adamw
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from lightning_optim.registry import OptimizerSpec, get_optimizer_spec

__all__ = [
    "MemoryEstimate",
    "estimate_memory",
    "dtype_bytes",
    "format_bytes",
    "shapes_of",
    "transformer_shapes",
    "preset_shapes",
    "measure_state_bytes",
    "KNOWN_SHAPES",
    "DEFAULT_VOCAB",
    "SHARDING",
]

_DTYPES = {
    "float32": 4, "fp32": 4, "float": 4, "tf32": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float64": 8, "fp64": 8, "double": 8,
    "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
}

#: sharding strategy → which pieces are divided by the sharding factor
SHARDING = {
    "full": ("parameters", "gradients", "master", "state"),  # FSDP FULL_SHARD / FSDP2 fully_shard / ZeRO-3
    "grad_op": ("gradients", "master", "state"),  # FSDP SHARD_GRAD_OP / ZeRO-2
    "optimizer": ("master", "state"),  # ZeRO-1: only the optimizer's own memory
}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given as a torch dtype or a name (``fp32``, ``bf16``, ``float8`` ...)."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


@dataclass
class MemoryEstimate:
    """Bytes per rank. ``state`` maps each optimizer state tensor's name to its bytes."""

    optimizer: str
    n_params: int
    parameters: float
    gradients: float
    state: dict[str, float] = field(default_factory=dict)
    shard: int = 1
    exact: bool = True
    master: float = 0.0
    sharding: str = "full"
    dtypes: dict[str, str] = field(default_factory=dict)
    unsharded_total: float | None = None
    #: the dtype of each state row where they differ (``state_dtype`` applied to some state tensors only)
    state_dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def state_total(self) -> float:
        return sum(self.state.values())

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.master + self.state_total

    def bytes_per_param(self) -> float:
        """Total bytes per parameter over all ranks (16 for AdamW in float32)."""
        world = self.unsharded_total if self.unsharded_total is not None else self.total * self.shard
        return world / max(self.n_params, 1)

    def state_bytes_per_param(self) -> float:
        """Optimizer-state bytes per parameter over all ranks (8 for AdamW in float32)."""
        return self.state_total * self.shard / max(self.n_params, 1)

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return {
            "optimizer": self.optimizer, "n_params": self.n_params, "parameters": self.parameters,
            "gradients": self.gradients, "master": self.master, "state": self.state_total, "total": self.total,
            "shard": self.shard, "sharding": self.sharding, "exact": self.exact,
            "state_bytes_per_param": self.state_bytes_per_param(),
        }

    def table(self) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients)]
        if self.master:
            rows.append(("master weights", self.master))
        rows += [(f"state: {k}" + (f" [{self.state_dtypes[k]}]" if k in self.state_dtypes else ""), v)
                 for k, v in self.state.items()]
        rows.append(("total", self.total))
        width = max(len(r[0]) for r in rows)
        head = f"{self.optimizer}: {self.n_params:,} parameters"
        if self.dtypes:
            head += " (" + ", ".join(f"{k} {v}" for k, v in self.dtypes.items()) + ")"
        if self.shard > 1:
            head += f", {self.sharding}-sharded {self.shard}-way (per rank)"
        lines = [head] + [f"  {name:<{width}}  {format_bytes(v):>12}" for name, v in rows]
        lines.append(
            f"  {'per parameter':<{width}}  {self.bytes_per_param():>9.2f} B  "
            f"(optimizer state {self.state_bytes_per_param():.2f} B)"
        )
        if not self.exact:
            lines.append(
                "  (shape-dependent state left out or hybrid split assumed: pass a module or --preset for the "
                "exact figure)"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Shapes


def shapes_of(module: nn.Module, split_matrices: bool = True) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, routed-as-matrix) for every trainable parameter of ``module`` under the default rules."""
    from lightning_optim.param_groups import classify_parameters

    return [(role.shape, role.matrix if split_matrices else True) for _, role in classify_parameters(module)]


def transformer_shapes(
    d_model: int,
    n_layers: int,
    vocab_size: int,
    d_ff: int | None = None,
    *,
    arch: str = "llama",
    n_kv_heads: int | None = None,
    n_heads: int | None = None,
    tied: bool = False,
    max_seq_len: int = 1024,
) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, is_matrix) of the package's decoder-only :class:`~lightning_optim.models.gpt.Transformer` with
    these dimensions, read from the model itself built on the meta device (nothing is allocated, so 70B
    works), routed by the default grouping rules.

    One source of truth: the layers are those of :mod:`lightning_optim.models.gpt` (a fused ``qkv``
    projection, grouped k/v with ``n_kv_heads``; ``d_ff=None`` is the model's own MLP width, 4d for gpt2 and
    ``256·ceil(8d/3/256)`` for llama). ``llama`` keeps an untied head unless ``tied``; ``gpt2`` is always
    tied, with ``max_seq_len`` learned positions. ``n_heads`` matters only with ``n_kv_heads`` (it sets the
    head width); without it one head of width ``d_model`` is assumed, which gives the same shapes.
    """
    from lightning_optim.models.gpt import ModelConfig, Transformer

    if n_kv_heads is not None and n_heads is None:
        raise ValueError("transformer_shapes: n_kv_heads needs n_heads (the head width is d_model / n_heads)")
    config = ModelConfig(
        n_layer=n_layers, n_embd=d_model, n_head=n_heads or 1, vocab_size=vocab_size, block_size=max_seq_len,
        arch=arch, mlp_hidden=d_ff, n_kv_head=n_kv_heads, tie_embeddings=tied or arch == "gpt2",
    )
    with torch.device("meta"):
        return shapes_of(Transformer(config))


#: Published shapes of well-known models, for estimates without building them (``preset="llama2-7b"``).
KNOWN_SHAPES = {
    "llama2-7b": dict(d_model=4096, n_layers=32, vocab_size=32000, d_ff=11008, arch="llama"),
    "llama2-13b": dict(d_model=5120, n_layers=40, vocab_size=32000, d_ff=13824, arch="llama"),
    "llama3-8b": dict(d_model=4096, n_layers=32, vocab_size=128256, d_ff=14336, n_heads=32, n_kv_heads=8,
                      arch="llama"),
    "llama2-70b": dict(d_model=8192, n_layers=80, vocab_size=32000, d_ff=28672, n_heads=64, n_kv_heads=8,
                       arch="llama"),
}
KNOWN_SHAPES["7b"] = KNOWN_SHAPES["llama2-7b"]


#: vocabulary of the default tokenizer (a 4096-token byte-level BPE), for presets that take the tokenizer's
DEFAULT_VOCAB = 4096


def preset_shapes(preset: str, arch: str = "llama", vocab_size: int | None = None) -> list[tuple[tuple[int, ...], bool]]:
    """Shapes of a model preset: :func:`lightning_optim.models.build_model` on the meta device (nothing is
    allocated), or one of :data:`KNOWN_SHAPES` (``llama2-7b``, ``llama3-8b``, ...). Presets whose vocabulary
    is the tokenizer's (``tiny``) take ``vocab_size``, default :data:`DEFAULT_VOCAB`."""
    from lightning_optim.models.gpt import PRESETS, build_model

    key = preset.strip().lower()
    if key in PRESETS:
        if vocab_size is None and PRESETS[key].get("vocab_size", 0) is None:
            vocab_size = DEFAULT_VOCAB
        with torch.device("meta"):
            module = build_model(key, arch=arch, vocab_size=vocab_size)
        return shapes_of(module)
    if key in KNOWN_SHAPES:
        known = dict(KNOWN_SHAPES[key])
        if vocab_size is not None:
            known["vocab_size"] = vocab_size
        return transformer_shapes(**known)
    raise ValueError(
        f"unknown preset {preset!r}; presets: {', '.join([*PRESETS, *KNOWN_SHAPES])}"
    )


# ----------------------------------------------------------------------------------------------------------
# Estimate


def _state_names(spec: OptimizerSpec, is_matrix: bool) -> list[tuple[str, float]]:
    """(label, parameter-sized tensors) pairs: one row per named state tensor."""
    layout = spec.state if (is_matrix or spec.other_state is None) else spec.other_state
    names = list(getattr(layout, "names", ()) or ())
    n = layout.tensors
    if n != n:  # NaN: an external class whose state is unknown
        return []
    whole = int(n)
    if names and len(names) == whole:
        rows = [(name, 1.0) for name in names]
    else:
        rows = [(f"state[{i}]", 1.0) for i in range(whole)]
    if n - whole:
        rows.append(("state (fractional)", n - whole))
    return rows


def estimate_memory(
    optimizer: str,
    n_params: int | float | None = None,
    *,
    module: nn.Module | None = None,
    shapes: Iterable[tuple[tuple[int, ...], bool]] | None = None,
    preset: str | None = None,
    arch: str = "llama",
    vocab_size: int | None = None,
    weight_dtype: str | torch.dtype = "float32",
    grad_dtype: str | torch.dtype | None = None,
    state_dtype: str | torch.dtype | None = None,
    master_dtype: str | torch.dtype | None = None,
    shard: int = 1,
    sharding: str = "full",
) -> MemoryEstimate:
    """Estimate memory per rank for training with ``optimizer``.

    Give exactly one of ``n_params`` (all parameters treated as matrices of unknown shape), ``module``,
    ``shapes`` (``(shape, is_matrix)`` pairs) or ``preset`` (a :mod:`lightning_optim.models` preset with
    ``arch`` and optionally ``vocab_size``, or a name in :data:`KNOWN_SHAPES`). Gradients and state default to the weight dtype (what
    torch's optimizers allocate: state like the parameter); ``master_dtype`` adds a master copy of the
    weights (bf16 weights with fp32 master weights). ``shard`` is the number of ranks and ``sharding`` which
    pieces they split (see :data:`SHARDING`).
    """
    spec = get_optimizer_spec(optimizer)
    given = sum(x is not None for x in (n_params, module, shapes, preset))
    if given != 1:
        raise ValueError("give exactly one of n_params, module, shapes or preset")
    if isinstance(shard, bool) or shard < 1 or int(shard) != shard:
        raise ValueError(f"shard must be a positive integer, got {shard}")
    if sharding not in SHARDING:
        raise ValueError(f"sharding must be one of {', '.join(SHARDING)}, got {sharding!r}")
    wb = dtype_bytes(weight_dtype)
    gb = dtype_bytes(grad_dtype) if grad_dtype is not None else wb
    sb = dtype_bytes(state_dtype) if state_dtype is not None else wb
    mb = dtype_bytes(master_dtype) if master_dtype is not None else 0
    exact = spec.state.tensors == spec.state.tensors  # NaN: unknown external class
    if module is not None:
        shapes = shapes_of(module, split_matrices=spec.hybrid)
    elif preset is not None:
        shapes = preset_shapes(preset, arch, vocab_size)
    if shapes is None:
        if n_params is None or n_params <= 0:
            raise ValueError(f"n_params must be positive, got {n_params}")
        total = int(n_params)
        has_extra = spec.state.extra is not None or (spec.other_state is not None and spec.other_state.extra is not None)
        exact = exact and not has_extra and not spec.hybrid
        per_shape = [((total,), True, False)]
        use_shapes = False
    else:
        use_shapes = True
        shapes = [(tuple(int(d) for d in s), bool(m)) for s, m in shapes]
        if not spec.hybrid:
            shapes = [(s, True) for s, _ in shapes]
        per_shape = [(s, m, True) for s, m in shapes]
        total = sum(math.prod(s) for s, _ in shapes)

    # quantised state (bitsandbytes) applies only from ``min_8bit_size`` elements up; smaller tensors keep fp32
    min_quantized = int(spec.defaults.get("min_8bit_size", 0) or 0) if use_shapes else 0
    quantized_if = spec.quantized_if  # torchao: numel >= 4096 and block-aligned
    # which state tensors the optimizer's own ``state_dtype`` option lowers (the rest keep the weight dtype)
    lowp = spec.low_precision_state if state_dtype is not None and "state_dtype" in spec.defaults else None
    state_dtypes: dict[str, str] = {}
    state: dict[str, float] = {}
    whole: set[str] = set()  # state kept whole on every rank under FSDP2 (StateLayout.replicated)
    for shape, is_matrix, use_extra in per_shape:
        numel = math.prod(shape)
        layout = spec.state if (is_matrix or spec.other_state is None) else spec.other_state
        elem = layout.bytes_per_element if layout.bytes_per_element is not None else sb
        if layout.bytes_per_element is not None and numel < min_quantized:
            elem = 4  # bitsandbytes keeps float32 state for tensors smaller than min_8bit_size
        if layout.bytes_per_element is not None and use_shapes and quantized_if is not None and not quantized_if(shape):
            elem = wb  # torchao keeps state like the parameter for small or block-misaligned tensors
        prefix = "" if spec.other_state is None else ("matrix " if is_matrix else "adamw ")
        for label, count in _state_names(spec, is_matrix):
            e = elem
            if lowp is not None and layout.bytes_per_element is None:
                low = label in lowp.get(is_matrix, ())
                e = sb if low else wb
                state_dtypes[prefix + label] = _dtype_name(state_dtype if low else weight_dtype)
            state[prefix + label] = state.get(prefix + label, 0.0) + count * numel * e
            if sharding == "full" and layout.replicated == "all":
                whole.add(prefix + label)
        if use_extra and layout.extra is not None:
            key = prefix + "shape-dependent"
            e = wb if lowp is not None else elem  # NorMuon's row moment, SOAP's factors: not lowered
            state[key] = state.get(key, 0.0) + layout.extra(shape) * e
            if sharding == "full" and layout.replicated in ("extra", "all"):
                whole.add(key)
    split = SHARDING[sharding]
    div = {k: (shard if k in split else 1) for k in ("parameters", "gradients", "master", "state")}
    state = {k: v if k in whole else v / div["state"] for k, v in state.items()}
    dtypes = {"weights": _dtype_name(weight_dtype)}
    if gb != wb:
        dtypes["grads"] = _dtype_name(grad_dtype)
    if sb != wb:
        dtypes["state"] = _dtype_name(state_dtype)
    if master_dtype is not None:
        dtypes["master"] = _dtype_name(master_dtype)
    return MemoryEstimate(
        optimizer=spec.name, n_params=total, parameters=total * wb / div["parameters"],
        gradients=total * gb / div["gradients"], master=total * mb / div["master"],
        state=state, shard=int(shard), exact=exact, sharding=sharding, dtypes=dtypes,
        unsharded_total=total * (wb + gb + mb) + sum(v if k in whole else v * div["state"] for k, v in state.items()),
        state_dtypes=state_dtypes if len(set(state_dtypes.values())) > 1 else {},
    )


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# Measurement


def _tensors_in(obj, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out)


def measure_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state actually allocated: every tensor with at least one dimension found in
    ``optimizer.state`` (nested dicts and lists included) and in any optimizer it holds as an attribute
    (hybrids that delegate), each storage counted once. 0-dim tensors are step counters and left out,
    as the estimator leaves them out."""
    tensors: list[torch.Tensor] = []
    seen_opts: set[int] = set()

    def visit(opt: torch.optim.Optimizer) -> None:
        if id(opt) in seen_opts:
            return
        seen_opts.add(id(opt))
        for st in opt.state.values():
            _tensors_in(st, tensors)
        for value in vars(opt).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, torch.optim.Optimizer):
                    visit(item)

    visit(optimizer)
    storages: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t.dim() == 0:
            continue
        if hasattr(t, "to_local"):  # DTensor: the local shard is what this rank holds
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            continue
        key = (str(t.device), storage.data_ptr())
        storages[key] = max(storages.get(key, 0), storage.nbytes())
    return int(sum(storages.values()))

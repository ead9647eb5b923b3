"""The built-in optimizers and LR schedules: one table, one record per registry name.

This module is where an optimizer becomes a registry entry. The algorithm files under
:mod:`lightning_optim.optim` define classes and know nothing of the registry; :mod:`lightning_optim.registry`
imports this module once, on the first lookup, and adds :data:`OPTIMIZERS` and :data:`SCHEDULERS` to its
tables. The import direction is one way: this module imports the algorithm modules and the records of
:mod:`lightning_optim.specs`, never the registry.

**Defaults are written once.** A record names the class whose ``__init__`` signature lists the
hyperparameters and their defaults; ``overrides`` holds only the values where the registry's published
default (Semenov, Pagliardini & Jaggi 2025, arXiv 2509.01440, best 124M settings) differs from the class's
own. :func:`optimizer` refuses an override equal to the signature's value, so the table cannot drift into
restating the class. A variant is the same class with other overrides (``d-muon`` is ``Muon``). Optimizers
from optional packages (bitsandbytes) list their defaults in full, because their class cannot be imported
to read a signature when the extra is not installed. Two families are generated from a small table of their
own and spliced in at the end of :data:`OPTIMIZERS`: torchao's low-bit AdamW
(:data:`lightning_optim.optim.torchao_lowbit.SPECS`) and the wave-2 optimizers
(:data:`lightning_optim.optim.wave2_specs.SPECS`, :data:`lightning_optim.optim.wave2b_specs.SPECS` and one
``<name>_specs`` module per later entry: shampoo, psgd-kron, adamuon, dion); all build
records from :mod:`lightning_optim.specs` and never import the registry.

**The class is the factory** unless construction needs more than ``cls(params, **hp)``: torch's Adam(W)
choose the fused kernel, SGD checks Nesterov's preconditions, optional packages are imported lazily.

Schedules are the dataclasses of :mod:`lightning_optim.schedules`; their defaults are the dataclass fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping

import torch

from lightning_optim.optim import (
    adamuon_specs,
    adamw8bit,
    ademamix,
    dion_specs,
    adopt,
    lion,
    mars,
    muon,
    normuon,
    prodigy,
    psgd_kron_specs,
    sf_adamw,
    sf_normuon,
    shampoo_specs,
    signum,
    soap,
    sophia,
    torch_builtin,
    torchao_lowbit,
    wave2_specs,
    wave2b_specs,
)
from lightning_optim.optim._hybrid import ADAMW_ROUTING
from lightning_optim.schedules import (ConstantSchedule, CosineSchedule, InverseSqrtSchedule, LinearSchedule, Schedule,
                                       WSDSchedule)
from lightning_optim.specs import OptimizerSpec, SchedulerSpec, StateLayout, signature_defaults

__all__ = ["OPTIMIZERS", "SCHEDULERS", "optimizer"]

_TORCH = "https://github.com/pytorch/pytorch/tree/main/torch/optim"
_SCHEDULE_FREE_SWITCH = "lightning_optim.callbacks.schedule_free:ScheduleFreeSwitch"


def optimizer(
    name: str,
    cls: type | None,
    *,
    factory: Callable[..., torch.optim.Optimizer] | None = None,
    overrides: Mapping[str, Any] | None = None,
    hidden: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
    factory_options: tuple[str, ...] = (),
    **fields: Any,
) -> OptimizerSpec:
    """One built-in record: ``defaults`` = ``cls``'s signature defaults, without ``hidden`` names, plus the
    ``factory_options`` the factory adds (with the factory's defaults: ``adamw``/``adam`` take ``cautious``),
    updated with ``overrides``; or, for a class that cannot be imported here (``cls=None``), ``defaults`` in
    full. ``factory`` defaults to ``cls``. Raises ``ValueError`` naming the record for an override that
    restates the signature or names a hyperparameter the class does not take."""
    if cls is None:
        if defaults is None or factory is None:
            raise ValueError(f"built-in {name!r}: without a class, give its factory and its defaults in full")
        return OptimizerSpec(name=name, factory=factory, defaults=dict(defaults), **fields)
    if defaults is not None:
        raise ValueError(f"built-in {name!r}: defaults come from {cls.__name__}'s signature; give overrides")
    signature, _ = signature_defaults(cls)
    factory_params = inspect.signature(factory).parameters if factory is not None else {}
    for key in factory_options:
        if key in signature or key not in factory_params:
            raise ValueError(f"built-in {name!r}: factory option {key!r} must be a parameter of the factory, "
                             f"not of {cls.__name__}")
        signature[key] = factory_params[key].default
    for key in hidden:
        if key not in signature:
            raise ValueError(f"built-in {name!r}: hidden {key!r} is not a parameter of {cls.__name__}")
        del signature[key]
    for key, value in (overrides or {}).items():
        if key not in signature:
            raise ValueError(f"built-in {name!r}: override {key!r} is not a parameter of {cls.__name__}")
        if signature[key] == value and type(signature[key]) is type(value):
            raise ValueError(f"built-in {name!r}: override {key}={value!r} repeats {cls.__name__}'s default")
    return OptimizerSpec(name=name, factory=factory or cls, defaults={**signature, **(overrides or {})}, **fields)


# ----------------------------------------------------------------------------------------------------------
# State layouts that depend on the parameter's shape (the docstring is the memory report's label)


def _adafactor_factors(shape: tuple[int, ...]) -> int:
    """row + column factors (≥2-D) or a full second moment (≤1-D)"""
    if len(shape) < 2:
        return math.prod(shape) if shape else 1
    return math.prod(shape[:-2]) * (shape[-2] + shape[-1])


def _rows(shape: tuple[int, ...]) -> int:
    """+ rows (per-row second moment)"""
    return int(shape[0]) if shape else 1


def _soap_preconditioners(shape: tuple[int, ...]) -> int:
    """2·Σ d_i² over preconditioned dims (GG_i and Q_i)"""
    work, preconditioned = soap.soap_work_shape(shape)
    return 2 * sum(d * d for d, flag in zip(work, preconditioned) if flag)


_ADAM_STATE = StateLayout(2, names=("exp_avg", "exp_avg_sq"))
_MOMENTUM_STATE = StateLayout(1, names=("momentum_buffer",))


def _lowp(matrix: tuple[str, ...], other: tuple[str, ...] = ()) -> dict[bool, tuple[str, ...]]:
    """The state tensors ``state_dtype`` stores in low precision: the main rule's, a hybrid's other part's."""
    return {True: tuple(matrix), False: tuple(other)}


_MUON_FAMILY = dict(
    family="matrix",
    hybrid=True,
    state=_MOMENTUM_STATE,
    other_state=_ADAM_STATE,
    routing=ADAMW_ROUTING,
    reference="torch.optim.Muon (torch/optim/_muon.py); github.com/KellerJordan/Muon",
    low_precision_state=_lowp(("momentum_buffer",)),
)

OPTIMIZERS: tuple[OptimizerSpec, ...] = (
    # torch.optim ------------------------------------------------------------------------------------------
    optimizer(
        "adamw", torch.optim.AdamW, factory=torch_builtin.adamw, factory_options=("cautious",),
        overrides={"weight_decay": 0.1},
        state=_ADAM_STATE,
        paper="Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization (arXiv 1711.05101)",
        reference=f"torch.optim.AdamW ({_TORCH}/adamw.py)",
        description="Adam with decoupled weight decay; torch's fused kernel where supported",
        aliases=("adam-w",),
    ),
    optimizer(
        "adam", torch.optim.Adam, factory=torch_builtin.adam, factory_options=("cautious",),
        hidden=("decoupled_weight_decay",),  # that switch is `adamw`; here weight_decay stays L2
        state=_ADAM_STATE,
        paper="Kingma & Ba 2015, Adam: A Method for Stochastic Optimization (arXiv 1412.6980)",
        reference=f"torch.optim.Adam ({_TORCH}/adam.py)",
        description="Adam; weight_decay is L2 (added to the gradient), as in torch.optim.Adam",
    ),
    optimizer(
        "sgd", torch.optim.SGD, factory=torch_builtin.sgd,
        overrides={"lr": 1e-2, "momentum": 0.9, "nesterov": True},
        state=_MOMENTUM_STATE,
        paper="Sutskever et al. 2013, On the importance of initialization and momentum in deep learning",
        reference=f"torch.optim.SGD ({_TORCH}/sgd.py)",
        description="SGD with (Nesterov) momentum; weight_decay is L2, as in torch.optim.SGD",
    ),
    optimizer(
        "adafactor", torch.optim.Adafactor,
        state=StateLayout(0, extra=_adafactor_factors),
        paper="Shazeer & Stern 2018, Adafactor: Adaptive Learning Rates with Sublinear Memory Cost (arXiv 1804.04235)",
        reference=f"torch.optim.Adafactor ({_TORCH}/_adafactor.py)",
        description="factored second moment, relative step size capped by lr (lr is honoured)",
        supports_dtensor=False,
        dtensor_note=(
            "torch.optim.Adafactor's in-place row/column factor updates fail on row-sharded DTensors "
            "(aten.pow_ on a _NormPartial placement); use DDP, or adamw/lion/muon under FSDP2"
        ),
    ),
    # elementwise ------------------------------------------------------------------------------------------
    optimizer(
        "lion", lion.Lion,
        state=StateLayout(1, names=("exp_avg",)),
        low_precision_state=_lowp(("exp_avg",)),
        paper="Chen et al. 2023, Symbolic Discovery of Optimization Algorithms (arXiv 2302.06675)",
        reference="google/automl lion/lion_pytorch.py; lucidrains/lion-pytorch",
        description="sign of interpolated momentum; 1 state tensor",
    ),
    optimizer(
        "signum", signum.Signum,
        state=_MOMENTUM_STATE,
        low_precision_state=_lowp(("momentum_buffer",)),
        paper="Bernstein et al. 2018, signSGD: Compressed Optimisation for Non-Convex Problems (arXiv 1802.04434)",
        reference="epfml/llm-optimizer-benchmark (buffer initialised at zeros here, as in the paper)",
        description="sign of Nesterov momentum; 1 state tensor",
    ),
    optimizer(
        "adopt", adopt.ADOPT,
        state=_ADAM_STATE,
        low_precision_state=_lowp(("exp_avg", "exp_avg_sq")),
        paper="Taniguchi et al. 2024, ADOPT: Modified Adam Can Converge with Any β2 (arXiv 2411.02853)",
        reference="iShohei220/adopt adopt.py (clamp schedule stored as a number here, not a lambda)",
        description="Adam variant: normalise by the previous second moment, then momentum; clamped",
    ),
    optimizer(
        "ademamix", ademamix.AdEMAMix,
        state=StateLayout(3, names=("exp_avg", "exp_avg_slow", "exp_avg_sq")),
        low_precision_state=_lowp(("exp_avg", "exp_avg_slow", "exp_avg_sq")),
        paper="Pagliardini, Ablin & Grangier 2024, The AdEMAMix Optimizer (arXiv 2409.03137)",
        reference="apple/ml-ademamix pytorch/ademamix.py",
        description="AdamW plus a slow EMA of the gradient (β3) mixed in with weight α",
        horizon_hyperparameters=("alpha_warmup", "beta3_warmup"),
    ),
    optimizer(
        "mars", mars.MARS,
        state=StateLayout(3, names=("exp_avg", "exp_avg_sq", "last_grad")),
        other_state=_ADAM_STATE,
        low_precision_state=_lowp(("exp_avg", "exp_avg_sq", "last_grad"), ("exp_avg", "exp_avg_sq")),
        hybrid=True,
        routing="matrices (>=2-D, not embedding/head) → MARS-AdamW; the rest → AdamW (adamw_lr, adamw_betas)",
        paper="Yuan et al. 2024, MARS: Unleashing the Power of Variance Reduction for Training Large Models "
        "(arXiv 2411.10438)",
        reference="AGI-Arena/MARS mars.py (last_grad kept as a copy here, not a reference to p.grad)",
        description="variance-reduced AdamW on matrices, AdamW on the rest",
    ),
    optimizer(
        "prodigy", prodigy.Prodigy,
        state=StateLayout(4, names=("s", "p0", "exp_avg", "exp_avg_sq")),
        low_precision_state=_lowp(prodigy.Prodigy.lowp_names),
        paper="Mishchenko & Defazio 2023, Prodigy: An Expeditiously Adaptive Parameter-Free Learner "
        "(arXiv 2306.06101)",
        reference="konstmish/prodigy prodigyopt/prodigy.py",
        description="Adam with a learned step size d (lr ≈ 1); device-side estimate, one all-reduce per step",
    ),
    optimizer(
        "sf-adamw", sf_adamw.AdamWScheduleFree,
        state=StateLayout(2, names=("z", "exp_avg_sq")),
        low_precision_state=_lowp(sf_adamw.AdamWScheduleFree.lowp_names),
        paper="Defazio et al. 2024, The Road Less Scheduled (arXiv 2405.15682)",
        reference="facebookresearch/schedule_free schedulefree/adamw_schedulefree.py",
        description="schedule-free AdamW: no LR schedule; eval mode (x) for validation and checkpoints",
        aliases=("schedule-free-adamw", "adamw-schedule-free"),
        callbacks=(_SCHEDULE_FREE_SWITCH,),
        schedule_free=True,
    ),
    optimizer(
        "adamw8bit", None, factory=adamw8bit.adamw8bit,
        defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                  "min_8bit_size": 4096, "is_paged": False},
        state=StateLayout(2, names=("state1", "state2"), bytes_per_element=1.0 + 4.0 / 256),
        paper="Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization (arXiv 2110.02861)",
        reference="bitsandbytes-foundation/bitsandbytes bitsandbytes.optim.AdamW8bit",
        description="AdamW with block-wise 8-bit moments (bitsandbytes; optional extra 'bnb')",
        aliases=("adamw-8bit", "bnb-adamw8bit"),
        requires="bnb",
        supports_dtensor=False,
        dtensor_note=(
            "bitsandbytes' 8-bit kernels have no DTensor sharding strategy; use DDP, or torchao's 8-bit AdamW "
            "'adamw8bit-torchao' (DTensor-aware state; pip install 'lightning-optim[torchao]')"
        ),
    ),
    # matrix -----------------------------------------------------------------------------------------------
    optimizer(
        "soap", soap.SOAP,
        family="matrix",
        state=StateLayout(2, extra=_soap_preconditioners, names=("exp_avg", "exp_avg_sq"), replicated="all"),
        paper="Vyas et al. 2024, SOAP: Improving and Stabilizing Shampoo using Adam (arXiv 2409.11321)",
        reference="https://github.com/nikhilvyas/SOAP (soap.py)",
        description="Adam in the eigenbasis of Shampoo's factors; batched eigh/QR refreshes every "
        "precondition_frequency steps",
    ),
    optimizer(
        "muon", muon.Muon,
        paper="Jordan et al. 2024, Muon: An optimizer for hidden layers in neural networks",
        description="momentum orthogonalised by Newton–Schulz for hidden matrices; AdamW (own lr/betas) for the rest",
        **_MUON_FAMILY,
    ),
    optimizer(
        "d-muon", muon.Muon,
        overrides={"lr": 1e-3, "weight_decay": 0.1, "adjust_lr": "match_rms_adamw", "adamw_lr": None,
                   "adamw_weight_decay": None},
        paper="Liu et al. 2025, Muon is Scalable for LLM Training (arXiv 2502.16982)",
        description="Muon with decoupled weight decay and the 0.2·sqrt(max(rows, cols)) scale: AdamW's lr/wd carry over",
        aliases=("dmuon", "moonlight-muon"),
        **_MUON_FAMILY,
    ),
    optimizer(
        "normuon", normuon.NorMuon,
        family="matrix",
        hybrid=True,
        state=StateLayout(1, extra=_rows, names=("momentum_buffer",)),
        other_state=_ADAM_STATE,
        low_precision_state=_lowp(("momentum_buffer",)),
        routing=ADAMW_ROUTING,
        paper="Li et al. 2025, NorMuon: Making Muon more efficient and scalable (arXiv 2510.05491)",
        reference="github.com/zichongli5/NorMuon",
        description="Muon + per-row second-moment normalisation of the orthogonalised update (RMS 0.2 by default)",
    ),
    optimizer(
        "sf-normuon", sf_normuon.SFNorMuon,
        family="matrix",
        hybrid=True,
        state=StateLayout(2, extra=_rows, names=("z", "momentum_buffer")),
        other_state=StateLayout(2, names=("z", "exp_avg_sq")),
        routing=ADAMW_ROUTING.replace("internal AdamW", "internal schedule-free AdamW (decay at z)"),
        paper="Apte et al. 2026, Anytime Training with Schedule-Free Spectral Optimization (arXiv 2605.23061)",
        reference="facebookresearch/schedule_free (SF iterates); github.com/zichongli5/NorMuon (row normalisation)",
        description="schedule-free NorMuon: no LR schedule, optimizer.train()/eval() switch y ↔ x",
        aliases=("sfnormuon", "schedule-free-normuon"),
        schedule_free=True,
        callbacks=(_SCHEDULE_FREE_SWITCH,),
    ),
    # second-order -----------------------------------------------------------------------------------------
    optimizer(
        "sophia", sophia.SophiaG,
        family="second-order",
        state=StateLayout(2, names=("exp_avg", "hessian")),
        paper="Liu et al. 2023, Sophia: A Scalable Stochastic Second-order Optimizer for Language Model "
        "Pre-training (arXiv 2305.14342)",
        reference="https://github.com/Liuhong99/Sophia (sophia.py, train_sophiag.py)",
        description="clipped diagonal Newton step; Gauss–Newton–Bartlett Hessian every hessian_interval steps "
        "(SophiaHessian callback, needs the model's logits_for_batch)",
        aliases=("sophia-g", "sophiag"),
        callbacks=("lightning_optim.callbacks.sophia_hessian:SophiaHessian",),
    ),
    # torchao's low-bit AdamW (optional extra 'torchao'): adamw8bit-torchao, adamw4bit, adamw-fp8
    *torchao_lowbit.SPECS,
    *wave2_specs.SPECS,  # lamb, stable-adamw, adam-mini, galore, apollo, apollo-mini
    *wave2b_specs.SPECS,  # scion, adalayer
    *shampoo_specs.SPECS,
    *psgd_kron_specs.SPECS,
    *adamuon_specs.SPECS,
    *dion_specs.SPECS,
)


def schedule(cls: type[Schedule], description: str) -> SchedulerSpec:
    """A schedule record: its accepted arguments and defaults are the dataclass's own fields."""
    own = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ("total_steps", "warmup_steps")}
    return SchedulerSpec(
        name=cls.name, schedule_cls=cls, defaults=own, description=description,
        needs_total_steps=cls.needs_total_steps,
    )


SCHEDULERS: tuple[SchedulerSpec, ...] = (
    schedule(ConstantSchedule, "warmup, then the peak lr"),
    schedule(CosineSchedule, "warmup, cosine to final_fraction·peak"),
    schedule(LinearSchedule, "warmup, straight line to final_fraction·peak"),
    schedule(WSDSchedule, "warmup, stable, then a cooldown over the last decay_fraction (linear/cosine/sqrt)"),
    schedule(InverseSqrtSchedule, "warmup, then sqrt(τ/t)"),
)

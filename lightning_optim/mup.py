"""muP, the Maximal Update Parametrization: per-layer initialisation and learning-rate multipliers that make the
optimal hyperparameters of a base width hold at every width.

Sources: Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter
Transfer" (arXiv 2203.03466), Table 3 (muP for Adam) and its equivalent formulation with an output multiplier
(Table 8/9), as the ``mup`` package implements it (github.com/microsoft/mup: ``MuReadout`` divides the readout
input by ``width_mult``, ``MuSharedReadout`` does so for a readout tied to the input embedding, ``MuAdam`` divides
the lr of matrix-like weights by their fan-in multiplier and multiplies their weight decay by it); for the Muon
family the spectral condition of Yang, Simon & Bernstein 2023, "A Spectral Condition for Feature Learning"
(arXiv 2310.17813): a hidden weight update needs spectral norm ``Θ(sqrt(fan_out / fan_in))``.

With ``m = width / base_width`` (the width multiplier; ``m_in = fan_in / base_fan_in`` of each hidden matrix, which
for the Llama MLP's rounded hidden width is not exactly ``m``) the rule applied here, for Adam-like optimizers:

============  =========================================  ============================  ==========================
role          which parameters                           init std                      Adam lr
============  =========================================  ============================  ==========================
embedding     token / position tables (fan-in finite)    base std (constant)           η (constant)
hidden        every other matrix (fan-in ∝ width)        base std / sqrt(m_in)         η / m_in
readout       output head; logits multiplied by 1/m      base std (constant)           η (constant)
vector        norm gains, biases                         base (ones / zeros)           η (constant)
============  =========================================  ============================  ==========================

This is Table 3's "μP" column in its output-multiplier form (the equivalent Tables 8/9): Table 3 initialises the
output weights with variance ``1/fan_in²`` and gives them lr ``η/fan_in``; multiplying the readout's input by
``1/m`` instead, the output weights keep a constant-variance initialisation and a constant Adam lr, and produce the
same function and the same training dynamics (Adam's update is invariant to the gradient's scale). Input weights and biases: variance
``1/fan_in`` with a finite fan-in, i.e. constant, lr constant; hidden weights: variance ``1/fan_in``, lr
``η/fan_in``. Written relative to a base width so that at ``m = 1`` every multiplier is 1: the base model is the
standard-parametrization model, and its tuned lr is the lr given. Hidden weight decay is multiplied by ``m_in``
(as ``MuAdam`` does) so that AdamW's per-step decay ``lr·wd`` stays constant.

Attention uses ``1/head_dim`` scaling instead of ``1/sqrt(head_dim)`` (TP5 §4 / Appendix: the query–key product of
correlated Θ(1) coordinates grows like ``head_dim``), written ``softmax_scale = sqrt(base_head_dim) / head_dim``
so that it equals ``1/sqrt(head_dim)`` at the base width. The recipe models scale width with **n_head fixed**
(``head_dim = n_embd / n_head`` grows with ``m``; ``base_head_dim = base_width / n_head``); a model that keeps
``head_dim`` fixed and adds heads gets ``softmax_scale = 1/sqrt(head_dim)`` from the same formula only if it also
changes ``n_head`` between base and target, which these models do not do.

**Tied embeddings.** The recipe models tie the head to the token embedding. The rule applied is ``mup``'s
``MuSharedReadout``, what practitioners use for tied models: the shared matrix is treated as an *embedding*
(constant init, constant lr) and the logits are ``(h / m) · Wᵀ``. Untying would change the presets' parameter
count and the default model, so it is not done; an untied head (``tie_embeddings=False``) is a readout as in the
table (the same constant init and lr, and the same ``1/m`` multiplier).

**Muon family** (``muon`` with ``adjust_lr`` ``"original"`` or ``"none"``): the hidden matrices follow Muon's own
rule. Its orthogonalised update has spectral norm 1, and ``adjust_lr="original"`` multiplies it by
``sqrt(max(1, rows/cols))``, the spectral condition's ``sqrt(fan_out/fan_in)`` (for ``fan_out >= fan_in``; 1
otherwise); with every dimension ∝ width that factor does not change with width, so the hidden lr multiplier is 1
(``adjust_lr="none"``: the factor is 1, also width-independent). What muP still changes for Muon: the init of the
hidden matrices (std / sqrt(m_in): the spectral condition's init, std ∝ ``min(1, sqrt(fan_out/fan_in)) /
sqrt(fan_in)``, has the same order when the aspect ratios are fixed), the readout multiplier ``1/m`` and attention
``1/head_dim``; the embeddings, the
head and the vectors are stepped by Muon's internal AdamW and get the Adam column above (all constant). ``d-muon``
(``adjust_lr="match_rms_adamw"``, update ``0.2·sqrt(max(rows, cols))·O``) has spectral norm ∝ ``sqrt(max dim)``,
so the spectral condition asks for a hidden lr multiplier ``sqrt(base_max_dim / max_dim)`` (≈ ``1/sqrt(m)``),
which is what it gets (derived, not measured here).

Which optimizers get which rule (:data:`ADAM_RULE`, :func:`optimizer_rule`): Adam-like elementwise methods whose
update has Θ(lr) entries whatever the gradient's scale (Adam, AdamW and their low-bit / schedule-free / clipped
variants, ADOPT, AdEMAMix, Lion, Signum, MARS) get the Adam rule; ``muon`` and ``d-muon`` the spectral rule.
Everything else is refused, naming the optimizer: SGD needs muP's SGD column (a different table), Adafactor and
LAMB scale updates by the weight norm, Prodigy sets its own lr, Adam-mini / Adalayer share second moments across
width-sized blocks, GaLore / APOLLO project onto a rank that does not grow with width, SOAP / Sophia / NorMuon /
SF-NorMuon normalise in ways the table does not cover, and Scion's per-layer norms already encode a width scaling
(Pethick et al. 2025): applying muP on top would double it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from torch import nn

from lightning_optim.specs import normalize_name

__all__ = ["MuPMultipliers", "MuPParam", "ROLES", "ADAM_RULE", "SPECTRAL_RULE", "optimizer_rule",
           "lr_multiplier", "mup_params", "mup_param_groups", "find_mup_model"]

ROLES = ("embedding", "hidden", "readout", "vector")

#: optimizers whose update has Θ(lr) entries regardless of the gradient's scale: TP5's Adam column applies
ADAM_RULE = frozenset({
    "adam", "adamw", "adamw8bit", "adamw8bit-torchao", "adamw4bit", "adamw-fp8", "stable-adamw", "sf-adamw",
    "adopt", "ademamix", "lion", "signum", "mars",
})
#: Muon-family optimizers and the ``adjust_lr`` modes for which the spectral rule is derived here
SPECTRAL_RULE = {"muon": ("original", "none"), "d-muon": ("match_rms_adamw",)}


@dataclass(frozen=True)
class MuPMultipliers:
    """The width multiplier and what it implies per parameter role (see the module docstring's table).

    ``width`` is the model's ``n_embd``; ``base_width`` the width whose hyperparameters were tuned.
    """

    base_width: int
    width: int

    def __post_init__(self) -> None:
        for name in ("base_width", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"muP {name} must be a positive integer, got {value!r}")

    @property
    def width_mult(self) -> float:
        """``m = width / base_width``."""
        return self.width / self.base_width

    @property
    def readout_multiplier(self) -> float:
        """What the readout's input is multiplied by: ``1/m`` (``MuReadout``)."""
        return self.base_width / self.width

    def init_std_multiplier(self, role: str, fan_in_mult: float = 1.0) -> float:
        """Init std relative to the base model's: ``1/sqrt(m_in)`` for hidden matrices, else 1."""
        _check_role(role)
        return self.hidden_std_factor(fan_in_mult) if role == "hidden" else 1.0

    @staticmethod
    def hidden_std_factor(fan_in_mult: float) -> float:
        """``1/sqrt(m_in)``: a hidden matrix's init variance ∝ ``1/fan_in`` (TP5 Table 3)."""
        return 1.0 / math.sqrt(fan_in_mult)

    def attention_scale(self, head_dim: int, base_head_dim: int) -> float:
        """``sqrt(base_head_dim) / head_dim``: ``1/head_dim`` scaling, ``1/sqrt(head_dim)`` at the base width."""
        return math.sqrt(base_head_dim) / head_dim


@dataclass(frozen=True)
class MuPParam:
    """One parameter as muP sees it: its role and its shape next to the base model's."""

    name: str
    role: str
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]

    @property
    def fan_in_mult(self) -> float:
        """``fan_in / base_fan_in`` (dimension 1 of a ``(out, in)`` weight); 1 for vectors and embeddings."""
        if self.role != "hidden":
            return 1.0
        return self.shape[1] / self.base_shape[1]


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown muP role {role!r}; roles are {', '.join(ROLES)}")


def optimizer_rule(optimizer: str, hyperparameters: Mapping[str, Any] | None = None) -> str:
    """``"adam"`` or ``"spectral"``: which muP rule applies to ``optimizer`` (a registry name) with its effective
    ``hyperparameters`` (Muon's ``adjust_lr``). Raises ``ValueError`` naming the optimizer where muP is not defined
    here (see the module docstring for why each is refused)."""
    name = normalize_name(optimizer)
    if name in ADAM_RULE:
        return "adam"
    if name in SPECTRAL_RULE:
        adjust = (hyperparameters or {}).get("adjust_lr", SPECTRAL_RULE[name][0])
        adjust = "original" if adjust is None else adjust
        if adjust not in SPECTRAL_RULE[name]:
            raise ValueError(f"muP (mup_base_width) for {name!r} is derived for adjust_lr in "
                             f"{SPECTRAL_RULE[name]}, got adjust_lr={adjust!r}")
        return "spectral"
    raise ValueError(
        f"muP (mup_base_width) is not defined for optimizer {optimizer!r}: the Adam rule (TP5 Table 3) applies to "
        f"{', '.join(sorted(ADAM_RULE))}; the spectral rule (Yang, Simon & Bernstein 2023) to "
        f"{', '.join(sorted(SPECTRAL_RULE))}. Leave mup_base_width unset for other optimizers")


def lr_multiplier(param: MuPParam, optimizer: str, hyperparameters: Mapping[str, Any] | None = None) -> float:
    """The lr multiplier of ``param`` under ``optimizer``'s rule: ``1/m_in`` for an Adam-rule hidden matrix,
    ``sqrt(base_max_dim/max_dim)`` for a ``d-muon`` hidden matrix, else 1 (Muon's own shape factor; embeddings,
    readout and vectors keep the base lr)."""
    rule = optimizer_rule(optimizer, hyperparameters)
    if param.role != "hidden":
        return 1.0
    if rule == "adam":
        return 1.0 / param.fan_in_mult
    if normalize_name(optimizer) == "d-muon":
        return math.sqrt(max(param.base_shape) / max(param.shape))
    return 1.0


def find_mup_model(module: nn.Module) -> nn.Module:
    """The (sub)module that takes muP multipliers: it has ``mup_params()`` and a ``config.mup_base_width``."""
    for sub in module.modules():
        if callable(getattr(sub, "mup_params", None)):
            return sub
    raise ValueError(f"muP (mup_base_width) needs a model that takes the multipliers (lightning_optim.models."
                     f"Transformer, built with mup_base_width); {type(module).__name__} contains none")


def mup_params(module: nn.Module) -> dict[int, MuPParam]:
    """``{id(parameter): MuPParam}`` for the muP model inside ``module`` (see :func:`find_mup_model`)."""
    model = find_mup_model(module)
    if getattr(model.config, "mup_base_width", None) is None:
        raise ValueError("muP (mup_base_width) is set for the optimizer but the model was built without it: "
                         "build the model with the same mup_base_width (LanguageModel takes it from its optim)")
    return {id(p): info for p, info in model.mup_params()}


def mup_param_groups(module: nn.Module, groups: Iterable[dict[str, Any]], optimizer: str,
                     hyperparameters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """``groups`` with muP's lr multipliers: each group split by multiplier, every group carrying
    ``lr_multiplier`` and, where it is not 1, an ``lr_scale`` multiplied by it (``create_optimizer`` turns
    ``lr_scale`` into the group's ``lr``, and schedules multiply each group's own initial lr, so the ratio holds
    for the whole run). A group whose lr is divided by ``m_in`` under the Adam rule has its ``weight_decay``
    (the group's, else ``hyperparameters["weight_decay"]``) multiplied by ``m_in``, keeping ``lr·wd``.

    A split group is named ``<name>_lrx<multiplier>`` (``decay_lrx0.25``). ``module`` must contain the muP model
    (:func:`find_mup_model`); every parameter of ``groups`` must belong to it.
    """
    hyperparameters = dict(hyperparameters or {})
    rule = optimizer_rule(optimizer, hyperparameters)
    infos = mup_params(module)
    out: list[dict[str, Any]] = []
    for gi, group in enumerate(groups):
        params = list(group["params"])
        names = group.get("param_names")
        buckets: dict[float, list[int]] = {}
        for i, p in enumerate(params):
            info = infos.get(id(p))
            if info is None:
                label = names[i] if names else f"param_groups[{gi}][{i}] shape {tuple(p.shape)}"
                raise ValueError(f"muP: parameter {label} is not a parameter of the muP model")
            buckets.setdefault(lr_multiplier(info, optimizer, hyperparameters), []).append(i)
        for mult, idx in buckets.items():
            sub = {k: v for k, v in group.items() if k not in ("params", "param_names", "transposed")}
            sub["params"] = [params[i] for i in idx]
            if names is not None:
                sub["param_names"] = [names[i] for i in idx]
            if group.get("transposed") is not None:
                sub["transposed"] = [group["transposed"][i] for i in idx]
            if len(buckets) > 1 and "name" in group:
                sub["name"] = f"{group['name']}_lrx{mult:.4g}"
            sub["lr_multiplier"] = mult
            if mult != 1.0:
                sub["lr_scale"] = float(group.get("lr_scale", 1.0)) * mult
                wd = group.get("weight_decay", hyperparameters.get("weight_decay"))
                if rule == "adam" and wd:
                    sub["weight_decay"] = float(wd) / mult
            out.append(sub)
    return out

"""Parameter grouping: which parameters get weight decay, and which follow a hybrid optimizer's matrix rule.

Default rules, applied to an ``nn.Module``: minGPT's decay / no-decay split (Karpathy's minGPT
``configure_optimizers``: no decay for biases, norm layers and embeddings; nanoGPT instead decays every tensor
with >= 2 dimensions, embeddings included), timm's "1-D parameters are not decayed", and the Muon-family
routing of Moonlight and of Semenov et al. 2025:

* no weight decay for parameters with fewer than 2 dimensions (biases, norm gains), for every parameter of
  a normalisation layer (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch/instance norms and any module whose
  class name ends in ``Norm``), for parameters named ``bias``, and for embeddings (``nn.Embedding`` and
  anything tied to one);
* a parameter shared between modules (a tied embedding / output head) appears once, classified by the most
  specific role it has (embedding wins);
* with ``split_matrices=True`` a parameter is a *matrix* iff it has >= 2 dimensions and is neither an
  embedding nor the output head (detected by module type, by a tie to an embedding, by a name such as
  ``lm_head``/``output``/``head``, or — for bare parameters — the benchmark's fallback "at least 10000 rows").
  Matrices get ``"matrix": True`` in their group; everything else ``"matrix": False``.

Hugging Face ``Conv1D`` (``transformers.pytorch_utils.Conv1D``, GPT-2's ``c_attn``/``c_proj``/``c_fc``) stores its
weight as ``(in, out)``, the transpose of ``nn.Linear``'s ``(out, in)``. It is detected by module type (class
``Conv1D`` from a ``transformers`` module; transformers is never imported here) and its weight gets
``transposed=True``: matrix groups then carry a ``transposed`` list aligned with ``param_names`` (plain bools,
so it survives ``state_dict``), and the Muon family computes its shape-dependent lr factor on the ``(out, in)``
view. HF embeddings (``wte``, ``wpe``, ``embed_tokens``: ``nn.Embedding``) and the head (``lm_head``: tied to
``wte`` in GPT-2, named ``lm_head`` in Llama/Mistral) are routed to AdamW by the rules above.

A plain parameter list (no module, no names) can only be routed by shape: :func:`split_by_shape` sends a tensor
to the matrix rule iff it has >= 2 dimensions and fewer than 10000 rows (an embedding/head-sized matrix goes to
AdamW), and warns once per call naming the shapes sent each way. Named parameters (``(name, tensor)`` pairs)
also go to AdamW when the name is an embedding's or a head's.

Groups carry a ``name`` ("decay", "no_decay", "matrix"; LearningRateMonitor shows them) and optionally an
``lr_scale``. Names are read through ``torch.compile`` wrappers (``_orig_mod.``) and FSDP2's ``fully_shard``
(DTensor parameters keep their global shape, so the rules see the real dimensions).

Override :meth:`OptimizerMixin.optimizer_param_groups` or pass ``rules`` to change them.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from lightning_optim.mup import lr_multiplier, mup_params

__all__ = ["GroupingRules", "ParamRole", "classify_parameters", "param_groups", "routing_table", "split_by_shape",
           "is_hf_conv1d", "PLAIN_LIST_WARNING"]

HEAD_NAME = re.compile(r"(^|\.)(lm_head|output|head|classifier|out_proj_vocab|unembed(ding)?)$")
LARGE_ROWS = 10_000  # Semenov et al.: 2-D parameters with this many rows are treated as embeddings/heads
_COMPILE_PREFIX = "_orig_mod."
EMBEDDING_NAME = re.compile(r"(^|\.)(wte|wpe|embed_tokens|embed_positions|tok_embeddings|word_embeddings|"
                            r"position_embeddings|token_embedding|embedding|embeddings|embed)(\.|$)")
PLAIN_LIST_WARNING = "no names: routing by shape; pass named parameters or a module for the full rule"


@dataclass
class GroupingRules:
    """Knobs of the default grouping.

    ``no_decay_patterns`` / ``other_patterns``: regular expressions matched (``re.search``) against the full
    parameter name, sending matches to the no-decay group or away from the matrix rule.
    ``lr_scales``: group name → lr multiplier (e.g. ``{"no_decay": 0.5}``).
    """

    decay_embeddings: bool = False
    decay_norms: bool = False
    decay_biases: bool = False
    no_decay_patterns: tuple[str, ...] = ()
    other_patterns: tuple[str, ...] = ()
    lr_scales: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ParamRole:
    """How the rules saw one parameter."""

    name: str
    shape: tuple[int, ...]
    decay: bool
    matrix: bool
    reason: str
    transposed: bool = False  # stored (in, out), as Hugging Face Conv1D; the matrix rule uses the (out, in) view
    lr_multiplier: float | None = None  # muP's lr multiplier (routing_table with an optimizer, on a muP model)


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        norm_types = norm_types + (rms,)
    return isinstance(module, norm_types) or type(module).__name__.lower().endswith("norm")


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (weight ``(in, out)``), detected without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _clean(name: str) -> str:
    return name.replace(_COMPILE_PREFIX, "")


def classify_parameters(module: nn.Module, rules: GroupingRules | None = None) -> list[tuple[Any, ParamRole]]:
    """Every trainable parameter once, in ``named_parameters`` order, with its role under ``rules``."""
    rules = rules or GroupingRules()
    embedding_ids: set[int] = set()
    norm_ids: set[int] = set()
    head_ids: set[int] = set()
    embedding_rows: set[int] = set()
    transposed_ids: set[int] = set()
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        own = list(mod.named_parameters(recurse=False, remove_duplicate=False))
        if is_hf_conv1d(mod):
            transposed_ids.update(id(p) for n, p in own if n == "weight" and p.ndim == 2)
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            embedding_ids.update(id(p) for _, p in own)
            embedding_rows.add(mod.num_embeddings)
        elif _is_norm(mod):
            norm_ids.update(id(p) for _, p in own)
        if HEAD_NAME.search(_clean(mod_name)):
            head_ids.update(id(p) for n, p in own if p.ndim >= 2)
    # a Linear producing as many outputs as an embedding has rows is an output head (untied GPT head)
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features in embedding_rows and mod.out_features >= 1000:
            head_ids.add(id(mod.weight))

    out: list[tuple[Any, ParamRole]] = []
    for raw_name, p in module.named_parameters():  # removes duplicates: a tied weight appears once
        if not p.requires_grad:
            continue
        name = _clean(raw_name)
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        is_embedding = id(p) in embedding_ids
        is_head = id(p) in head_ids or HEAD_NAME.search(name.rsplit(".", 1)[0] if "." in name else name) is not None
        if p.ndim < 2:
            decay, reason = False, "1-D"
        elif is_embedding:
            decay, reason = rules.decay_embeddings, "embedding"
        elif id(p) in norm_ids:
            decay, reason = rules.decay_norms, "norm"
        elif leaf == "bias":
            decay, reason = rules.decay_biases, "bias"
        else:
            decay, reason = True, "head" if is_head else "matrix"
        if p.ndim < 2 and ((id(p) in norm_ids and rules.decay_norms) or (leaf == "bias" and rules.decay_biases)):
            decay = True
        if any(re.search(pat, name) for pat in rules.no_decay_patterns):
            decay, reason = False, f"pattern:{reason}"
        matrix = (
            p.ndim >= 2
            and not is_embedding
            and not is_head
            and id(p) not in norm_ids
            and not (shape[0] >= LARGE_ROWS and _bare(module, p))
            and not any(re.search(pat, name) for pat in rules.other_patterns)
        )
        out.append((p, ParamRole(name=name, shape=shape, decay=decay, matrix=matrix, reason=reason,
                                 transposed=id(p) in transposed_ids)))
    return out


def _bare(module: nn.Module, p: Any) -> bool:
    """True when ``p`` is not owned by a Linear/Conv/HF Conv1D module (a bare ``nn.Parameter``): the rows fallback
    applies."""
    for mod in module.modules():
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or is_hf_conv1d(mod):
            if any(q is p for q in mod.parameters(recurse=False)):
                return False
    return True


def param_groups(
    module: nn.Module,
    *,
    split_matrices: bool = False,
    weight_decay: float | None = None,
    rules: GroupingRules | None = None,
) -> list[dict[str, Any]]:
    """Named parameter groups for ``module`` under the default rules (see the module docstring).

    Decay groups leave ``weight_decay`` to the optimizer's value unless ``weight_decay`` is given; no-decay
    groups get ``weight_decay=0``. Empty groups are dropped. With ``split_matrices=True`` a matrix group that
    holds a transposed (HF ``Conv1D``) weight also carries ``transposed``: one bool per parameter.
    """
    rules = rules or GroupingRules()
    buckets: dict[str, dict[str, Any]] = {}
    for p, role in classify_parameters(module, rules):
        if split_matrices and role.matrix:
            gname = "matrix" if role.decay else "matrix_no_decay"
        else:
            gname = "decay" if role.decay else "no_decay"
        group = buckets.get(gname)
        if group is None:
            group = {"params": [], "param_names": [], "name": gname}
            if split_matrices:
                group["matrix"] = role.matrix
            if not role.decay:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = weight_decay
            if gname in rules.lr_scales:
                group["lr_scale"] = float(rules.lr_scales[gname])
            buckets[gname] = group
        group["params"].append(p)
        group["param_names"].append(role.name)
        group.setdefault("_transposed", []).append(role.transposed)
    unknown = set(rules.lr_scales) - set(buckets)
    if unknown:
        raise ValueError(f"lr_scales names unknown group(s) {sorted(unknown)}; groups are {sorted(buckets)}")
    for group in buckets.values():
        flags = group.pop("_transposed")
        if split_matrices and group.get("matrix") and any(flags):
            group["transposed"] = flags
    order = ["matrix", "matrix_no_decay", "decay", "no_decay"]
    return [buckets[k] for k in order if k in buckets]


def routing_table(module: nn.Module, split_matrices: bool = True, rules: GroupingRules | None = None,
                  optimizer: str | None = None, hyperparameters: dict[str, Any] | None = None) -> list[ParamRole]:
    """One :class:`ParamRole` per trainable parameter: where the default rules send it.

    With ``optimizer`` (a registry name; ``hyperparameters`` its settings, e.g. Muon's ``adjust_lr``) and a model
    built with ``mup_base_width``, each row also carries muP's ``lr_multiplier`` under that optimizer's rule
    (:func:`lightning_optim.mup.lr_multiplier`).
    """
    classified = classify_parameters(module, rules)
    mults: dict[int, float] = {}
    if optimizer is not None:
        infos = mup_params(module)
        mults = {id(p): lr_multiplier(infos[id(p)], optimizer, hyperparameters) for p, _ in classified}
    rows = []
    for p, r in classified:
        if not split_matrices:
            r = ParamRole(r.name, r.shape, r.decay, False, r.reason, r.transposed)
        rows.append(replace(r, lr_multiplier=mults[id(p)]) if id(p) in mults else r)
    return rows


def _shape_summary(shapes: list[tuple[int, ...]]) -> str:
    counts = Counter(shapes)
    return ", ".join(f"{n}x {s}" for s, n in counts.items()) or "none"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package and ``torch.optim``."""
    import torch.optim

    skip = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.optim.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def split_by_shape(params: list[Any], names: list[str] | None = None,
                   owner: str = "optimizer") -> tuple[list[int], list[int]]:
    """Route tensors that came without a module: indices ``(matrix, other)`` into ``params``.

    Rule: a tensor follows the matrix rule iff it has >= 2 dimensions and fewer than ``LARGE_ROWS`` (10000)
    rows — an embedding- or head-sized matrix (GPT-2's 50304 × 768) goes to AdamW, as Semenov et al. 2025's
    benchmark does for bare parameters. With ``names`` a tensor whose name is an embedding's or a head's
    (``wte``, ``embed_tokens``, ``lm_head``, ...) also goes to AdamW. Without names a ``UserWarning``
    (:data:`PLAIN_LIST_WARNING`) names the shapes sent each way, since a small embedding or head cannot be
    told from a hidden matrix by shape alone.
    """
    mat, oth = [], []
    for i, p in enumerate(params):
        name = names[i] if names is not None else None
        by_name = name is not None and (EMBEDDING_NAME.search(_clean(name)) is not None
                                        or HEAD_NAME.search(_clean(name).rpartition(".")[0] or name) is not None)
        is_matrix = p.ndim >= 2 and int(p.shape[0]) < LARGE_ROWS and not by_name
        (mat if is_matrix else oth).append(i)
    if names is None and params:
        warnings.warn(
            f"{owner}: {PLAIN_LIST_WARNING}. Matrix rule: {_shape_summary([tuple(params[i].shape) for i in mat])}; "
            f"AdamW (fewer than 2 dims, or >= {LARGE_ROWS} rows): "
            f"{_shape_summary([tuple(params[i].shape) for i in oth])}",
            UserWarning, stacklevel=_user_stacklevel())
    return mat, oth

"""Shared pieces of the conformance suite: the tiny model, deterministic batches, building any registered
optimizer, state comparison, and a fallback non-finite-gradient guard.

Imported by the tests (``tests.conformance._helpers``) and by the torchrun script
``tests/dist_scripts/conf_fsdp2.py``, so both run exactly the same model and data.
"""

from __future__ import annotations

import copy
import math
import os
from functools import lru_cache
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import lightning_optim as lo
from lightning_optim.registry import get_optimizer_spec, normalize_name

VOCAB, DIM, HIDDEN = 16, 8, 13  # HIDDEN odd: FSDP2 shards it unevenly over 2 ranks (7 + 6 rows)
BATCH, SEQ = 4, 6
# Hyperparameters that keep every optimizer's run short and its state path fully exercised. Applied only
# where the spec accepts the name (e.g. SOAP's first preconditioner refresh inside a 3-step run).
SHORT_RUN_HP = {"precondition_frequency": 2, "hessian_interval": 2}


class Tiny(nn.Module):
    """Embedding → Linear → LayerNorm → GELU → Linear (+residual) → head: every kind of parameter the
    grouping rules route (embedding, matrix, bias, norm gain, output head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        x = x + self.fc2(F.gelu(self.norm(self.fc1(x))))
        return self.head(x)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def batch(step: int, rank: int = 0, world: int = 1, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` (the global batch split by rank: rank r gets rows r::world of a world·size batch)."""
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, VOCAB, (size * world, SEQ), generator=g)
    tgt = torch.randint(0, VOCAB, (size * world, SEQ), generator=g)
    return idx[rank::world], tgt[rank::world]


def loss_fn(model: nn.Module, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    idx, tgt = batch(step, rank, world)
    logits = model(idx)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), tgt.reshape(-1))


def accepted_hp(name: str, **overrides: Any) -> dict[str, Any]:
    spec = get_optimizer_spec(name)
    hp = {k: v for k, v in {**SHORT_RUN_HP, **overrides}.items() if k in spec.defaults}
    return hp


def build(name: str, params_or_module: Any, **hp: Any) -> torch.optim.Optimizer:
    """``create_optimizer`` plus what a Lightning run would do around it (schedule-free: train mode)."""
    opt = lo.create_optimizer(name, params_or_module, **accepted_hp(name, **hp))
    set_train_mode(opt)
    return opt


def set_train_mode(opt: torch.optim.Optimizer) -> None:
    if callable(getattr(opt, "train", None)):
        opt.train()


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, start: int, n: int,
                rank: int = 0, world: int = 1) -> list[float]:
    losses = []
    for step in range(start, start + n):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, step, rank, world)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
        hessian_pass(model, opt, step, rank, world)
    return losses


def hessian_pass(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int = 0, world: int = 1) -> None:
    """What ``SophiaHessian`` does after every ``hessian_interval``-th step, for any optimizer exposing
    ``update_hessian`` (Sophia-G's Gauss–Newton–Bartlett estimate), with labels sampled reproducibly."""
    update = getattr(opt, "update_hessian", None)
    if not callable(update) or (step + 1) % int(getattr(opt, "hessian_interval", 10)) != 0:
        return
    opt.zero_grad(set_to_none=True)
    idx, _ = batch(step, rank, world)
    logits = model(idx).float().reshape(-1, VOCAB)
    gen = torch.Generator().manual_seed(10_000 + step * max(world, 1) + rank)
    with torch.no_grad():
        sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(-1)
    F.cross_entropy(logits, sampled).backward()
    update(bs=logits.shape[0] * world)
    opt.zero_grad(set_to_none=True)


def registered_optimizers() -> list[str]:
    names = lo.available_optimizers()
    only = os.environ.get("LIGHTNING_OPTIM_CONFORMANCE")
    if only:
        wanted = {normalize_name(n) for n in only.split(",") if n.strip()}
        names = [n for n in names if n in wanted]
    return names


@lru_cache(maxsize=None)
def missing_dependency(name: str) -> str | None:
    """Why ``name`` cannot be built here (an ImportError at construction), or None."""
    try:
        build(name, make_model())
    except ImportError as err:
        spec = lo.optimizer_info(name)
        extra = f" (extra {spec.requires!r})" if spec.requires else ""
        return f"optimizer {name!r} needs an optional dependency that is not installed{extra}: {err}"
    except Exception:  # a real construction bug: let the test itself fail on it
        return None
    return None


# ------------------------------------------------------------------------------------------------------------
# Comparing weights and optimizer state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a nested dict/list/tuple structure, in a stable order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=lambda k: (str(type(k)), str(k))):
            yield from flatten(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def diff_states(a: Any, b: Any, exact: bool = True, atol: float = 0.0) -> list[str]:
    """Human-readable differences between two nested structures of tensors and plain values."""
    fa, fb = dict(flatten(a)), dict(flatten(b))
    out = []
    for k in sorted(set(fa) | set(fb)):
        if k not in fa or k not in fb:
            out.append(f"{k}: only in {'first' if k in fa else 'second'}")
            continue
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                # a 0-d tensor on one side and a number on the other (e.g. "step") is the same value
                xv = float(x) if isinstance(x, torch.Tensor) and x.numel() == 1 else x
                yv = float(y) if isinstance(y, torch.Tensor) and y.numel() == 1 else y
                if xv != yv:
                    out.append(f"{k}: {type(x).__name__} vs {type(y).__name__}")
                continue
            x, y = _local(x).detach().cpu(), _local(y).detach().cpu()
            if x.shape != y.shape or x.dtype != y.dtype:
                out.append(f"{k}: {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}")
            elif exact and not torch.equal(x, y):
                if not (x.is_floating_point() and torch.equal(x.isnan(), y.isnan()) and torch.equal(
                        x.nan_to_num(), y.nan_to_num())):
                    out.append(f"{k}: max |diff| {(x.double() - y.double()).abs().max().item():.3g}")
            elif not exact and not torch.allclose(x.double(), y.double(), atol=atol, rtol=0):
                out.append(f"{k}: max |diff| {(x.double() - y.double()).abs().max().item():.3g} > {atol}")
        elif isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        elif x != y:
            out.append(f"{k}: {x!r} vs {y!r}")
    return out


def canonical_optimizer_state(sd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict keyed by (group, position) instead of by its integer ids.

    ``Optimizer.load_state_dict`` pairs saved and live parameters by their position in the groups, so two
    state dicts that number the parameters differently (Lightning's FSDP2 full checkpoints number them in
    ``model.parameters()`` order) hold the same state when they agree position by position."""
    out: dict[str, Any] = {}
    for gi, g in enumerate(sd["param_groups"]):
        out[f"group{gi}"] = {k: v for k, v in g.items() if k != "params"}
        for pj, pid in enumerate(g["params"]):
            out[f"group{gi}.param{pj}"] = sd["state"].get(pid, {})
    return out


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _local(p).detach().clone() for n, p in model.named_parameters()}


def state_snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of the optimizer's state_dict (tensors cloned), for before/after comparisons."""
    return copy.deepcopy(opt.state_dict())


def nonfinite_entries(obj: Any) -> list[str]:
    """Paths of NaN/inf values (tensors or floats). Hyperparameters in an optimizer state_dict's
    ``param_groups`` are not checked: some are legitimately infinite (Prodigy's ``growth_rate``)."""
    bad = []
    for k, v in flatten(obj):
        if k.startswith("/param_groups"):
            continue
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            if not torch.isfinite(_local(v)).all():
                bad.append(k)
        elif isinstance(v, float) and not math.isfinite(v):
            bad.append(k)
    return bad


# ------------------------------------------------------------------------------------------------------------
# Non-finite gradient guard (fallback until lightning_optim.callbacks.non_finite.NonFiniteGuard exists)


def drop_nonfinite_grads(optimizer: torch.optim.Optimizer) -> bool:
    """If any gradient is NaN/inf, drop every gradient (``grad = None``) so the step that follows changes
    nothing; return whether it did. What ``NonFiniteGuard`` does in ``on_before_optimizer_step`` (the design:
    "drop the gradients"; non-finite values must not reach optimizer state). Under DDP/FSDP the decision must
    additionally be all-reduced; this single-process fallback does not need it."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return False
    finite = torch.stack([torch.isfinite(_local(g)).all() for g in grads]).all()
    if bool(finite):
        return False
    for g in optimizer.param_groups:
        for p in g["params"]:
            p.grad = None
    return True

"""Shared pieces of the resharding-resume script (``reshard_run.py``) and its test (``test_reshard_resume.py``).

What is compared, and why it can be compared across world sizes:

* **The model**: ``LanguageModel`` (the ``tiny`` Llama preset shrunk to 2 layers, width 64, 4 heads, vocabulary 256,
  sequence 32; MLP hidden 90 so that the MLP's rows split unevenly over 4 ranks: 23 + 23 + 23 + 21), sharded
  by its own ``configure_model`` (``fully_shard`` per block, then the root) on the strategy's mesh:
  ``(1, W)`` is FSDP over W ranks, ``(2, 2)`` is HSDP (replicate over 2, shard over 2).
* **The data**: optimizer step ``k`` (0-based, ``trainer.global_step`` before the step) uses the global batch of
  sequences ``k·G … k·G+G-1`` (``G`` = :data:`GLOBAL_BATCH`), each drawn from a generator seeded by its index;
  rank ``r`` of ``W`` takes the ``G/W`` consecutive sequences from ``k·G + r·G/W``. FSDP2 (and HSDP) average
  the per-rank mean losses, so every world size takes the gradient of the same global mean loss; only the
  order of floating-point reductions differs. The batch depends on the step, not on the data loader's
  position, so a resumed run sees exactly what the uninterrupted run saw at that step.
* **The optimizer state**, gathered to full tensors by parameter name (independent of the DCP state-dict
  machinery under test): a ``DTensor`` state entry through ``full_tensor()``; a plain tensor entry is
  compared across the ranks, and one that differs between ranks is reported as shard-dependent (plain
  tensors are saved once and loaded whole by torch.distributed.checkpoint, so such an entry cannot reshard).
  The param groups (hyperparameters, step counters kept in the groups) are compared without ``params``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from lightning_optim import OptimConfig
from lightning_optim._dtensor import DTensor, local
from lightning_optim.models import LanguageModel
from lightning_optim.optim.muon import Muon
from lightning_optim.registry import available_optimizers, get_optimizer_spec, register_optimizer_spec

SAVE_STEP = 3  # the 2-process run saves after this many optimizer steps
GLOBAL_BATCH = 4  # sequences per optimizer step, split over the ranks (1, 2 or 4)
SEQ = 32
VOCAB = 256
MODEL = dict(preset="tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, block_size=SEQ, mlp_hidden=90)
# settings for a run this short (each applies to the optimizers that take it): bases / roots refreshed every 2
# steps, so SOAP's and Shampoo's refreshed state is in the checkpoints; a schedule-free warmup that ends inside
# the run
SHORT_RUN = {"precondition_frequency": 2, "warmup_steps": 2}
TOTAL_STEPS = 8  # the schedule's horizon (beyond the last step, so the lr never reaches 0 here)

# mesh (data_parallel_size, tensor_parallel_size) of each layout; LanguageModel.configure_model shards over the
# tensor_parallel dimension when data_parallel is 1 (FSDP), over both when it is larger (HSDP)
LAYOUTS = {"fsdp1": (1, 1), "fsdp2": (1, 2), "fsdp4": (1, 4), "hsdp2x2": (2, 2)}


def reshard_optimizers() -> list[str]:
    """Registered optimizers whose state has a shard-dependent layout to get right: the matrix family and the
    hybrids, those that run on FSDP2 (``supports_dtensor``). Read from the registry, so new entries join."""
    names = []
    for name in available_optimizers():
        spec = get_optimizer_spec(name)
        if (spec.family == "matrix" or spec.hybrid) and spec.supports_dtensor:
            names.append(name)
    return names


def optim_config(name: str) -> OptimConfig:
    spec = get_optimizer_spec(name)
    extra = {k: v for k, v in SHORT_RUN.items() if k in spec.defaults}
    if spec.schedule_free:
        return OptimConfig(name=name, scheduler="constant", warmup_steps=0, total_steps=TOTAL_STEPS, extra=extra)
    return OptimConfig(name=name, scheduler="cosine", warmup_steps=1, total_steps=TOTAL_STEPS, extra=extra)


def step_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s share of the global batch of optimizer step ``step`` (module docstring)."""
    if GLOBAL_BATCH % world:
        raise ValueError(f"the global batch of {GLOBAL_BATCH} sequences does not split over {world} ranks")
    per = GLOBAL_BATCH // world
    rows = []
    for j in range(per):
        g = torch.Generator().manual_seed(10_000 + step * GLOBAL_BATCH + rank * per + j)
        rows.append(torch.randint(0, VOCAB, (SEQ + 1,), generator=g))
    x = torch.stack(rows)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class _Ticks(Dataset):
    """One dummy item per step: the batch itself is built from the step (:func:`step_batch`)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class ReshardLM(LanguageModel):
    """The tiny ``LanguageModel`` whose batch for step ``k`` is :func:`step_batch` ``(k, rank, world)``."""

    def __init__(self, name: str) -> None:
        super().__init__(optim=optim_config(name), **MODEL)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._loss(step_batch(self.global_step, self.global_rank, self.trainer.world_size))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(), batch_size=1)


def strategy(layout: str, check_replicated_state: bool = True):
    from lightning_optim.checkpoint_dcp import VerifiedModelParallelStrategy

    dp, tp = LAYOUTS[layout]
    return VerifiedModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp,
                                         check_replicated_state=check_replicated_state,
                                         timeout=timedelta(seconds=120))


def trainer(layout: str, root: Path, max_steps: int, callbacks: list[L.Callback],
            check_replicated_state: bool = True) -> L.Trainer:
    dp, tp = LAYOUTS[layout]
    enable_checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    return L.Trainer(accelerator="cpu", devices=dp * tp, strategy=strategy(layout, check_replicated_state),
                     max_steps=max_steps,
                     callbacks=callbacks, logger=False, enable_checkpointing=enable_checkpointing,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, use_distributed_sampler=False, default_root_dir=str(root))


# ----------------------------------------------------------------------------------------------------------
# the negative control: an optimizer with the state layout this test exists to catch

CONTROL = "reshard-control-local-rows"


class LocalRowsMuon(Muon):
    """Muon plus a deliberately wrong piece of state (the negative control, never registered outside the
    scripts): ``row_sq``, a running mean of each local row's squared gradient, kept as a *plain* tensor of
    the rank's local rows (``local_rows × 1``) instead of a DTensor sharded like the parameter. Its value
    depends on the shard, so torch.distributed.checkpoint cannot reshard it; the update does not read it."""

    def _init_matrix_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        super()._init_matrix_state(p, state, group)
        state["row_sq"] = torch.zeros(local(p).shape[0], 1)

    def _ns_inputs(self, group: dict, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in ps:
            self.state[p]["row_sq"].lerp_(local(p.grad).float().square().mean(dim=-1, keepdim=True), 0.05)
        return super()._ns_inputs(group, ps)


def register_control() -> None:
    """Register :data:`CONTROL` (Muon's record with :class:`LocalRowsMuon` as the factory) in this process."""
    register_optimizer_spec(replace(get_optimizer_spec("muon"), name=CONTROL, factory=LocalRowsMuon, aliases=()),
                            overwrite=True)


# ----------------------------------------------------------------------------------------------------------
# gathering what is compared


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor, by name (a collective: every rank calls it)."""
    return {n: _full(p) for n, p in module.named_parameters()}


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state by parameter name, full tensors, plus its param groups (module docstring).

    Returns ``{"state": {name: {key: tensor | value}}, "groups": [...], "rank_dependent": [...]}``;
    ``rank_dependent`` lists ``name.key`` of plain-tensor entries whose value differs between the ranks."""
    names = {id(p): n for n, p in module.named_parameters()}
    state: dict[str, dict[str, Any]] = {}
    plain: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = {}
            for key, value in optimizer.state.get(p, {}).items():
                label = f"{names.get(id(p), '?')}.{key}"
                if isinstance(value, DTensor):
                    entry[key] = _full(value)
                elif isinstance(value, torch.Tensor):
                    entry[key] = plain[label] = value.detach().cpu().clone()
                else:
                    entry[key] = value
            state[names.get(id(p), f"unnamed{len(state)}")] = entry
    rank_dependent = []
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, plain)
        for label, value in plain.items():
            if any(label not in other or not _same(value, other[label]) for other in everyone):
                rank_dependent.append(label)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"state": state, "groups": groups, "rank_dependent": rank_dependent}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# comparing (used by the test on what the scripts wrote)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a checkpoint may bring a tuple back as a list: the same value)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def state_differences(saved: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """Every way ``loaded`` (after a resume) differs from ``saved``: missing or extra entries, shapes, dtypes,
    values (exact), group settings, and shard-dependent plain tensors on either side."""
    out = [f"{label}: a plain tensor that differs between the ranks of the saving run (shard-dependent state, "
           "which torch.distributed.checkpoint saves once and cannot reshard)" for label in saved["rank_dependent"]]
    out += [f"{label}: differs between the ranks after loading" for label in loaded["rank_dependent"]]
    for name in sorted(set(saved["state"]) | set(loaded["state"])):
        a, b = saved["state"].get(name), loaded["state"].get(name)
        if a is None or b is None:
            out.append(f"state of {name}: only in the {'saved' if b is None else 'loaded'} optimizer")
            continue
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{name}.{key}: only in the {'saved' if key in a else 'loaded'} state")
                continue
            x, y = a[key], b[key]
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                if x.shape != y.shape or x.dtype != y.dtype:
                    out.append(f"{name}.{key}: saved {tuple(x.shape)} {x.dtype}, loaded {tuple(y.shape)} {y.dtype}")
                elif not torch.equal(x, y):
                    diff = (x.double() - y.double()).abs().max().item()
                    out.append(f"{name}.{key}: values differ (max |saved - loaded| {diff:.3e})")
            elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                out.append(f"{name}.{key}: saved {type(x).__name__}, loaded {type(y).__name__}")
            elif _plain(x) != _plain(y):
                out.append(f"{name}.{key}: saved {x!r}, loaded {y!r}")
    if len(saved["groups"]) != len(loaded["groups"]):
        out.append(f"param groups: {len(saved['groups'])} saved, {len(loaded['groups'])} loaded")
    for i, (a, b) in enumerate(zip(saved["groups"], loaded["groups"])):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"param group {i} ({a.get('name', b.get('name'))}): {key!r} only in the "
                           f"{'saved' if key in a else 'loaded'} group")
            elif _plain(a[key]) != _plain(b[key]):
                out.append(f"param group {i} ({a.get('name')}): {key} saved {a[key]!r}, loaded {b[key]!r}")
    return out


# bfloat16 keeps 8 significant bits: the Newton-Schulz kernels round their input to it, so two runs whose
# gradients differ only in the order of float32 reductions round some inputs differently, and the quintic
# iteration amplifies that in the weak singular directions: measured between layouts here, the updates of the
# Muon family differ by up to 1.0% of their Frobenius norm (2.7 bf16 ulps of 2^-8; SOAP and MARS, float32
# throughout, 4e-5). 2^-5 (8 ulps) leaves room for that; a lost or wrong state (momentum, second moments, a
# step counter, the schedule) changes the step by a large fraction of itself
BF16_TOLERANCE = 2.0 ** -5


def step_differences(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     origin: dict[str, torch.Tensor]) -> tuple[list[str], float]:
    """Parameters of a resumed run against the uninterrupted run after the same step.

    A parameter passes when
    ``‖resumed - reference‖_F <= BF16_TOLERANCE · ‖reference - origin‖_F + 4·2⁻²³·‖reference‖_F``: ``origin`` is the checkpoint both runs started from, so the bound is relative to how far the uninterrupted
    run moved since (the last term is float32 rounding of the weights themselves). Returns the failures and the
    largest ratio ``‖resumed - reference‖ / ‖reference - origin‖``."""
    out, worst = [], 0.0
    for name in sorted(reference):
        if name not in resumed:
            out.append(f"{name}: missing from the resumed run")
            continue
        ref, res = reference[name].double(), resumed[name].double()
        moved = (ref - origin[name].double()).norm().item()
        diff = (res - ref).norm().item()
        ratio = diff / moved if moved > 0 else (0.0 if diff == 0 else math.inf)
        worst = max(worst, ratio)
        if not diff <= BF16_TOLERANCE * moved + 4 * 2.0 ** -23 * ref.norm().item():
            out.append(f"{name}: |resumed - uninterrupted| {diff:.3e} > {BF16_TOLERANCE:g} x the step {moved:.3e} "
                       f"(ratio {ratio:.3g})")
    return out, worst

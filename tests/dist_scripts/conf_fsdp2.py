"""Conformance, FSDP2 on 2 CPU processes: ONE launch that checks every registered optimizer in one process group.

Usage (from tests/conformance/test_distributed.py)::

    torchrun --nproc_per_node=2 tests/dist_scripts/conf_fsdp2.py OUT_DIR [name ...]

For each optimizer (all of ``available_optimizers()`` unless names are given), on a ``fully_shard``-ed tiny
model (one hidden size odd, so the shards are uneven):

* ``straight``   2K steps; weights and state finite; the weights compared with the same run in one process
                 (rank 0, full batch) and the max difference recorded.
* ``full`` / ``sharded``   K steps → ``get_model_state_dict`` + ``get_optimizer_state_dict`` with
                 ``StateDictOptions(full_state_dict=True | False)`` → ``torch.save`` (per rank) →
                 ``torch.load(weights_only=True)`` → a fresh sharded model and optimizer →
                 ``set_*_state_dict`` → K steps, compared bit for bit with ``straight`` (local shards and state).
* ``lightning``  ``Trainer(strategy=ModelParallelStrategy(...), devices=2)`` trains ``ConfLM`` 3 steps and writes
                 ``OUT_DIR/lightning/<name>.ckpt`` (a full, single-file checkpoint) that the test then resumes
                 in one process.

Every cell's outcome ("ok", "skip: why" or the error) goes to ``OUT_DIR/rank<r>.json`` after each optimizer,
and the optimizer in progress to ``OUT_DIR/current_rank<r>.txt``. An exception in one optimizer is recorded
and the loop goes on. An optimizer that leaves the ranks' collectives mismatched kills the launch (gloo
aborts); the test fixture then records it as failed with the log and relaunches for the optimizers after it.
The process group has a 90 s timeout so a rank left waiting fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_optim as lo  # noqa: E402
from tests.dist_utils import finish  # noqa: E402
from tests.conformance._helpers import (  # noqa: E402
    build,
    diff_states,
    make_model,
    nonfinite_entries,
    train_steps,
)

K, WARMUP = 3, 2


def sharded_model(seed: int, mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def setup(name: str, seed: int, mesh):
    model = sharded_model(seed, mesh)
    opt = build(name, model)
    sched = lo.create_scheduler("cosine", opt, total_steps=2 * K, warmup_steps=WARMUP)
    return model, opt, sched


def local_params(model):
    return {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in model.named_parameters()}


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def check_optimizer(name: str, mesh, rank: int, world: int, out: Path) -> dict[str, str]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    cells: dict[str, str] = {}
    if not lo.optimizer_info(name).supports_dtensor:  # the guarantee is then a clear refusal at construction
        try:
            setup(name, 0, mesh)
        except ValueError as err:
            ok = "DTensor" in str(err) and name in str(err)
            msg = f"skip: refuses FSDP2 DTensor parameters at construction (checked): {err}" if ok else f"FAILED: unclear refusal: {err}"
        except ImportError as err:
            msg = f"skip: optional dependency missing: {err}"
        else:
            msg = "FAILED: declares supports_dtensor=False but built on DTensor parameters without refusing"
        return {c: msg for c in ("straight", "full", "sharded", "lightning")}
    try:
        model, opt, sched = setup(name, 0, mesh)
    except ImportError as err:
        return {c: f"skip: optional dependency missing: {err}" for c in ("straight", "full", "sharded", "lightning")}

    try:
        train_steps(model, opt, sched, 0, 2 * K, rank, world)
        ref_params, ref_state = local_params(model), opt.state_dict()
        bad = nonfinite_entries(ref_params) + nonfinite_entries(ref_state)
        full = full_params(model)  # collective: every rank
        msg = "ok"
        if bad:
            msg = f"non-finite after {2 * K} FSDP2 steps: {bad[:5]}"
        else:
            # every rank runs the one-process reference (same full batch): optimizers that coordinate plain,
            # replicated tensors over the default process group (DDP-style matrix work split) stay matched
            single = make_model(0)
            sopt = build(name, single)
            ssched = lo.create_scheduler("cosine", sopt, total_steps=2 * K, warmup_steps=WARMUP)
            _train_global(single, sopt, ssched, world)
            diffs = {n: (full[n] - p.detach()).abs().max().item() for n, p in single.named_parameters()}
            moved = {n: (p.detach() - make_model(0).get_parameter(n)).abs().max().item()
                     for n, p in single.named_parameters()}
            worst = max(diffs, key=diffs.get)
            msg = f"ok; max |FSDP2 - one process| {diffs[worst]:.2e} ({worst}, moved {moved[worst]:.2e})"
        cells["straight"] = msg
    except Exception as err:
        cells["straight"] = f"FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
        ref_params = ref_state = None

    for mode in ("full", "sharded"):
        try:
            if ref_params is None:
                cells[mode] = "FAILED: the straight run failed"
                continue
            options = StateDictOptions(full_state_dict=mode == "full")
            m1, o1, s1 = setup(name, 0, mesh)
            train_steps(m1, o1, s1, 0, K, rank, world)
            path = out / "ckpt" / f"{name}-{mode}-rank{rank}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": get_model_state_dict(m1, options=options),
                        "optimizer": get_optimizer_state_dict(m1, o1, options=options),
                        "scheduler": s1.state_dict()}, path)
            ckpt = torch.load(path, weights_only=True)
            m2, o2, s2 = setup(name, 123, mesh)
            set_model_state_dict(m2, ckpt["model"], options=options)
            set_optimizer_state_dict(m2, o2, ckpt["optimizer"], options=options)
            s2.load_state_dict(ckpt["scheduler"])
            train_steps(m2, o2, s2, K, K, rank, world)
            problems = diff_states(ref_params, local_params(m2))
            problems += [f"state {p}" for p in diff_states(ref_state, o2.state_dict())]
            cells[mode] = "ok" if not problems else (
                f"FAILED: {2 * K} steps != {K} + save/load({mode}) + {K} on rank {rank}:\n  " + "\n  ".join(problems[:12]))
        except Exception as err:
            cells[mode] = f"FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
    return cells


def _train_global(model, opt, sched, world):
    """One process on the global batch that FSDP2 splits over ``world`` ranks (mean over all rows)."""
    from tests.conformance._helpers import BATCH, VOCAB, batch
    import torch.nn.functional as F

    for step in range(2 * K):
        opt.zero_grad(set_to_none=True)
        idx, tgt = batch(step, 0, 1, size=world * BATCH)
        # FSDP2 averages the per-rank mean losses; rows r::world form rank r's batch of equal size
        loss = sum(
            F.cross_entropy(model(idx[r::world]).float().reshape(-1, VOCAB), tgt[r::world].reshape(-1))
            for r in range(world)
        ) / world
        loss.backward()
        opt.step()
        sched.step()


def lightning_checkpoint(name: str, out: Path) -> str:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.conformance._lightning import ConfLM, trainer

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    model = ConfLM(optimizer=name, total_steps=8)
    tr = trainer(out / "lightning" / name, max_steps=3, devices=2, strategy=strategy)
    tr.fit(model)
    path = out / "lightning" / f"{name}.ckpt"
    tr.save_checkpoint(path)
    return "ok" if path.exists() or dist.get_rank() != 0 else f"FAILED: {path} was not written"


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or lo.available_optimizers()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, dict[str, str]] = {}
    for name in names:
        (out / f"current_rank{rank}.txt").write_text(name)  # so a crash can be blamed on the right optimizer
        t0 = time.perf_counter()
        cells = check_optimizer(name, mesh, rank, world, out)
        dist.barrier()
        t1 = time.perf_counter()
        if "lightning" not in cells:
            try:
                cells["lightning"] = lightning_checkpoint(name, out)
            except Exception as err:
                cells["lightning"] = f"FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
            dist.barrier()
        cells["seconds"] = f"{t1 - t0:.2f} + lightning {time.perf_counter() - t1:.2f}"
        results[name] = cells
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    finish(out)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

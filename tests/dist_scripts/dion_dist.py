"""Dion on CPU ranks (gloo), ONE launch per layout: FSDP2 on a 1-D mesh (2 ranks) or HSDP on a 2 x 2 mesh (4 ranks).

    torchrun --nproc_per_node=2 tests/dist_scripts/dion_dist.py OUT_DIR fsdp2
    torchrun --nproc_per_node=4 tests/dist_scripts/dion_dist.py OUT_DIR hsdp

For rank fractions 1.0 and 0.25: ``fully_shard`` per block and on the root (placements ``(Shard(0),)`` or
``(Replicate(), Shard(0))``), K steps of the same batches on every rank; the gathered full weights go to
``<layout>_<fraction>.pt`` (rank 0) and rank 0 runs the same steps in one process (``single_<fraction>.pt``).
Each rank records the collectives Dion issued (``CommCounter``), the placements of the parameters, of the
momentum and the type of Q. The fsdp2 launch also runs DDP replicas (torch DDP, plain tensors: each rank
computes the whole step itself; weights saved per rank) and records the refusal of ``qr_method="qr"`` on a shard.
Everything is written before :func:`tests.dist_utils.finish` tears the group down.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

from lightning_optim import create_optimizer  # noqa: E402
from lightning_optim.models.gpt import Transformer  # noqa: E402
from lightning_optim.optim._matrix_dist import CommCounter  # noqa: E402
from tests.dist_scripts.hsdp_muon import full_weights  # noqa: E402
from tests.dist_scripts.muon_dist import CFG as MUON_CFG  # noqa: E402
from tests.dist_scripts.muon_dist import K, batch, loss_of  # noqa: E402
from tests.dist_utils import finish, shard_per_block  # noqa: E402

CFG = dataclasses.replace(MUON_CFG, mlp_hidden=71)  # 71-row MLP matrices: uneven row shards
FRACTIONS = (1.0, 0.25)
LR = 0.02
MESHES = {"fsdp2": ((2,), ("shard",)), "hsdp": ((2, 2), ("replicate", "shard"))}


def make_model():
    torch.manual_seed(0)
    return Transformer(CFG)


def train(model, opt) -> None:
    for s in range(K):
        opt.zero_grad()
        loss_of(model, batch(s)).backward()
        opt.step()


def single_run(fraction: float) -> dict[str, torch.Tensor]:
    model = make_model()
    train(model, create_optimizer("dion", model, lr=LR, rank_fraction=fraction))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sharded_run(layout: str, fraction: float, mesh, out: Path, record: dict) -> None:
    model = make_model()
    shard_per_block(model, mesh)
    opt = create_optimizer("dion", model, lr=LR, rank_fraction=fraction)
    CommCounter.reset()
    train(model, opt)
    matrix = [p for g in opt.param_groups if g["matrix"] for p in g["params"]]
    record[f"{layout}_{fraction}"] = {
        "collectives": dict(CommCounter.collectives),
        "placements": sorted({repr(tuple(p.placements)) for p in model.parameters()}),
        "momentum": sorted({repr(tuple(opt.state[p]["momentum"].placements)) for p in matrix}),
        "q_types": sorted({type(opt.state[p]["Q"]).__name__ for p in matrix}),
        "q_shapes": [list(opt.state[p]["Q"].shape) for p in matrix],
        "shapes": [list(p.shape) for p in matrix],
    }
    full = full_weights(model)
    if dist.get_rank() == 0:
        torch.save(full, out / f"{layout}_{fraction}.pt")


def ddp_run(out: Path) -> None:
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = create_optimizer("dion", model, lr=LR)
    CommCounter.reset()
    for s in range(K):
        opt.zero_grad()
        loss_of(ddp, batch(s)).backward()
        opt.step()
    assert not CommCounter.collectives, dict(CommCounter.collectives)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"ddp_rank{dist.get_rank()}.pt")


def refusal(mesh) -> str:
    from torch.distributed.tensor import Shard, distribute_tensor

    w = torch.nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]))
    try:
        create_optimizer("dion", [{"params": [("blocks.0.mlp.up.weight", w)], "matrix": True}], qr_method="qr")
    except ValueError as err:
        return str(err)
    return "not refused"


def main() -> None:
    out, layout = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    shape, names = MESHES[layout]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    record: dict = {}
    for fraction in FRACTIONS:
        sharded_run(layout, fraction, mesh, out, record)
    if layout == "fsdp2":
        ddp_run(out)
        record["refusal"] = refusal(mesh)
    if rank == 0:
        for fraction in FRACTIONS:
            torch.save(single_run(fraction), out / f"single_{fraction}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    finish(out)


if __name__ == "__main__":
    main()
